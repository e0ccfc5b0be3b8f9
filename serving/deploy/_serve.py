"""The Ray Serve config file (``serve deploy`` / ``serve run`` / a RayService's ``serveConfigV2``)."""

from __future__ import annotations

from typing import Any

from serving.config import TokenweirConfig

from ._common import APP_BUILDER, APP_NAME, embedded_config


def serve_config(cfg: TokenweirConfig) -> dict[str, Any]:
    """One application, built on the cluster by :data:`APP_BUILDER` from the embedded config, as
    ``tokenweir serve`` builds it (``serving.app.build_app``).

    Serve's HTTP proxy is off (``proxy_location: Disabled``) and the application has no route:
    the gateway replicas serve HTTP themselves on ``gateway.host:gateway.port``, which is what a
    load balancer, a Service and a probe must point at.
    """
    return {
        "proxy_location": "Disabled",
        "applications": [
            {
                "name": APP_NAME,
                "import_path": APP_BUILDER,
                "route_prefix": None,
                "args": embedded_config(cfg),
            }
        ],
    }
