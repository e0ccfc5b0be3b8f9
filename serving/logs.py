"""Send Tokenweir's own loggers (``tokenweir.*``) where Ray Serve writes the replica's logs.

Inside a Serve replica only the ``ray.serve`` logger has handlers (the replica's log file under
``/tmp/ray/session_latest/logs/serve/``); other loggers would fall through to Python's last-resort
handler, and with ``RAY_SERVE_LOG_TO_STDERR=0`` their warnings and tracebacks were nowhere.
"""

from __future__ import annotations

import logging

__all__ = ["route_logs_to_serve"]


def route_logs_to_serve(level: int = logging.INFO) -> None:
    """Give the ``tokenweir`` logger the handlers of Serve's replica logger (call in a replica)."""
    ours, serve = logging.getLogger("tokenweir"), logging.getLogger("ray.serve")
    for h in serve.handlers:
        if h not in ours.handlers:
            ours.addHandler(h)
    if serve.handlers:
        ours.setLevel(level)
        ours.propagate = False
