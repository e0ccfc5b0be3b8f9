"""Configuration: the typed YAML file (:mod:`.schema`, :mod:`.loader`) and the deployment resolved
from it with the model catalog and the hardware plan (:mod:`.resolved`)."""

from serving.config.loader import DEFAULT_CONFIG_PATH, ConfigError, load_config, parse_config
from serving.config.resolved import ResolvedDeployment, ResolvedModel, ResolvedPool, resolve
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
    "ResolvedDeployment",
    "ResolvedModel",
    "ResolvedPool",
    "SloConfig",
    "TokenweirConfig",
    "load_config",
    "parse_config",
    "resolve",
]
