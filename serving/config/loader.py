"""Read and validate the YAML configuration; errors name the field and the bad value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from serving.config.schema import TokenweirConfig
from serving.errors import validation_message

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "deploy" / "local.yaml"


class ConfigError(ValueError):
    """The configuration file is missing, unparsable or invalid."""


def load_config(path: str | Path | None = None) -> TokenweirConfig:
    """Load ``path`` (default: the embedded ``deploy/local.yaml``)."""
    p = Path(path) if path else DEFAULT_CONFIG_PATH
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {p}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    return parse_config(raw or {}, source=str(p))


def parse_config(raw: dict[str, Any], source: str = "<config>") -> TokenweirConfig:
    """Validate an already-parsed mapping."""
    try:
        return TokenweirConfig.model_validate(raw)
    except ValidationError as e:
        lines = [validation_message(err, show_input=True)[0] for err in e.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from e
