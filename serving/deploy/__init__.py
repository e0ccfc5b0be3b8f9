"""Deployment files rendered from one resolved Tokenweir config (``tokenweir deploy render``).

- :func:`serve_config`: a Ray Serve config (``serve deploy`` / ``serve run``) for an existing
  cluster, whose application is built by ``serving.app:app_builder`` from the embedded config;
- :func:`kuberay_manifests`: a KubeRay ``RayService`` (a worker group per accelerator type, the
  ledger on the head's volume, Ray token auth, an in-place upgrade strategy) with the gateways'
  ``Service``, the ledger's ``PersistentVolumeClaim`` and the admin key's ``Secret``;
- :func:`cluster_launcher`: a Ray cluster launcher config (``ray up``), a node type per
  accelerator type.

Pure functions from ``(config, resolved deployment, options)`` to plain dicts: no file is read or
written here and nothing imports Ray; ``serving.cli._deploy`` is the shell that writes the files.
"""

from serving.deploy._common import (
    APP_BUILDER,
    APP_NAME,
    GPU_PRODUCT_LABELS,
    NodeGroup,
    RenderOptions,
    embedded_config,
    machines_for,
    node_groups,
    ray_start_resources,
)
from serving.deploy._kuberay import ADMIN_KEY_ITEM, GATEWAY_LABEL, ROLE_LABEL, admin_secret, kuberay_manifests
from serving.deploy._launcher import AWS_GPU_INSTANCES, cluster_launcher
from serving.deploy._serve import serve_config

__all__ = [
    "ADMIN_KEY_ITEM",
    "APP_BUILDER",
    "APP_NAME",
    "AWS_GPU_INSTANCES",
    "GATEWAY_LABEL",
    "GPU_PRODUCT_LABELS",
    "ROLE_LABEL",
    "NodeGroup",
    "RenderOptions",
    "admin_secret",
    "cluster_launcher",
    "embedded_config",
    "kuberay_manifests",
    "machines_for",
    "node_groups",
    "ray_start_resources",
    "serve_config",
]
