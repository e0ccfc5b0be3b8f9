"""The token channel's wire messages, one struct per kind, msgpack-encoded by :mod:`serving.wire`.

Gateway to pool: :class:`Hello` (once, after the link secret), then :class:`Submit` and
:class:`Abort`. Pool to gateway: :class:`Welcome` (the answer to the hello), then :class:`Batch`
(every stream's news of one event-loop pass: one frame per engine step, however many streams),
:class:`CacheEvents` (what the engine's prefix cache stored and removed: vLLM's KV-cache events,
first a snapshot of its whole content) and :class:`Drain` (the replica is going away: send it
nothing new). Both ends check
``PROTOCOL_VERSION`` in the hello and its answer, so a rolling upgrade across an incompatible change
fails loudly at connect time, never mid-stream.
"""

from __future__ import annotations

import msgspec

from serving.admission import Refused
from serving.engines.base import EngineChunk, EngineRequest
from serving.wire import Codec

__all__ = [
    "PROTOCOL_VERSION",
    "Abort",
    "Batch",
    "CacheEvents",
    "Drain",
    "Failure",
    "Hello",
    "Submit",
    "Welcome",
    "from_gateway",
    "from_pool",
]

PROTOCOL_VERSION = 2
"""Bumped on any change to these structs that an older peer could not read. A field added with a
default is not one: msgspec skips fields it does not know and fills missing ones with the default
(``Batch.admitted`` came so: a gateway reading an older pool logs no queue time for its requests)."""


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    protocol: int
    gateway_id: str


class Submit(msgspec.Struct, frozen=True, tag="submit"):
    request: EngineRequest


class Abort(msgspec.Struct, frozen=True, tag="abort"):
    request_id: str


class Welcome(msgspec.Struct, frozen=True, tag="welcome"):
    protocol: int
    replica: str


class Failure(msgspec.Struct, frozen=True):
    """A request ended at the pool without its finished chunk."""

    request_id: str
    message: str
    retryable: bool = False
    """Nothing was produced and another replica may serve it (the engine died, the replica drains)."""
    refusal: Refused | None = None
    """The admission core's refusal (the gateway answers 429/503 with its ``Retry-After``)."""


class Batch(msgspec.Struct, frozen=True, tag="batch"):
    """Admissions, chunks, then failures: a request's admission comes with or before its first
    chunk, and a failure ends its request, so it never precedes that one's chunks."""

    chunks: list[tuple[str, EngineChunk]]
    failures: list[Failure] = []
    admitted: list[tuple[str, float]] = []
    """Requests the replica's admission let in since the last batch, each with its wait there
    (seconds from its submit frame to the engine: the pool's part of its queue time)."""


class CacheEvents(msgspec.Struct, frozen=True, tag="cache"):
    """The engine's prefix cache changed: ``runs`` of ``(stored, block keys)`` in order (vLLM's 64-bit
    form of the block hashes, :func:`~serving.kvcache.block_key`), after
    emptying it if ``cleared`` (a snapshot is ``cleared`` with everything held as one stored run)."""

    runs: list[tuple[bool, list[int]]]
    cleared: bool = False


class Drain(msgspec.Struct, frozen=True, tag="drain"):
    """The replica is shutting down: its running streams finish (or end with a failure), new
    requests go elsewhere."""


from_gateway: Codec[Hello | Submit | Abort] = Codec(Hello | Submit | Abort)
from_pool: Codec[Welcome | Batch | CacheEvents | Drain] = Codec(Welcome | Batch | CacheEvents | Drain)
