"""A Ray cluster launcher config (``ray up``): one node type per accelerator type the pools use.

Provider ``aws``: each vLLM GPU pool's type maps to an instance type with that card
(:data:`AWS_GPU_INSTANCES`, or ``RenderOptions.instance_types``); simulated and CPU pools and the
gateways run on CPU instances. Every node advertises its type's pin resource
(``accelerator_type:<X>``, the gateway's ``gateway.node_resource``) through its node type's
``resources``, which the autoscaler hands to ``ray start``.

Every node starts with ``RAY_AUTH_MODE=token`` and the token file ``ray up`` copies from
``~/.ray/auth_token`` of the machine that runs it (``ray get-auth-token --generate`` makes one).
The ledger's directory on the head is a host directory mounted into the head's container, so
restarting the container keeps the ledger; ``ray down`` deletes the instance and its disk, so a
ledger that must outlive the cluster belongs on PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from serving.config import ConfigError, ResolvedDeployment, TokenweirConfig

from ._common import RenderOptions, check_cluster_config, ledger_dir, ledger_resources, node_groups

AWS_GPU_INSTANCES: dict[str, tuple[str, int]] = {
    "H100": ("p5.48xlarge", 8),
    "H200": ("p5e.48xlarge", 8),
    "A100-80GB": ("p4de.24xlarge", 8),
    "L40S": ("g6e.12xlarge", 4),
}
"""AWS instance types carrying each catalog card, and their GPUs. No AWS instance has an H20, L20
or A10 (g5's A10G is another card, which Ray detects as ``A10G``): give one with
``--instance-type TYPE=INSTANCE:GPUS`` for another provider's or region's machines."""
AWS_CPU_INSTANCES = {
    "head": "m7i.2xlarge",
    "gateway": "c7i.2xlarge",
    "sim": "m7i.2xlarge",
    "cpu": "m7i.8xlarge",
}
"""CPU instance types: the head, gateways, simulated pools, vLLM CPU pools."""
HOST_LEDGER_DIR = "/var/lib/tokenweir"
"""Host directory of the head that holds the ledger (mounted into the head's container)."""
REMOTE_DIR = "~/tokenweir"
"""Where ``ray up`` puts the rendered Serve config (and the admin key) on every node."""


def cluster_launcher(
    cfg: TokenweirConfig,
    deployment: ResolvedDeployment,
    opts: RenderOptions,
    files_dir: str,
    with_admin_key: bool,
) -> dict[str, Any]:
    """The ``ray up`` config. ``files_dir`` is the local directory holding ``serve.yaml`` (and
    ``admin_key`` when ``with_admin_key``), copied to :data:`REMOTE_DIR` on every node."""
    check_cluster_config(cfg, "cluster-launcher")
    table = {**AWS_GPU_INSTANCES, **opts.instance_types}
    gpu_types = list(dict.fromkeys(p.accelerator for p in deployment.pools if p.engine == "vllm"))
    gpu_types = [t for t in gpu_types if t != "CPU"]
    missing = [t for t in gpu_types if t not in table]
    if missing:
        raise ConfigError(
            f"cluster-launcher: no instance type known with {missing} GPUs; "
            "give one per type: --instance-type TYPE=INSTANCE:GPUS"
        )
    groups = node_groups(deployment, {t: table[t][1] for t in gpu_types})
    node_types: dict[str, Any] = {
        "head": {
            "node_config": {"InstanceType": AWS_CPU_INSTANCES["head"]},
            # Ray's control plane and the ledger (pinned here, beside its disk); replicas go to workers.
            "resources": {"CPU": 0, **ledger_resources(cfg, "cluster-launcher")},
            "min_workers": 0,
            "max_workers": 0,
            # The ledger's directory, on the host's disk, owned by the image's user (uid 1000).
            "initialization_commands": [
                f"sudo mkdir -p {HOST_LEDGER_DIR} && sudo chown 1000:100 {HOST_LEDGER_DIR}"
            ],
        }
    }
    for g in groups:
        kind = g.name.split("-")[0]  # gpu, sim, cpu, gateway
        instance = table[str(g.accelerator)][0] if g.needs_gpu else AWS_CPU_INSTANCES[kind]
        resources = dict(g.ray_resources) | ({"GPU": g.gpus_per_node} if g.needs_gpu else {})
        node_types[g.name] = {
            "node_config": {"InstanceType": instance},
            "resources": resources,
            "min_workers": g.nodes,
            "max_workers": g.nodes,
        }
    mounts = {f"{REMOTE_DIR}/serve.yaml": f"{files_dir}/serve.yaml", "~/.ray/auth_token": "~/.ray/auth_token"}
    env = "export RAY_AUTH_MODE=token; "
    if with_admin_key and cfg.metering.enabled:
        mounts[f"{REMOTE_DIR}/admin_key"] = f"{files_dir}/admin_key"
        env += f'export {cfg.metering.admin_key_env}="$(cat {REMOTE_DIR}/admin_key)"; '
    common = "--object-manager-port=8076 --disable-usage-stats"
    return {
        "cluster_name": opts.name,
        "max_workers": sum(g.nodes for g in groups),
        "provider": {"type": "aws", "region": opts.region, "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {
            "image": opts.image,
            "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536"],
            "head_run_options": [f"-v {HOST_LEDGER_DIR}:{ledger_dir(cfg, opts.container_home)}"],
        },
        "file_mounts": mounts,
        "head_node_type": "head",
        "available_node_types": node_types,
        "setup_commands": [],
        "head_start_ray_commands": [
            "ray stop",
            env + "ray start --head --port=6379 --autoscaling-config=~/ray_bootstrap_config.yaml "
            f"--dashboard-host=0.0.0.0 {common}",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            env + f"ray start --address=$RAY_HEAD_IP:6379 {common}",
        ],
    }
