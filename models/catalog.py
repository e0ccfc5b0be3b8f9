"""The model catalog: what each served model is, where its weights come from, and its shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

CATALOG_PATH = Path(__file__).resolve().parent / "catalog.yaml"
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


class ModelArchSpec(BaseModel):
    """Architecture facts used for capacity planning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: int = Field(ge=1, description="Total parameter count.")
    layers: int = Field(ge=1, description="Decoder layers.")
    hidden: int = Field(ge=1, description="Hidden size.")
    heads: int = Field(ge=1, description="Attention (query) heads.")
    kv_heads: int = Field(ge=1, description="Key/value heads (GQA).")
    head_dim: int = Field(ge=1, description="Per-head dimension.")
    intermediate: int = Field(ge=1, description="MLP intermediate size.")
    vocab: int = Field(ge=1, description="Vocabulary size.")
    dtype: Literal["float32", "bfloat16", "float16", "fp8"] = Field(description="Weight and KV dtype.")

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of ``dtype``."""
        return _DTYPE_BYTES[self.dtype]


class ModelEntry(BaseModel):
    """One served model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Served model name (the API's `model`).")
    source: str = Field(description="Local path, hub id, or `builtin:tiny-llama`.")
    tokenizer: str | None = Field(default=None, description="Tokenizer source when it differs from `source`.")
    max_model_len: int = Field(ge=16, description="Longest prompt + completion, in tokens.")
    arch: ModelArchSpec = Field(description="Architecture facts for the performance model.")
    engine: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="vLLM engine arguments per accelerator type; `default` applies to all.",
    )

    def engine_args_for(self, gpu_type: str) -> dict[str, Any]:
        """Engine arguments for one accelerator type: ``default`` overlaid by the type's own."""
        return {**self.engine.get("default", {}), **self.engine.get(gpu_type, {})}


def load_catalog(path: Path | None = None) -> dict[str, ModelEntry]:
    """Read the catalog file into entries keyed by served name."""
    raw = yaml.safe_load((path or CATALOG_PATH).read_text()) or {}
    return {name: ModelEntry(name=name, **body) for name, body in (raw.get("models") or {}).items()}


def check_source(source: str) -> str:
    """``source`` as written, once a ``builtin:`` name is known (nothing is built): what a
    resolved deployment carries, so each replica resolves it on its own node (:func:`resolve_source`)."""
    if source.startswith("builtin:"):
        from models.tiny import TINY_MODEL_NAME

        if source != f"builtin:{TINY_MODEL_NAME}":
            raise ValueError(f"unknown builtin model {source!r}")
    return source


def resolve_source(source: str) -> str:
    """The path or hub id that vLLM or the tokenizer loads; builds the tiny model on demand, in this
    machine's cache (a path there means nothing on another node of a cluster)."""
    if check_source(source).startswith("builtin:"):
        from models.tiny import build_tiny_model

        return str(build_tiny_model())
    return source
