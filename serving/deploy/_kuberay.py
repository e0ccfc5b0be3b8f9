"""A KubeRay ``RayService`` and the core objects around it: the gateways' ``Service``, the ledger's
``PersistentVolumeClaim`` and the admin key's ``Secret``.

Shape of the cluster:

- **head**: Ray's control plane and the ledger, whose SQLite file lives on a ``ReadWriteOncePod``
  volume mounted at the config's ``state_dir``; ``num-cpus: 0`` keeps replicas off it. The ledger
  actor is pinned to the head by ``metering.ledger_node_resource`` (Ray's own head resource, or a
  custom one the head then advertises), so it restarts only there, on that volume;
- **gateway** (with ``gateway.node_resource``): one pod per gateway replica, each advertising one
  unit of that resource. Only these pods are behind the Service, and their probes ask Tokenweir's
  own listener (``/healthz``, ``/readyz`` on ``gateway.port``): Tokenweir serves HTTP itself, so
  Serve's proxy is off and KubeRay's ``<name>-serve-svc`` has no endpoints;
- one **worker group per accelerator type**: GPU pods on nodes whose ``nvidia.com/gpu.product``
  is that card, advertising ``accelerator_type:<X>`` (what the pools are pinned to); simulated
  pools' groups need no GPU.

Ray's token authentication is on (``authOptions.mode: token``: KubeRay generates the token Secret
and gives every Ray container ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``): the token channel's and the
ledger socket's link secrets travel over Ray, so Ray membership is the trust boundary.

Upgrades: ``upgradeStrategy: None``. A changed ``serveConfigV2`` is applied in place to the running
cluster (Serve replaces replicas; the ledger stays where it is). KubeRay's default, ``NewCluster``,
would start a second cluster, and with it a second ledger on a second head, while the first head
still holds the volume: two SQLite writers of one balance. Changing the cluster itself (image,
groups) therefore means deleting the RayService, which ends the old head and frees the volume,
and applying the new one. The volume's ``ReadWriteOncePod`` access mode enforces it as well: a
second head stays Pending while the first holds the claim. Zero-downtime cluster upgrades
(``NewCluster``, ``NewClusterWithIncrementalUpgrade``) need a ledger both clusters share, i.e.
PostgreSQL, not a file on one head's volume.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from serving.config import ConfigError, ResolvedDeployment, TokenweirConfig

from ._common import (
    CLUSTER_HOSTS,
    GPU_PRODUCT_LABELS,
    NodeGroup,
    RenderOptions,
    check_cluster_config,
    ledger_dir,
    ledger_resources,
    node_groups,
    ray_start_resources,
)
from ._serve import serve_config

ROLE_LABEL = "tokenweir.io/role"
"""Pod label naming what a Ray pod is for (``head``, ``gateway``, ``pool``); the Service selects
``gateway`` pods by it."""
GATEWAY_LABEL = "tokenweir.io/gateway"
"""Also on gateway pods (``"true"``): the label the Prometheus files in deploy/prometheus/kubernetes select."""
ADMIN_KEY_ITEM = "admin-key"
"""Key of the admin key in its Secret."""
LEDGER_DSN_ITEM = "dsn"
"""Key of the PostgreSQL ledger's connection string in the ``<name>-ledger-dsn`` Secret."""
RAYLET_HEALTH = {"path": "/api/local_raylet_healthz", "port": 52365}
"""The raylet's health on Ray's dashboard agent (public under token auth)."""
GCS_HEALTH = {"path": "/api/gcs_healthz", "port": 8265}
"""The GCS's health on the head's dashboard (public under token auth)."""


def kuberay_manifests(
    cfg: TokenweirConfig, deployment: ResolvedDeployment, opts: RenderOptions, admin_key: str | None
) -> list[dict[str, Any]]:
    """``[RayService, Service (gateways), PersistentVolumeClaim]``, the metrics ``Service`` when the
    operator's listener is on the pod address, and, with metering on and ``admin_key`` given, the
    admin key's ``Secret`` last."""
    check_cluster_config(cfg, "kuberay")
    if not deployment.gateway.node_resource:
        raise ConfigError(
            "kuberay: gateway.node_resource is unset, so gateway replicas could start on any pod while the "
            "Service reaches only the gateway group's: set gateway.node_resource (e.g. tokenweir_gateway)"
        )
    gpn: dict[str, int] = {}  # one pod per replica of the type's largest vLLM pool
    for p in deployment.pools:
        if p.engine == "vllm":
            gpn[p.accelerator] = max(gpn.get(p.accelerator, 0), p.gpus_per_replica)
    groups = node_groups(deployment, gpn)
    names = _Names(opts.name)
    mount = ledger_dir(cfg, opts.container_home)
    env = _env(cfg, names)
    head_params = {"num-cpus": "0", "dashboard-host": "0.0.0.0"}
    if ledger := ledger_resources(cfg, "kuberay"):  # else Ray's own head resource pins the ledger
        head_params["resources"] = ray_start_resources(ledger)
    head = {
        "rayStartParams": head_params,
        "template": {
            "metadata": {"labels": names.labels("head")},
            "spec": {
                "containers": [
                    {
                        "name": "ray-head",
                        "image": opts.image,
                        "env": copy.deepcopy(env),
                        "ports": [
                            {"name": "gcs-server", "containerPort": 6379},
                            {"name": "dashboard", "containerPort": 8265},
                            {"name": "client", "containerPort": 10001},
                        ],
                        "resources": _resources(2, 8, 0),
                        "volumeMounts": [{"name": "ledger", "mountPath": mount}],
                        "readinessProbe": _probe(GCS_HEALTH, period_s=5, failures=10),
                        "livenessProbe": _probe(GCS_HEALTH, period_s=10, failures=12),
                    }
                ],
                "volumes": [{"name": "ledger", "persistentVolumeClaim": {"claimName": names.ledger}}],
            },
        },
    }
    ray_service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": names.base, "labels": names.labels()},
        "spec": {
            "upgradeStrategy": {"type": "None"},
            "serveConfigV2": yaml.safe_dump(serve_config(cfg), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": opts.ray_version,
                "enableInTreeAutoscaling": False,
                "authOptions": {"mode": "token"},
                "headGroupSpec": head,
                "workerGroupSpecs": [_worker_group(g, cfg, opts, names, env) for g in groups],
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": names.gateway, "labels": names.labels("gateway")},
        "spec": {
            "type": opts.service_type,
            "selector": names.selector("gateway"),
            "ports": [{"name": "http", "port": cfg.gateway.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    pvc_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOncePod"],
        "resources": {"requests": {"storage": opts.ledger_storage}},
    }
    if opts.storage_class:
        pvc_spec["storageClassName"] = opts.storage_class
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": names.ledger, "labels": names.labels("head")},
        "spec": pvc_spec,
    }
    out = [ray_service, service, pvc]
    if cfg.gateway.internal_host in CLUSTER_HOSTS:
        out.append(_metrics_service(cfg, names))
    if cfg.metering.enabled and admin_key:
        out.append(admin_secret(opts, admin_key))
    return out


def _metrics_service(cfg: TokenweirConfig, names: _Names) -> dict[str, Any]:
    """The operator's listener of the gateway pods as one Service: what Prometheus scrapes, once
    for the whole fleet (deploy/prometheus/kubernetes: any gateway's /metrics covers every replica)."""
    port = cfg.gateway.internal_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": f"{names.base}-metrics",
            "labels": {
                "app.kubernetes.io/name": "tokenweir-metrics",
                "app.kubernetes.io/part-of": "tokenweir",
            },
        },
        "spec": {
            "type": "ClusterIP",
            "selector": names.selector("gateway"),
            "ports": [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }


def admin_secret(opts: RenderOptions, admin_key: str) -> dict[str, Any]:
    """The Secret every Ray container reads the admin key from."""
    names = _Names(opts.name)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": names.admin, "labels": names.labels()},
        "type": "Opaque",
        "stringData": {ADMIN_KEY_ITEM: admin_key},
    }


class _Names:
    def __init__(self, base: str) -> None:
        self.base = base
        self.gateway = f"{base}-gateway"
        self.ledger = f"{base}-ledger"
        self.admin = f"{base}-admin"
        self.hf_token = f"{base}-hf-token"
        self.ledger_dsn = f"{base}-ledger-dsn"

    def selector(self, role: str) -> dict[str, str]:
        return {"app.kubernetes.io/instance": self.base, ROLE_LABEL: role}

    def labels(self, role: str | None = None) -> dict[str, str]:
        out = {"app.kubernetes.io/name": "tokenweir", "app.kubernetes.io/instance": self.base}
        if role == "gateway":  # what deploy/prometheus/kubernetes/servicemonitor.yaml selects
            out[GATEWAY_LABEL] = "true"
        return out | ({ROLE_LABEL: role} if role else {})


def _env(cfg: TokenweirConfig, names: _Names) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # Weights of gated models (Llama) come from the Hugging Face hub with a token, if this Secret exists.
        {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": names.hf_token, "key": "token", "optional": True}},
        },
    ]
    if cfg.metering.enabled:
        env.append(
            {
                "name": cfg.metering.admin_key_env,
                "valueFrom": {"secretKeyRef": {"name": names.admin, "key": ADMIN_KEY_ITEM}},
            }
        )
        if cfg.metering.store == "postgres" and cfg.metering.postgres_dsn is None:
            # The ledger may restart on any node: every Ray container gets the DSN, from a Secret the
            # operator creates (`kubectl create secret generic <name>-ledger-dsn --from-literal=dsn=...`).
            env.append(
                {
                    "name": cfg.metering.postgres_dsn_env,
                    "valueFrom": {"secretKeyRef": {"name": names.ledger_dsn, "key": LEDGER_DSN_ITEM}},
                }
            )
    return env


def _worker_group(
    g: NodeGroup, cfg: TokenweirConfig, opts: RenderOptions, names: _Names, env: list[dict[str, Any]]
) -> dict[str, Any]:
    role = "gateway" if g.accelerator is None else "pool"
    params = {"resources": ray_start_resources(g.ray_resources)} if g.ray_resources else {}
    container: dict[str, Any] = {"name": "ray-worker", "image": opts.image, "env": copy.deepcopy(env)}
    spec: dict[str, Any] = {"containers": [container]}
    if role == "gateway":
        container["resources"] = _resources(max(2, int(cfg.gateway.num_cpus) + 1), 8, 0)
        container["ports"] = [{"name": "http", "containerPort": cfg.gateway.port}]
        if cfg.gateway.internal_host in CLUSTER_HOSTS:  # else it listens on the pod's loopback only
            container["ports"].append({"name": "metrics", "containerPort": cfg.gateway.internal_port})
        http = {"path": "/healthz", "port": "http"}
        # Until Serve has placed this pod's gateway (after the head, with the pools), /healthz is
        # refused: the startup probe holds liveness off meanwhile instead of restarting the pod.
        container["startupProbe"] = _probe(http, period_s=10, failures=180)
        container["livenessProbe"] = _probe(http, period_s=10, failures=6)
        container["readinessProbe"] = _probe({"path": "/readyz", "port": "http"}, period_s=5, failures=2)
    else:
        if g.needs_gpu:
            params["num-gpus"] = str(g.gpus_per_node)
            cpus, mem_gib = opts.cpus_per_gpu * g.gpus_per_node, opts.memory_gib_per_gpu * g.gpus_per_node
            spec["nodeSelector"] = {"nvidia.com/gpu.product": GPU_PRODUCT_LABELS[str(g.accelerator)]}
            spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            # vLLM's workers (tensor parallel, NCCL) share tensors through /dev/shm.
            container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
            spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
        elif g.accelerator == "CPU":
            cpus, mem_gib = 8, 32
        else:  # simulated pools: the performance model on a few cores
            cpus, mem_gib = 2, 8
        container["resources"] = _resources(cpus, mem_gib, g.gpus_per_node)
        # Written out so KubeRay adds none of its own: in a RayService it would also ask Serve's proxy,
        # which Tokenweir does not run.
        container["readinessProbe"] = _probe(RAYLET_HEALTH, period_s=5, failures=10)
        container["livenessProbe"] = _probe(RAYLET_HEALTH, period_s=10, failures=12)
    return {
        "groupName": g.name,
        "replicas": g.nodes,
        "minReplicas": g.nodes,
        "maxReplicas": g.nodes,
        "rayStartParams": params,
        "template": {"metadata": {"labels": names.labels(role)}, "spec": spec},
    }


def _resources(cpus: int, memory_gib: int, gpus: int) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _probe(http_get: dict[str, Any], *, period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": dict(http_get),
        "periodSeconds": period_s,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }
