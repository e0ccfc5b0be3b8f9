"""``tokenweir deploy render``: the deployment files of one config, written to a directory.

The shell around :mod:`serving.deploy`: load and resolve the config as ``tokenweir serve`` does,
pick up (or create) the admin key, call the pure renderer of the target, write YAML with a header
that says how to apply it. Secrets go to their own 0600 files, never into the manifests.
"""

from __future__ import annotations

import enum
import os
import secrets
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from serving.cli._tenancy import ConfigOpt
from serving.config import ConfigError, TokenweirConfig, load_config, resolve

deploy_app = typer.Typer(help="Deployment files for Ray clusters and Kubernetes.", no_args_is_help=True)


class Target(enum.StrEnum):
    serve = "serve"
    kuberay = "kuberay"
    cluster_launcher = "cluster-launcher"


HEADERS = {
    "serve.yaml": """\
Ray Serve config for an existing Ray cluster: `serve deploy serve.yaml` (or `serve run serve.yaml`).
The application is built on the cluster by serving.app:app_builder from the Tokenweir config under
`args`; every node needs Tokenweir installed. Serve's proxy is off: the gateways serve HTTP themselves
on gateway.host:gateway.port.""",
    "tokenweir.yaml": """\
KubeRay RayService (Ray {ray}), the gateways' Service and the ledger's PersistentVolumeClaim:
`kubectl apply -f {out}/` (with admin-secret.yaml beside it).
Upgrade strategy: None. A changed serveConfigV2 is applied in place; KubeRay's NewCluster would start
a second head, and a second SQLite ledger, while the first head still mounts the ledger's volume.
To change the cluster itself (image, worker groups): `kubectl delete rayservice {name}`, wait for the
head pod to go, then apply. The volume is ReadWriteOncePod, so a second head could not mount it
anyway. Zero-downtime cluster upgrades need a ledger both clusters share: PostgreSQL.
Ray token auth: authOptions.mode=token (KubeRay creates the token Secret). Clients reach the
gateways through Service {name}-gateway, port {port}; KubeRay's {name}-serve-svc stays empty.""",
    "admin-secret.yaml": """\
The admin key of Tokenweir's admin API (`tokenweir tenants ... --url`), read by every Ray container.
Keep this file out of version control; the same key is in admin_key.""",
    "cluster.yaml": """\
Ray cluster launcher config: `ray get-auth-token --generate` (once), then `ray up cluster.yaml`,
then `ray exec cluster.yaml 'serve deploy ~/tokenweir/serve.yaml'`. `ray up` copies serve.yaml,
admin_key and your ~/.ray/auth_token to every node. One node type per accelerator type.""",
}


@deploy_app.command("render")
def render(
    target: Annotated[Target, typer.Option(help="Which files: serve, kuberay or cluster-launcher.")],
    out: Annotated[Path, typer.Option(help="Directory to write them to (created).")],
    config: ConfigOpt = None,
    name: Annotated[
        str, typer.Option(help="RayService / cluster name, prefix of every object.")
    ] = "tokenweir",
    image: Annotated[
        str | None,
        typer.Option(help="Image of every Ray node (Ray + Tokenweir); default tokenweir:<version>."),
    ] = None,
    ledger_storage: Annotated[str, typer.Option(help="kuberay: size of the ledger's volume.")] = "10Gi",
    storage_class: Annotated[
        str | None, typer.Option(help="kuberay: StorageClass of the ledger's volume.")
    ] = None,
    service_type: Annotated[
        str, typer.Option(help="kuberay: ClusterIP, NodePort or LoadBalancer.")
    ] = "ClusterIP",
    region: Annotated[str, typer.Option(help="cluster-launcher: AWS region.")] = "us-west-2",
    instance_type: Annotated[
        list[str] | None,
        typer.Option(help="cluster-launcher: TYPE=INSTANCE:GPUS for an accelerator type (repeatable)."),
    ] = None,
) -> None:
    """Render the deployment files of a config for a Ray cluster, KubeRay or the cluster launcher."""
    from serving.deploy import (
        RenderOptions,
        cluster_launcher,
        kuberay_manifests,
        serve_config,
    )

    cfg = load_config(config)
    deployment = resolve(cfg)
    if service_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise ConfigError(f"--service-type {service_type!r}: ClusterIP, NodePort or LoadBalancer")
    opts = RenderOptions(
        name=name,
        image=image or f"tokenweir:{_version('tokenweir')}",
        ray_version=_version("ray"),
        ledger_storage=ledger_storage,
        storage_class=storage_class,
        service_type=service_type,  # type: ignore[arg-type]
        region=region,
        instance_types=dict(_instance_type(s) for s in instance_type or []),
    )
    key = _admin_key(cfg, out) if cfg.metering.enabled and target is not Target.serve else None
    # Render everything first: a refused config leaves the directory as it was.
    files: list[tuple[str, list[dict[str, Any]], str | None]] = []
    if target is Target.serve:
        files.append(("serve.yaml", [serve_config(cfg)], None))
    elif target is Target.kuberay:
        docs = kuberay_manifests(cfg, deployment, opts, key)
        about = HEADERS["tokenweir.yaml"].format(
            ray=opts.ray_version, out=out, name=name, port=cfg.gateway.port
        )
        files.append(("tokenweir.yaml", [d for d in docs if d["kind"] != "Secret"], about))
        if secret := [d for d in docs if d["kind"] == "Secret"]:
            files.append(("admin-secret.yaml", secret, None))
    else:
        launcher = cluster_launcher(cfg, deployment, opts, str(out.resolve()), with_admin_key=key is not None)
        files += [("cluster.yaml", [launcher], None), ("serve.yaml", [serve_config(cfg)], None)]
    out.mkdir(parents=True, exist_ok=True)
    if key is not None:
        _private_write(out / "admin_key", key + "\n")
    for filename, contents, header in files:
        print(_write(out, filename, contents, header, private=filename in PRIVATE_FILES))
    if cfg.gateway.host not in ("node", "0.0.0.0", "::"):
        print(f"note: gateway.host is {cfg.gateway.host}: each gateway is reachable on that address only")


PRIVATE_FILES = frozenset({"admin-secret.yaml"})
"""Files holding a secret: written 0600."""


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "0.1.0" if dist == "tokenweir" else "2.60.0"


def _instance_type(spec: str) -> tuple[str, tuple[str, int]]:
    gpu, _, rest = spec.partition("=")
    instance, _, gpus = rest.rpartition(":")
    if not (gpu and instance and gpus.isdigit() and int(gpus) > 0):
        raise ConfigError(f"--instance-type {spec!r}: expected TYPE=INSTANCE:GPUS, e.g. L20=gn8is.8xlarge:8")
    return gpu, (instance, int(gpus))


def _admin_key(cfg: TokenweirConfig, out: Path) -> str:
    """The admin key: from the environment, else the one an earlier render left in ``out``, else
    a new one (kept in ``out/admin_key``, 0600, so a re-render does not rotate it)."""
    path = out / "admin_key"
    key = os.environ.get(cfg.metering.admin_key_env) or (path.read_text().strip() if path.exists() else "")
    return key or "tw-admin-" + secrets.token_urlsafe(32)


def _write(
    out: Path, filename: str, docs: list[dict[str, Any]], header: str | None = None, *, private: bool = False
) -> Path:
    head = header if header is not None else HEADERS[filename]
    text = "".join(f"# {line}".rstrip() + "\n" for line in head.splitlines())
    text += "\n---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False) for d in docs)
    path = out / filename
    if private:
        _private_write(path, text)
    else:
        path.write_text(text)
    return path


def _private_write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (a RayService's embedded Serve config) as YAML block scalars; no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)
