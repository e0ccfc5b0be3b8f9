"""What the gateway calls on every request: authorize before dispatch, settle after.

::

    meter = Meter(connect(cfg, namespace=ns), default_max_tokens=cfg.default_max_tokens)
    res = await meter.authorize(api_key, model, prompt_tokens, body.max_tokens, request_id,
                                model_max_len=ctx_len)       # raises a serving.errors.APIError
    try:
        ...  # dispatch with max_tokens=res.max_tokens; send res.headers on the response
    finally:
        await meter.settle(res, usage.prompt_tokens, usage.completion_tokens, outcome, pool, gpu)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from serving.errors import AuthenticationError
from serving.tenancy import hash_api_key, looks_like_api_key

from ._budget import TokenBudget
from ._client import LedgerClient
from ._ops import Progress, Refusal, Reservation, Reserve, Settle, Settlement, error_for
from ._stats import LedgerCollector, LedgerStats

__all__ = ["Meter"]

log = logging.getLogger("tokenweir.metering")

PROGRESS_INTERVAL_S = 1.0
"""How often a gateway records the tokens its live requests have produced (one batched call)."""


class _Live:
    """Progress of one live reservation: what the gateway saw and what the ledger has."""

    __slots__ = ("noted", "sent")

    def __init__(self) -> None:
        self.noted = 0
        self.sent = 0


class Meter:
    """The metering facade of one gateway replica. ``enabled=False`` checks and charges nothing."""

    def __init__(
        self, client: LedgerClient | None, *, enabled: bool = True, default_max_tokens: int = 4096
    ) -> None:
        if enabled and client is None:
            raise ValueError("an enabled Meter needs a LedgerClient")
        self.client = client
        self.enabled = enabled
        self.default_max_tokens = default_max_tokens
        self.collector = LedgerCollector()
        self._live: dict[str, _Live] = {}

    def check_key(self, api_key: str) -> None:
        """Refuse, before any body work, a key that cannot be valid: malformed, or absent from the
        replica's synced key directory (:mod:`._keys`; costs the ledger nothing). A key it does
        not know yet goes on to :meth:`authorize`, where the ledger decides."""
        if not self.enabled:
            return
        if not looks_like_api_key(api_key):
            raise AuthenticationError("Incorrect API key provided.")
        keys = self.client.transport.keys if self.client is not None else None
        if keys is not None and keys.admits(hash_api_key(api_key)) is False:
            raise AuthenticationError("Incorrect API key provided.")

    def tenant_of(self, api_key: str) -> str | None:
        """The organization of a key as the replica's key directory knows it, before any body work
        (``"default"`` with metering off; None when the directory does not know the key)."""
        if not self.enabled:
            return "default"
        keys = self.client.transport.keys if self.client is not None else None
        return keys.tenant_of(hash_api_key(api_key)) if keys is not None else None

    def ledger_ready(self) -> bool:
        """The ledger link is up (its key directory synced); True with metering off or in-process."""
        if not self.enabled or self.client is None:
            return True
        keys = self.client.transport.keys
        return keys is None or keys.synced

    async def connect(self) -> None:
        """Open the ledger link now so the key directory is synced before the first request."""
        if self.enabled and self.client is not None:
            await self.client.transport.connect()

    async def authorize(
        self,
        api_key: str,
        model: str,
        prompt_tokens: int,
        max_tokens: int | None,
        request_id: str,
        *,
        model_max_len: int | None = None,
    ) -> Reservation:
        """Reserve ``prompt + max_tokens`` credits and the rate limits, or raise the refusal's
        :class:`serving.errors.APIError`.

        ``max_tokens=None`` reserves what the model length, the tenant's cap, its TPM limit and its
        balance allow; the granted value is ``Reservation.max_tokens`` and must bound the engine.
        """
        if not self.enabled:
            budget = TokenBudget.from_reservation(prompt_tokens, max_tokens, model_max_len)
            granted = budget.grant(default_tokens=self.default_max_tokens)
            return Reservation(request_id, "default", "", model, prompt_tokens, granted, 0)
        if not looks_like_api_key(api_key):
            raise AuthenticationError("Incorrect API key provided.")
        assert self.client is not None
        op = Reserve(request_id, hash_api_key(api_key), model, prompt_tokens, max_tokens, model_max_len)
        result = await self.client.submit(op)
        if isinstance(result, Refusal):
            raise error_for(result)
        assert isinstance(result, Reservation)
        self._live[request_id] = _Live()
        return result

    def note_progress(self, request_id: str, completion_tokens: int) -> None:
        """The request has produced ``completion_tokens`` so far (cheap: a field write; the ledger
        hears of it at the next :meth:`flush_progress`)."""
        live = self._live.get(request_id)
        if live is not None:
            live.noted = completion_tokens

    def flush_progress(self) -> int:
        """Send one progress record per live request that produced tokens since the last flush;
        returns how many. Run every :data:`PROGRESS_INTERVAL_S` (:meth:`record_progress`), so a
        request whose gateway dies is charged at least what it produced minus one interval: its
        first record comes at the first flush after its first token, however young it is then
        (waiting a flush more for the short ones to settle first would leave up to two intervals
        unrecorded)."""
        if not self.enabled or self.client is None:
            return 0
        n = 0
        for request_id, live in self._live.items():
            if live.noted > live.sent:
                live.sent = live.noted
                self.client.submit(Progress(request_id, live.noted)).add_done_callback(_log_failure)
                n += 1
        return n

    async def record_progress(self, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        """Flush progress every ``interval_s`` (a background task of the gateway replica)."""
        while True:
            await asyncio.sleep(interval_s)  # a periodic timer, not a wait for a condition
            self.flush_progress()

    async def settle(
        self,
        reservation: Reservation,
        prompt_tokens: int,
        completion_tokens: int,
        outcome: str = "completed",
        pool: str = "",
        gpu_type: str = "",
        *,
        cached_tokens: int = 0,
    ) -> Settlement:
        """Charge exactly the tokens produced and release the rest (idempotent by request id);
        ``cached_tokens`` of the prompt at the model's cached price.

        Call it on every path: completion, engine error, client disconnect (``outcome`` names it).
        """
        if not self.enabled:
            return Settlement(reservation.request_id, 0, 0)
        assert self.client is not None
        self._live.pop(reservation.request_id, None)
        op = Settle(
            reservation.request_id, prompt_tokens, completion_tokens, outcome, pool, gpu_type, cached_tokens
        )
        result = await self.client.submit(op)
        assert isinstance(result, Settlement)
        return result

    async def progress(self, reservation: Reservation, completion_tokens: int) -> None:
        """Record tokens produced so far now, so that a request whose gateway dies is charged for
        them (the crash rule in :mod:`serving.metering._core`); the gateway uses the batched
        :meth:`note_progress` instead."""
        if self.enabled:
            assert self.client is not None
            await self.client.submit(Progress(reservation.request_id, completion_tokens))

    async def refresh_metrics(self) -> LedgerStats:
        """Fetch the ledger's stats into :attr:`collector` (call before rendering ``/metrics``)."""
        if not self.enabled:
            return self.collector.stats
        assert self.client is not None
        stats = await self.client.stats()
        self.collector.update(stats)
        return stats


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and (e := fut.exception()) is not None:
        log.info("progress record not sent: %s", e)  # the next flush sends a newer one
