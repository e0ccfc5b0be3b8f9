"""What every rendered target shares: the options, the checks a cluster config must pass, and the
node groups a deployment needs (one per accelerator type its pools run on, plus the gateways').

All pure: a :class:`~serving.config.TokenweirConfig` and its
:class:`~serving.config.ResolvedDeployment` in, plain data out; nothing here reads a file or
imports Ray.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from serving.config import ConfigError, ResolvedDeployment, ResolvedPool, TokenweirConfig
from serving.metering import HEAD_NODE_RESOURCE

APP_NAME = "tokenweir"
"""The Serve application's name (``serving.app.APP_NAME``; a test keeps the two equal)."""
APP_BUILDER = "serving.app:app_builder"
"""The Serve import path that builds the app from the embedded config (a test imports it)."""

GPU_PRODUCT_LABELS: dict[str, str] = {
    "H20": "NVIDIA-H20",
    "H100": "NVIDIA-H100-80GB-HBM3",
    "H200": "NVIDIA-H200",
    "L20": "NVIDIA-L20",
    "L40S": "NVIDIA-L40S",
    "A10": "NVIDIA-A10",
    "A100-80GB": "NVIDIA-A100-SXM4-80GB",
}
"""The ``nvidia.com/gpu.product`` node label NVIDIA's GPU feature discovery puts on a Kubernetes node
with each catalog card: ``nvidia-smi``'s product name with spaces as dashes, for the variant the
catalog models (H100 and A100 SXM; the PCIe cards are ``NVIDIA-H100-PCIe``, ``NVIDIA-A100-PCIE-80GB``)."""

CLUSTER_HOSTS = frozenset({"node", "0.0.0.0", "::"})
"""``gateway.host`` values that work where replicas run on many machines (a fixed address belongs
to one machine, loopback to none a client can reach)."""

_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """What the deployment files need beyond the Tokenweir config: names, image, sizes, cloud."""

    name: str = APP_NAME
    """Name of the RayService / cluster and prefix of every object (a DNS label, at most 40 characters)."""
    image: str = "tokenweir:0.1.0"
    """Container image of every Ray node: Ray 2.60 on Python 3.11 with Tokenweir installed (``pip install '.[gpu]'``)."""
    ray_version: str = "2.60.0"
    """The Ray version in that image (KubeRay's ``rayVersion``)."""
    container_home: str = "/home/ray"
    """Home directory inside the image (rayproject images: /home/ray); ``~`` in ``state_dir`` expands to it."""
    ledger_storage: str = "10Gi"
    """Size of the ledger's volume on the head."""
    storage_class: str | None = None
    """StorageClass of the ledger's volume (None: the cluster's default)."""
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """Kubernetes Service type in front of the gateways."""
    cpus_per_gpu: int = 8
    """CPUs a GPU worker pod asks for per GPU (vLLM's scheduler, tokenizer and data loading)."""
    memory_gib_per_gpu: int = 48
    """Memory (GiB) a GPU worker pod asks for per GPU (weights are staged through host memory)."""
    region: str = "us-west-2"
    """Cloud region of the cluster launcher's nodes (provider ``aws``)."""
    instance_types: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    """Cluster launcher: accelerator type -> (instance type, GPUs per instance), over the built-in table."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(
                f"deployment name {self.name!r}: a lowercase DNS label of at most 40 characters"
            )


@dataclass(frozen=True, slots=True)
class NodeGroup:
    """Machines (pods, instances) of one kind: the pools of one accelerator type, or the gateways."""

    name: str
    """Group / node type name: ``gpu-h100``, ``sim-l20``, ``cpu``, ``gateway``."""
    accelerator: str | None
    """Catalog accelerator type of its pools (None for the gateway group)."""
    pools: tuple[str, ...]
    """Pools whose replicas run here."""
    nodes: int
    """How many machines."""
    gpus_per_node: int
    """GPUs per machine (0: no GPU needed, simulated or CPU pools, gateways)."""
    ray_resources: dict[str, int]
    """Custom Ray resources each machine advertises: the accelerator type's pin, the gateway's."""

    @property
    def needs_gpu(self) -> bool:
        return self.gpus_per_node > 0


def embedded_config(cfg: TokenweirConfig) -> dict[str, Any]:
    """The config as written (only the keys the operator set), JSON-shaped, to travel inside a
    deployment file; refuses a config that would put the admin key in it in clear."""
    if cfg.metering.admin_key:
        raise ConfigError(
            "metering.admin_key is set in the config, so it would be written into the deployment files "
            f"in clear: remove it and give the key through ${cfg.metering.admin_key_env} instead"
        )
    return cfg.model_dump(mode="json", exclude_unset=True)


def check_cluster_config(cfg: TokenweirConfig, target: str) -> None:
    """The checks a config must pass to run on many machines (raise :class:`ConfigError`)."""
    g = cfg.gateway
    if g.host not in CLUSTER_HOSTS:
        raise ConfigError(
            f"{target}: gateway.host is {g.host!r}, an address of one machine, but gateways run on "
            "cluster nodes: set gateway.host: node (each gateway binds its node's address)"
        )


def ledger_resources(cfg: TokenweirConfig, target: str) -> dict[str, int]:
    """What the head advertises so that the ledger runs there, beside its volume: nothing for Ray's
    own head resource (the default ``metering.ledger_node_resource``) or for a PostgreSQL ledger
    (which may run on any node), else one unit of the custom resource the config pins the ledger to."""
    res = cfg.metering.ledger_pin_resource
    if res is None or res == HEAD_NODE_RESOURCE:
        return {}
    if res.startswith("node:"):
        raise ConfigError(
            f"{target}: metering.ledger_node_resource is {res!r}, one machine's address resource, but the "
            "rendered cluster keeps the ledger's disk on its head: leave it unset (the head) or name a "
            "custom resource, which the head then advertises"
        )
    return {res: 1}


def ledger_dir(cfg: TokenweirConfig, home: str) -> str:
    """The ledger's directory as the head's processes see it (``~`` is ``home`` in the image)."""
    raw = str(cfg.metering.state_dir or cfg.state_dir)
    if raw == "~" or raw.startswith("~/"):
        raw = home.rstrip("/") + raw[1:]
    if not raw.startswith("/"):
        raise ConfigError(
            f"state_dir {raw!r}: a cluster's ledger needs an absolute (or ~/...) directory, "
            "the mount point of its volume"
        )
    return raw.rstrip("/") or "/"


def node_groups(deployment: ResolvedDeployment, gpus_per_node: Mapping[str, int]) -> list[NodeGroup]:
    """One group per accelerator type the pools use, in pool order, plus ``gateway`` when
    ``gateway.node_resource`` pins the gateways.

    vLLM GPU pools of a type need ``gpus_per_node[type]`` GPUs per machine and enough machines for
    their replicas however Ray places them (:func:`machines_for`); simulated pools need no GPU and
    share one machine (or the type's GPU machines). Every machine advertises its type's pin resource, so a
    pool pinned to ``accelerator_type:<X>`` finds only machines of that type.
    """
    by_type: dict[str, list[ResolvedPool]] = {}
    for pool in deployment.pools:
        by_type.setdefault(pool.accelerator, []).append(pool)
    groups = []
    for acc, pools in by_type.items():
        gpu_pools = [p for p in pools if p.engine == "vllm" and acc != "CPU"]
        gpn = gpus_per_node[acc] if gpu_pools else 0
        too_big = [p.name for p in gpu_pools if p.gpus_per_replica > gpn]
        if too_big:
            raise ConfigError(
                f"pools {too_big}: a replica needs more GPUs than one {acc} machine has ({gpn})"
            )
        if acc == "CPU":
            nodes = sum(p.replicas for p in pools)  # vLLM's CPU build takes the machine's cores
        elif gpu_pools:
            nodes = machines_for([p.gpus_per_replica for p in gpu_pools for _ in range(p.replicas)], gpn)
        else:
            nodes = 1
        resource = pools[0].gpu.ray_resource
        kind = "cpu" if acc == "CPU" else ("gpu" if gpu_pools else "sim")
        groups.append(
            NodeGroup(
                name=kind if acc == "CPU" else f"{kind}-{acc.lower()}",
                accelerator=acc,
                pools=tuple(p.name for p in pools),
                nodes=nodes,
                gpus_per_node=gpn,
                ray_resources={resource: 1} if resource else {},
            )
        )
    g = deployment.gateway
    if g.node_resource:
        groups.append(NodeGroup("gateway", None, (), g.replicas, 0, {g.node_resource: 1}))
    return groups


def machines_for(replica_gpus: list[int], gpus_per_node: int) -> int:
    """Machines of ``gpus_per_node`` GPUs that hold replicas of ``replica_gpus`` GPUs each (a replica
    never spans machines) whatever node Ray picks for each, as long as it has room.

    A replica of ``s`` GPUs finds no room only if every machine has more than ``gpus_per_node - s``
    in use, so ``m`` machines suffice when ``m * (gpus_per_node - s + 1) > sum - s`` for every size
    ``s``; one machine per replica always does. Tight for pools of one size: ``ceil(sum / per_node)``.
    """
    total = sum(replica_gpus)
    need = max((total - s) // (gpus_per_node - s + 1) + 1 for s in set(replica_gpus))
    return min(len(replica_gpus), need)


def ray_start_resources(resources: Mapping[str, int]) -> str:
    """``--resources`` as KubeRay's ``rayStartParams`` wants it: KubeRay pastes the value into the
    ``ray start`` shell command, so it carries its own shell quoting around the JSON."""
    return '"' + json.dumps(dict(resources)).replace('"', '\\"') + '"'
