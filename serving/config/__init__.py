"""Typed configuration (pydantic, `extra="forbid"`) loaded from one YAML file."""

from serving.config.loader import DEFAULT_CONFIG_PATH, ConfigError, load_config, parse_config
from serving.config.schema import (
    GatewayConfig,
    ModelOverride,
    PoolConfig,
    RayConfig,
    SloConfig,
    TokenweirConfig,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ConfigError",
    "GatewayConfig",
    "ModelOverride",
    "PoolConfig",
    "RayConfig",
    "SloConfig",
    "TokenweirConfig",
    "load_config",
    "parse_config",
]
