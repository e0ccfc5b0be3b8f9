"""``tokenweir deploy render``: the files are valid to the tools that read them, and they mean what
the config says.

Validity: the Serve config is loaded by Ray's own ``ServeDeploySchema``; the RayService (and its
cluster spec as a RayCluster) against KubeRay's CRD schemas (tests/data/kuberay, strict: no field
a schema does not declare); the Service, PersistentVolumeClaim, Secret and every pod template
against the ``kubernetes`` client's models (no unknown field, required fields present); the
cluster launcher config against Ray's ``ray-schema.json`` and Ray's own config preparation.

Meaning: the Serve application is built by the importable builder into the same app as
``tokenweir serve`` builds; every pool's accelerator type has a worker group that advertises the
resource the pool is pinned to, on nodes labelled with that card; the Service, ports and probes
point at Tokenweir's own listener, not Serve's proxy; the ledger's volume is on the head only.
"""

from __future__ import annotations

import copy
import importlib
import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes.client.models as k8s
import pytest
import yaml

from serving.cli import main as tokenweir
from serving.config import ConfigError, TokenweirConfig, load_config, parse_config, resolve
from serving.deploy import (
    APP_BUILDER,
    APP_NAME,
    GPU_PRODUCT_LABELS,
    RenderOptions,
    cluster_launcher,
    kuberay_manifests,
    machines_for,
    serve_config,
)
from serving.hardware import CATALOG

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "tests" / "data" / "kuberay"
ADMIN_KEY = "tw-admin-render-" + "k" * 24
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

FLEET = {
    "gateway": {
        "host": "node",
        "internal_host": "node",
        "port": 8080,  # not Serve's 8000: a port taken from Serve's defaults would not pass by luck
        "replicas": 3,
        "node_resource": "tokenweir_gateway",
    },
    "ray": {"address": "auto"},
    "state_dir": "~/tokenweir-state",
    "models": {"llama-3.1-8b-instruct": {"tokenizer": "builtin:tiny-llama"}},
    "pools": [
        {"name": "h100", "model": "llama-3.1-8b-instruct", "accelerator": "H100", "replicas": 3},
        {
            "name": "h100-tp2",
            "model": "llama-3.1-8b-instruct",
            "accelerator": "H100",
            "replicas": 1,
            "gpus_per_replica": 2,
        },
        {"name": "l20", "model": "llama-3.1-8b-instruct", "accelerator": "L20", "replicas": 4},
        {"name": "h200", "model": "llama-3.1-8b-instruct", "accelerator": "H200", "replicas": 1},
        {
            "name": "a10-sim",
            "model": "llama-3.1-8b-instruct",
            "accelerator": "A10",
            "engine": "sim",
            "replicas": 6,
        },
        {"name": "tiny", "model": "tiny-llama", "accelerator": "CPU"},
    ],
}


@pytest.fixture(scope="module")
def cfg() -> TokenweirConfig:
    return parse_config(copy.deepcopy(FLEET))


@pytest.fixture(scope="module")
def rendered(cfg: TokenweirConfig) -> dict[str, Any]:
    docs = kuberay_manifests(cfg, resolve(cfg), RenderOptions(), ADMIN_KEY)
    by_kind = {d["kind"]: d for d in docs if d["kind"] != "Service"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert set(services) == {"tokenweir-gateway", "tokenweir-metrics"}
    return by_kind | {
        "Service": services["tokenweir-gateway"],
        "MetricsService": services["tokenweir-metrics"],
    }


# ----------------------------------------------------------------------------- validators
def _strict(schema: Any) -> Any:
    """A CRD's OpenAPI schema as the API server applies it with strict field validation: an object
    that declares its properties takes no others (unless it preserves unknown fields)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_validator(filename: str) -> jsonschema.Validator:
    crd = yaml.load((CRDS / filename).read_text(), Loader=_Loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def rayservice_schema() -> jsonschema.Validator:
    return _crd_validator("ray.io_rayservices.yaml")


@pytest.fixture(scope="module")
def raycluster_schema() -> jsonschema.Validator:
    return _crd_validator("ray.io_rayclusters.yaml")


def k8s_model(data: Any, type_name: str, path: str = "") -> Any:
    """``data`` built into the kubernetes client's model ``type_name``, refusing what the model
    does not know (a misspelt field would otherwise be dropped silently) and wrong value types; the
    models' constructors refuse missing required fields."""
    if type_name.startswith("List["):
        assert isinstance(data, list), f"{path}: expected a list, got {data!r}"
        return [k8s_model(x, type_name[5:-1], f"{path}[{i}]") for i, x in enumerate(data)]
    if type_name.startswith("Dict[str, "):
        assert isinstance(data, dict), f"{path}: expected a mapping, got {data!r}"
        inner = type_name[len("Dict[str, ") : -1]
        return {k: k8s_model(v, inner, f"{path}.{k}") for k, v in data.items()}
    scalar = {"str": str, "bool": bool, "float": (int, float), "datetime": str, "bytes": str}
    if type_name == "object":
        return data
    if type_name == "int":
        assert isinstance(data, int) and not isinstance(data, bool), f"{path}: expected an int, got {data!r}"
        return data
    if type_name in scalar:
        assert isinstance(data, scalar[type_name]), f"{path}: expected {type_name}, got {data!r}"
        return data
    cls = getattr(k8s, type_name)
    assert isinstance(data, dict), f"{path}: expected a {type_name} mapping, got {data!r}"
    python_names = {wire: py for py, wire in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(python_names))
    assert not unknown, f"{path}: {type_name} has no fields {unknown}"
    return cls(
        **{
            python_names[k]: k8s_model(v, cls.openapi_types[python_names[k]], f"{path}.{k}")
            for k, v in data.items()
        }
    )


def _pod_templates(rs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rs["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    out |= {g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}
    return out


def _groups(rs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def _advertised(group: dict[str, Any]) -> dict[str, float]:
    """What the group's ``ray start`` advertises: its ``--resources`` (unquoted as the shell
    KubeRay pastes it into would) and its GPUs."""
    params = group["rayStartParams"]
    out: dict[str, float] = {}
    if "resources" in params:
        (arg,) = shlex.split(params["resources"])
        out |= json.loads(arg)
    if "num-gpus" in params:
        out["GPU"] = float(params["num-gpus"])
    return out


def _pins(actor_options: dict[str, Any]) -> dict[str, float]:
    """The resources a replica with these Ray actor options needs on its node."""
    need = dict(actor_options.get("resources", {}))
    if "accelerator_type" in actor_options:
        need[f"accelerator_type:{actor_options['accelerator_type']}"] = 0.001
    if actor_options.get("num_gpus"):
        need["GPU"] = actor_options["num_gpus"]
    return need


# ----------------------------------------------------------------------------- Serve config
def test_serve_config_loads_in_rays_schema_and_builds_the_same_app(cfg: TokenweirConfig) -> None:
    from ray.serve.schema import ServeDeploySchema

    import serving.app

    rendered = serve_config(cfg)
    schema = ServeDeploySchema.model_validate(rendered)
    (app,) = schema.applications
    assert schema.proxy_location.value == "Disabled"  # the gateways serve HTTP themselves
    assert app.route_prefix is None and app.name == APP_NAME == serving.app.APP_NAME
    assert parse_config(app.args) == cfg  # the embedded config is the config, as written

    module, _, attr = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert app.import_path == APP_BUILDER and builder is serving.app.app_builder
    ours, direct = builder(app.args), serving.app.build_app(cfg)

    def shape(a: Any) -> Any:
        d = a._bound_deployment
        pools = {k: shape(v) for k, v in d.init_args[1].items()} if d.name == "gateway" else None
        return (d.name, d.num_replicas, d.max_ongoing_requests, d.ray_actor_options, pools)

    assert shape(ours) == shape(direct)
    assert (
        ours._bound_deployment.init_args[0] == direct._bound_deployment.init_args[0]
    )  # same resolved deployment
    # Gateways are pinned to the nodes advertising gateway.node_resource, one replica per unit.
    assert ours._bound_deployment.ray_actor_options["resources"] == {"tokenweir_gateway": 1}


def test_serve_builder_pins_every_pool_even_without_ray_address(cfg: TokenweirConfig) -> None:
    """A Serve config is deployed onto an existing cluster: the builder pins simulated and CPU pools
    to their type's nodes whether or not the embedded config sets ``ray.address``."""
    import serving.app

    raw = copy.deepcopy(FLEET)
    del raw["ray"]
    app = serving.app.app_builder(serve_config(parse_config(raw))["applications"][0]["args"])
    pools = app._bound_deployment.init_args[1]
    options = {name: h._bound_deployment.ray_actor_options for name, h in pools.items()}
    assert _pins(options["a10-sim"]) == {"accelerator_type:A10": 0.001}
    assert _pins(options["tiny"]) == {"accelerator_type:CPU": 0.001}
    assert _pins(options["h100"]) == {"accelerator_type:H100": 0.001, "GPU": 1}


def test_serve_builder_reports_a_bad_config_by_field() -> None:
    import serving.app

    with pytest.raises(ConfigError, match=r"pools\.0\.replicas"):
        serving.app.app_builder({"pools": [{"name": "a", "model": "tiny-llama", "replicas": 0}]})


def test_admin_key_never_goes_into_a_rendered_file() -> None:
    raw = copy.deepcopy(FLEET) | {"metering": {"admin_key": ADMIN_KEY}}
    with pytest.raises(ConfigError, match="admin_key"):
        serve_config(parse_config(raw))


# ----------------------------------------------------------------------------- KubeRay
def test_rayservice_is_valid_to_kuberays_crds(
    rendered: dict[str, Any], rayservice_schema: jsonschema.Validator, raycluster_schema: jsonschema.Validator
) -> None:
    rs = rendered["RayService"]
    errors = sorted(rayservice_schema.iter_errors(rs), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"}}
    cluster["spec"] = rs["spec"]["rayClusterConfig"]
    errors = sorted(raycluster_schema.iter_errors(cluster), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]


def test_the_strict_crd_check_catches_a_misspelt_field(
    rendered: dict[str, Any], rayservice_schema: jsonschema.Validator
) -> None:
    bad = copy.deepcopy(rendered["RayService"])
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["nodeSelecter"] = {}
    assert any("nodeSelecter" in e.message for e in rayservice_schema.iter_errors(bad))
    bad = copy.deepcopy(rendered["RayService"])
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "2"
    assert not rayservice_schema.is_valid(bad)


def test_core_objects_and_pod_templates_are_valid_kubernetes_models(rendered: dict[str, Any]) -> None:
    k8s_model(rendered["MetricsService"], "V1Service")
    svc = k8s_model(rendered["Service"], "V1Service")
    pvc = k8s_model(rendered["PersistentVolumeClaim"], "V1PersistentVolumeClaim")
    secret = k8s_model(rendered["Secret"], "V1Secret")
    assert (svc.kind, pvc.kind, secret.kind) == ("Service", "PersistentVolumeClaim", "Secret")
    for name, template in _pod_templates(rendered["RayService"]).items():
        k8s_model(template, "V1PodTemplateSpec", name)
    with pytest.raises(AssertionError, match="targetPrt"):  # the check is not a formality
        k8s_model({"port": 1, "targetPrt": 2}, "V1ServicePort")
    with pytest.raises(ValueError, match="port"):
        k8s_model({"name": "http"}, "V1ServicePort")


def test_every_pool_has_a_worker_group_of_its_gpu_type(
    cfg: TokenweirConfig, rendered: dict[str, Any]
) -> None:
    rs = rendered["RayService"]
    groups = _groups(rs)
    deployment = resolve(cfg)
    for pool in deployment.pools:
        pin = pool.gpu.ray_resource
        mine = [g for g in groups.values() if pin and pin in _advertised(g)] if pin else [groups["cpu"]]
        assert len(mine) == 1, (pool.name, list(groups))
        (group,) = mine
        # The resources the pool's replicas are pinned with today are all advertised by its group.
        need = _pins(pool.ray_actor_options)
        have = _advertised(group)
        assert all(have.get(r, 0) >= amount for r, amount in need.items()), (pool.name, need, have)
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        if pool.engine == "vllm" and pool.accelerator != "CPU":
            assert spec["nodeSelector"] == {"nvidia.com/gpu.product": GPU_PRODUCT_LABELS[pool.accelerator]}
            gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
            assert gpus == have["GPU"] >= pool.gpus_per_replica
        else:  # simulated and CPU pools ask for no GPU node
            assert "nodeSelector" not in spec and "nvidia.com/gpu" not in container["resources"]["limits"]
    # The label values NVIDIA's GPU feature discovery puts on nodes with these cards.
    selectors = {g: s["spec"].get("nodeSelector") for g, s in _pod_templates(rs).items()}
    assert selectors["gpu-h100"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert selectors["gpu-l20"] == {"nvidia.com/gpu.product": "NVIDIA-L20"}
    assert selectors["gpu-h200"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    # H100: three 1-GPU replicas and one 2-GPU replica on 2-GPU pods. Three pods would do if Ray
    # packed them, but Serve spreads replicas: one 1-GPU replica on each of three pods leaves no room
    # for the 2-GPU one. Four pods hold them whatever Ray picks.
    assert (groups["gpu-h100"]["replicas"], _advertised(groups["gpu-h100"])["GPU"]) == (4, 2)
    assert groups["gpu-l20"]["replicas"] == 4 and groups["sim-a10"]["replicas"] == 1
    assert all(g["minReplicas"] == g["replicas"] == g["maxReplicas"] for g in groups.values())


@pytest.mark.parametrize(
    ("sizes", "per_node", "machines"),
    [
        ([1] * 16, 8, 2),
        ([1] * 17, 8, 3),
        ([8, 8], 8, 2),
        ([2, 1, 1, 1], 2, 4),
        ([2, 1, 1, 1], 8, 1),
        ([4, 1, 1, 1, 1, 1], 4, 6),
    ],
)
def test_machines_hold_the_replicas_however_ray_places_them(
    sizes: list[int], per_node: int, machines: int
) -> None:
    assert machines_for(sizes, per_node) == machines

    # Brute force: every order of placing onto any machine with room, adversarially, still fits.
    def fits(left: tuple[int, ...], free: tuple[int, ...]) -> bool:
        if not left:
            return True
        s, rest = left[0], left[1:]
        options = [i for i, f in enumerate(free) if f >= s]
        return bool(options) and all(fits(rest, (*free[:i], free[i] - s, *free[i + 1 :])) for i in options)

    if len(sizes) <= 8:
        assert fits(tuple(sizes), (per_node,) * machines)
        assert machines == 1 or not all(
            fits(tuple(order), (per_node,) * (machines - 1)) for order in [sizes, sizes[::-1]]
        )


def test_every_gpu_type_of_the_catalog_has_a_real_product_label() -> None:
    assert set(GPU_PRODUCT_LABELS) == set(CATALOG) - {"CPU"}
    assert all(v.startswith("NVIDIA-") and " " not in v for v in GPU_PRODUCT_LABELS.values())


def test_the_service_ports_and_probes_point_at_tokenweirs_listener(
    cfg: TokenweirConfig, rendered: dict[str, Any]
) -> None:
    svc, rs = rendered["Service"], rendered["RayService"]
    templates = _pod_templates(rs)
    behind = [
        g for g, t in templates.items() if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()
    ]
    assert behind == ["gateway"]  # only gateway pods, never a GPU pod or the head
    gateway = _groups(rs)["gateway"]
    assert gateway["replicas"] == cfg.gateway.replicas
    assert _advertised(gateway) == {"tokenweir_gateway": 1}  # one gateway replica per pod
    (container,) = templates["gateway"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (port,) = svc["spec"]["ports"]
    assert port["port"] == cfg.gateway.port and ports[port["targetPort"]] == cfg.gateway.port == 8080
    assert ports["metrics"] == cfg.gateway.internal_port  # internal_host: node, so Prometheus can scrape
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        get = container[probe]["httpGet"]
        assert get["path"] == path and ports[get["port"]] == cfg.gateway.port, probe
    # Serve's proxy is off, so no probe anywhere may wait on it (KubeRay's own RayService probes do).
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert serve == serve_config(cfg) and serve["proxy_location"] == "Disabled"
    for name, t in templates.items():
        for c in t["spec"]["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in c, (name, probe)  # written out, so KubeRay injects none
                assert c[probe]["httpGet"]["port"] != 8000, (name, probe)


def test_prometheus_scrapes_the_gateways_operator_listener(
    cfg: TokenweirConfig, rendered: dict[str, Any]
) -> None:
    metrics, rs = rendered["MetricsService"], rendered["RayService"]
    templates = _pod_templates(rs)
    selected = [
        g
        for g, t in templates.items()
        if metrics["spec"]["selector"].items() <= t["metadata"]["labels"].items()
    ]
    assert selected == ["gateway"]
    (container,) = templates["gateway"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (port,) = metrics["spec"]["ports"]
    assert ports[port["targetPort"]] == port["port"] == cfg.gateway.internal_port
    # The Prometheus Operator's files (deploy/prometheus/kubernetes) find this Service and these pods.
    svc, monitor = yaml.safe_load_all((REPO / "deploy/prometheus/kubernetes/servicemonitor.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert (svc["metadata"]["name"], svc["spec"]["ports"][0]["port"]) == (
        metrics["metadata"]["name"],
        port["port"],
    )
    assert svc["spec"]["selector"].items() <= templates["gateway"]["metadata"]["labels"].items()
    # No metrics Service while the operator's listener is on the pods' loopback.
    raw = copy.deepcopy(FLEET)
    raw["gateway"] = raw["gateway"] | {"internal_host": "127.0.0.1"}
    loopback = parse_config(raw)
    kinds = [d["kind"] for d in kuberay_manifests(loopback, resolve(loopback), RenderOptions(), None)]
    assert kinds == ["RayService", "Service", "PersistentVolumeClaim"]


def test_the_ledger_lives_on_the_heads_volume(cfg: TokenweirConfig, rendered: dict[str, Any]) -> None:
    rs, pvc = rendered["RayService"], rendered["PersistentVolumeClaim"]
    templates = _pod_templates(rs)
    claims = {
        g: [v for v in t["spec"].get("volumes", []) if "persistentVolumeClaim" in v]
        for g, t in templates.items()
    }
    assert {g for g, c in claims.items() if c} == {"head"}
    (volume,) = claims["head"]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    (head,) = templates["head"]["spec"]["containers"]
    (mount,) = [m for m in head["volumeMounts"] if m["name"] == volume["name"]]
    # The ledger opens <state_dir>/ledger.sqlite3 with ~ as the image user's home.
    assert Path(mount["mountPath"]) / cfg.metering.ledger_file == Path(
        "/home/ray/tokenweir-state/ledger.sqlite3"
    )
    assert pvc["spec"]["accessModes"] == ["ReadWriteOncePod"]  # one pod at a time: never two ledgers
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert rs["spec"]["upgradeStrategy"] == {"type": "None"}  # in place: no second cluster, no second ledger


def test_a_postgres_ledger_reads_its_dsn_from_a_secret_in_every_ray_container() -> None:
    pg = parse_config(copy.deepcopy(FLEET) | {"metering": {"store": "postgres"}})
    (rs, *_) = kuberay_manifests(pg, resolve(pg), RenderOptions(), None)
    containers = [rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in _groups(rs).values()]
    for c in containers:
        dsn = [e for e in c["env"] if e["name"] == "TOKENWEIR_LEDGER_DSN"]
        assert dsn == [
            {
                "name": "TOKENWEIR_LEDGER_DSN",
                "valueFrom": {"secretKeyRef": {"name": "tokenweir-ledger-dsn", "key": "dsn"}},
            }
        ]


def test_the_ledger_is_pinned_to_the_head_that_holds_its_volume(cfg: TokenweirConfig) -> None:
    """Default: Ray's own head resource pins the ledger actor (nothing to advertise). A custom
    ``metering.ledger_node_resource`` is advertised by the head and by no other group, in both the
    RayService and the cluster launcher; one node's address resource cannot be rendered."""
    from serving.metering import HEAD_NODE_RESOURCE

    assert cfg.metering.ledger_node_resource == HEAD_NODE_RESOURCE == "node:__internal_head__"
    raw = copy.deepcopy(FLEET) | {"metering": {"ledger_node_resource": "tokenweir_ledger"}}
    custom = parse_config(raw)
    (rs, *_) = kuberay_manifests(custom, resolve(custom), RenderOptions(), None)
    head_params = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert _advertised({"rayStartParams": head_params}) == {"tokenweir_ledger": 1}
    assert all("tokenweir_ledger" not in _advertised(g) for g in _groups(rs).values())
    opts = RenderOptions(instance_types={"L20": ("gn8is.8xlarge", 8)})
    launcher = cluster_launcher(custom, resolve(custom), opts, "/srv", with_admin_key=False)
    owners = [n for n, t in launcher["available_node_types"].items() if "tokenweir_ledger" in t["resources"]]
    assert owners == ["head"]
    (default_rs, *_) = kuberay_manifests(cfg, resolve(cfg), RenderOptions(), None)
    assert "resources" not in default_rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    pinned_to_ip = parse_config(
        copy.deepcopy(FLEET) | {"metering": {"ledger_node_resource": "node:10.0.0.5"}}
    )
    with pytest.raises(ConfigError, match="ledger_node_resource"):
        kuberay_manifests(pinned_to_ip, resolve(pinned_to_ip), RenderOptions(), None)
    with pytest.raises(ConfigError, match="ledger_node_resource"):
        parse_config(copy.deepcopy(FLEET) | {"metering": {"ledger_node_resource": "a b"}})


def test_ray_token_auth_and_the_admin_key_come_from_secrets(
    cfg: TokenweirConfig, rendered: dict[str, Any]
) -> None:
    rs, secret = rendered["RayService"], rendered["Secret"]
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    assert ADMIN_KEY not in json.dumps(rs) and secret["stringData"] == {"admin-key": ADMIN_KEY}
    for name, t in _pod_templates(rs).items():
        (c,) = t["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        ref = env[cfg.metering.admin_key_env]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], "admin-key"), name


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"gateway": {"host": "127.0.0.1"}}, "gateway.host"),
        ({"gateway": {"host": "10.0.0.7"}}, "gateway.host"),
        ({"gateway": {"node_resource": None}}, "gateway.node_resource"),
        ({"state_dir": "relative/state"}, "state_dir"),
    ],
)
def test_kuberay_refuses_a_config_that_cannot_work_there(change: dict[str, Any], fragment: str) -> None:
    raw = copy.deepcopy(FLEET)
    for key, value in change.items():
        raw[key] = raw[key] | value if isinstance(value, dict) else value
    cfg = parse_config(raw)
    with pytest.raises(ConfigError, match=fragment):
        kuberay_manifests(cfg, resolve(cfg), RenderOptions(), ADMIN_KEY)


# ----------------------------------------------------------------------------- cluster launcher
@pytest.fixture(scope="module")
def launcher(cfg: TokenweirConfig) -> dict[str, Any]:
    opts = RenderOptions(instance_types={"L20": ("gn8is.8xlarge", 8)})
    return cluster_launcher(cfg, resolve(cfg), opts, "/srv/render", with_admin_key=True)


def test_cluster_launcher_config_is_valid_to_rays_schema_and_config_loader(launcher: dict[str, Any]) -> None:
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    validate_config(prepare_config(copy.deepcopy(launcher)))  # defaults filled in, as `ray up` does
    bad = copy.deepcopy(launcher)
    bad["available_node_types"]["gpu-h100"]["resources"]["accelerator_type:H100"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_cluster_launcher_has_a_node_type_per_gpu_type(
    cfg: TokenweirConfig, launcher: dict[str, Any]
) -> None:
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    assert set(types) == {"head", "gpu-h100", "gpu-l20", "gpu-h200", "sim-a10", "cpu", "gateway"}
    for pool in resolve(cfg).pools:
        need = _pins(pool.ray_actor_options)
        owners = [
            n
            for n, t in types.items()
            if need and all(t["resources"].get(r, 0) >= a for r, a in need.items())
        ]
        assert len(owners) == (1 if need else len(owners)), (pool.name, owners)
    assert types["gpu-h100"]["node_config"] == {"InstanceType": "p5.48xlarge"}
    # 3 one-GPU and 1 two-GPU H100 replicas fit one 8-GPU p5; 4 L20 replicas one 8-GPU instance.
    assert (types["gpu-h100"]["min_workers"], types["gpu-h100"]["resources"]["GPU"]) == (1, 8)
    assert types["gpu-l20"]["node_config"] == {"InstanceType": "gn8is.8xlarge"}
    assert types["gateway"]["resources"] == {"tokenweir_gateway": 1} and types["gateway"]["min_workers"] == 3
    assert launcher["max_workers"] == sum(t["max_workers"] for t in types.values())
    for cmd in (*launcher["head_start_ray_commands"][1:], *launcher["worker_start_ray_commands"][1:]):
        assert "RAY_AUTH_MODE=token" in cmd and f"{cfg.metering.admin_key_env}=" in cmd
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert launcher["file_mounts"]["~/tokenweir/serve.yaml"] == "/srv/render/serve.yaml"
    assert launcher["docker"]["head_run_options"] == ["-v /var/lib/tokenweir:/home/ray/tokenweir-state"]


def test_cluster_launcher_needs_an_instance_type_for_every_vllm_gpu_type(cfg: TokenweirConfig) -> None:
    with pytest.raises(ConfigError, match=r"\['L20'\].*--instance-type"):
        cluster_launcher(cfg, resolve(cfg), RenderOptions(), "/srv", with_admin_key=False)


# ----------------------------------------------------------------------------- the command
def test_render_command_writes_every_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump(FLEET))
    out = tmp_path / "out"
    args = ["deploy", "render", "--config", str(config), "--out", str(out)]
    assert tokenweir([*args, "--target", "kuberay", "--image", "registry.example/tokenweir:1"]) == 0
    docs = list(yaml.safe_load_all((out / "tokenweir.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["RayService", "Service", "PersistentVolumeClaim", "Service"]
    assert "# Upgrade strategy: None." in (out / "tokenweir.yaml").read_text()
    assert docs[0]["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
    (secret,) = yaml.safe_load_all((out / "admin-secret.yaml").read_text())
    key = secret["stringData"]["admin-key"]
    assert (out / "admin_key").read_text().strip() == key and key.startswith("tw-admin-")
    for private in ("admin-secret.yaml", "admin_key"):
        assert (out / private).stat().st_mode & 0o077 == 0, private
    assert tokenweir([*args, "--target", "kuberay"]) == 0  # a re-render keeps the key
    assert next(yaml.safe_load_all((out / "admin-secret.yaml").read_text()))["stringData"]["admin-key"] == key

    assert tokenweir([*args, "--target", "serve"]) == 0
    assert yaml.safe_load((out / "serve.yaml").read_text()) == serve_config(load_config(config))
    launcher_args = [*args, "--target", "cluster-launcher", "--instance-type", "L20=gn8is.8xlarge:8"]
    assert tokenweir(launcher_args) == 0
    launched = yaml.safe_load((out / "cluster.yaml").read_text())
    assert launched["file_mounts"]["~/tokenweir/serve.yaml"] == str(out.resolve() / "serve.yaml")
    assert launched["available_node_types"]["gpu-l20"]["node_config"] == {"InstanceType": "gn8is.8xlarge"}

    capsys.readouterr()
    assert tokenweir([*args, "--target", "cluster-launcher"]) == 2  # L20 has no known instance type
    assert "--instance-type" in capsys.readouterr().err
    refused = tmp_path / "refused"
    assert tokenweir(["deploy", "render", "--target", "kuberay", "--out", str(refused)]) == 2
    assert "gateway.host" in capsys.readouterr().err  # the embedded local config listens on loopback
    assert not refused.exists()  # nothing written, not even the admin key


def test_render_takes_the_admin_key_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump(FLEET))
    monkeypatch.setenv("TOKENWEIR_ADMIN_KEY", ADMIN_KEY)
    assert (
        tokenweir(
            ["deploy", "render", "--config", str(config), "--out", str(tmp_path), "--target", "kuberay"]
        )
        == 0
    )
    assert ADMIN_KEY in (tmp_path / "admin-secret.yaml").read_text()
    assert ADMIN_KEY not in (tmp_path / "tokenweir.yaml").read_text()


def test_shipped_cluster_config_renders_for_every_target(tmp_path: Path) -> None:
    config = REPO / "deploy" / "cluster.yaml"
    for target in ("serve", "kuberay", "cluster-launcher"):
        extra = ["--instance-type", "L20=gn8is.8xlarge:8"] if target == "cluster-launcher" else []
        argv = [
            "deploy",
            "render",
            "--config",
            str(config),
            "--out",
            str(tmp_path),
            "--target",
            target,
            *extra,
        ]
        assert tokenweir(argv) == 0, target


@pytest.mark.parametrize("command", [["deploy"], ["deploy", "render"]])
def test_deploy_commands_have_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert tokenweir([*command, "--help"]) == 0
    assert f"Usage: tokenweir {' '.join(command)}" in " ".join(capsys.readouterr().out.split())


def test_ray_version_default_is_the_pinned_one() -> None:
    from importlib.metadata import version

    assert RenderOptions().ray_version == version("ray")
