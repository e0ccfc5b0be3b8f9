"""Prometheus metrics: plain-data stats in, one complete ``/metrics`` exposition out."""

from serving.metrics.exporter import BoardCollector, GatewayStats, render

__all__ = ["BoardCollector", "GatewayStats", "render"]
