"""A request as it moves through the gateway: prepared (validated, tokenized, budgeted) and its
outcome (what it produced, for settlement). Below both the service and dispatch, which share them."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Literal

from models.catalog import ModelEntry
from serving.engines.base import EngineRequest, SamplingSpec
from serving.metering import Reservation, TokenBudget

__all__ = ["Outcome", "Prepared", "new_request_id"]


def new_request_id() -> str:
    """A request's internal id: 32 hex digits, the time in milliseconds then 80 random bits (the
    layout of a UUIDv7). Ids minted later sort later, so the ledger's unique index on them grows at
    its end instead of touching a random page of a table of millions per settlement."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


@dataclass
class Prepared:
    """A validated, tokenized request ready for dispatch."""

    request_id: str
    """Minted by the gateway for this request: the key of its reservation and its stream."""
    kind: Literal["chat", "completion"]
    entry: ModelEntry
    prompt_ids: list[int]
    sampling: SamplingSpec
    stream: bool
    include_usage: bool
    user: str | None
    budget: TokenBudget
    """Its token budget (``max_tokens`` as sent, the model's room); the reservation grants from it."""
    client_request_id: str | None = None
    """The caller's ``x-request-id``: echoed and logged, never used as a key."""
    pinned_gpu: str | None = None
    """GPU type the request asks for (``x-tokenweir-gpu``), when policy allows pinning."""
    reservation: Reservation | None = None
    gate_wait_s: float = 0.0
    """How long it waited at the gateway's fair gate (its part of the queue time)."""
    extra_headers: dict[str, str] = field(default_factory=dict)
    traceparent: str | None = None
    """The caller's W3C ``traceparent`` when well formed: logged, and passed to the engine unless
    ``engine_traceparent`` is set."""
    engine_traceparent: str | None = None
    """The gateway's own span as the engine's parent, when tracing is on (``gateway.otel_endpoint``)."""
    cache_salt: str | None = None
    """The organization's prefix-cache salt when caching is scoped per organization."""
    outcome: Outcome | None = None
    """What the dispatch produced (set once it starts)."""
    charged_ucredits: int | None = None
    """What settlement charged (set once settled)."""

    def engine_request(self) -> EngineRequest:
        """What goes to the pool: the tokens, the sampling, and who the reservation says pays (the
        organization and project, with the weights the pool's fair queue shares it by)."""
        res = self.reservation
        if res is None:
            return EngineRequest(
                self.request_id,
                self.prompt_ids,
                self.sampling,
                traceparent=self.engine_traceparent or self.traceparent,
                cache_salt=self.cache_salt,
            )
        return EngineRequest(
            self.request_id,
            self.prompt_ids,
            self.sampling,
            tenant_id=res.tenant_id,
            tenant_weight=res.tenant_weight,
            project_id=res.project_id,
            project_weight=res.project_weight,
            traceparent=self.engine_traceparent or self.traceparent,
            cache_salt=self.cache_salt,
        )


@dataclass
class Outcome:
    """What a finished (or failed) request produced, for settlement."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Of ``prompt_tokens``, how many the engine found in its prefix cache."""
    status: str = "ok"
    pool: str = ""
    accelerator: str = ""
    ttft_s: float | None = None
    queue_s: float | None = None
    """How long it waited before the engine started it: at the gateway's fair gate, then in the
    pool replica's admission queue (None: it never got that far, or the replica did not say)."""
    error: str | None = None
    """The OpenAI error code a stream ended with, if it ended with one."""
