"""The admission core of one pool replica: VTC fair queue + AIMD in-flight limit + back-pressure.

Back-pressure rules (nothing queues without bound):

* The queue holds at most ``max_queued_tokens`` (prompt + max_tokens) and ``max_queued_requests``.
  When a request does not fit, a tenant over its weighted share of the bound is refused (429); a
  tenant within its share pushes out the newest requests of the tenants most over theirs (they are
  refused, 429, through ``expire``); if that cannot make room the pool is full (503).
* A request predicted to wait longer than the queue deadline is refused at once. The prediction is
  the fair-share (GPS) backlog ahead of it over the measured drain rate.
* A queued request not released by its deadline is refused (reported by ``expire``).
* A refusal for a wait (predicted or actual) is 429 when the tenant already holds more than its
  weighted share of the queue, 503 when it does not (the pool itself is saturated). Pushing others
  out guarantees a tenant within its share room, so ``POOL_QUEUE_FULL`` is only a fallback.
* ``retry_after_s`` is the time the queue needs to drain the excess at the measured rate.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass

from serving.batching._config import AdmissionConfig
from serving.batching._fair_queue import FairQueue, QueuedRequest, TenantState
from serving.batching._interface import AdmissionPolicy
from serving.batching._limit import AimdLimit
from serving.batching._meters import DrainMeter, FinishedSample, LatencyWindow
from serving.batching._types import (
    AdmissionStats,
    Admitted,
    Decision,
    LoadSnapshot,
    Queued,
    RefusalReason,
    Refused,
    TenantStats,
)


@dataclass(slots=True)
class _Running:
    tenant_id: str
    prompt_tokens: int
    submitted_at_s: float
    released_at_s: float
    epoch: int
    first_token_at_s: float | None = None
    generated: int = 0
    probed: bool = False


class AdmissionCore(AdmissionPolicy):
    """See the module docstring and :class:`AdmissionPolicy` for the contract."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._queue = FairQueue(config.prompt_token_price, config.completion_token_price)
        self._limit = AimdLimit(config)
        self._drain = DrainMeter(config.drain_window_s, config.prior_drain_tokens_per_s)
        self._window = LatencyWindow(config.latency_window)
        self._running: dict[str, _Running] = {}
        self._in_flight_tokens = 0
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = 0
        self._refused: list[tuple[str, Refused]] = []
        self._stats = AdmissionStats()

    # ---- properties ----------------------------------------------------------------------
    @property
    def seq_limit(self) -> int:
        return self._limit.seq_limit

    @property
    def token_limit(self) -> int:
        return self._limit.token_limit

    @property
    def in_flight_seqs(self) -> int:
        return len(self._running)

    @property
    def in_flight_tokens(self) -> int:
        return self._in_flight_tokens

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    @property
    def queued_tokens(self) -> int:
        return self._queue.queued_tokens

    # ---- submit --------------------------------------------------------------------------
    def submit(
        self,
        req_id: str,
        tenant_id: str,
        weight: float,
        prompt_tokens: int,
        max_tokens: int,
        now: float,
    ) -> Decision:
        if req_id in self._running or req_id in self._queue:
            raise ValueError(f"request {req_id!r} is already live")
        if prompt_tokens < 0 or max_tokens < 0:
            raise ValueError(f"token counts must be >= 0 (prompt={prompt_tokens}, max={max_tokens})")
        self._drain.advance(now, len(self._queue) > 0)
        t = self._queue.tenant(tenant_id, weight)
        if len(self._queue) == 0 and self._fits(prompt_tokens):
            self._queue.activate(t)
            self._start(req_id, t, prompt_tokens, now, now)
            self._stats.admitted_total += 1
            return Admitted(req_id)
        cost = prompt_tokens + max_tokens
        refusal = self._check_wait(req_id, t, cost) or self._make_room(req_id, t, cost)
        if refusal is not None:
            self._count_refusal(refusal)
            return refusal
        deadline = now + self.config.queue_deadline_s
        self._queue.push(QueuedRequest(req_id, tenant_id, prompt_tokens, max_tokens, now, deadline), weight)
        self._seq += 1
        heapq.heappush(self._deadlines, (deadline, self._seq, req_id))
        self._drain.advance(now, True)
        self._stats.queued_total += 1
        return Queued(req_id, deadline)

    def _fits(self, prompt_tokens: int) -> bool:
        if not self._running:
            return True  # an empty engine always takes one request: no deadlock on big prompts
        return (
            len(self._running) < self._limit.seq_limit
            and self._in_flight_tokens + prompt_tokens <= self._limit.token_limit
        )

    def _share_tokens(self, t: TenantState, total_tokens: float) -> float:
        """The tenant's weighted share of ``total_tokens`` among the backlogged tenants and itself."""
        return total_tokens * t.weight / self._queue.backlogged_weight(extra=t)

    def _status_for(self, t: TenantState) -> int:
        """429 if the tenant already holds more than its weighted share of the queue, else 503."""
        share = self._share_tokens(t, self._queue.queued_tokens)
        return 429 if t.queued_tokens > share * 1.0001 else 503

    def _tokens_ahead(self, t: TenantState, cost: int) -> float:
        """Fair-share estimate of the queue tokens released before this request (GPS)."""
        own = t.queued_tokens + cost
        ahead = float(t.queued_tokens)
        for u in self._queue.backlogged_tenants():
            if u is not t:
                ahead += min(float(u.queued_tokens), own * u.weight / t.weight)
        return ahead

    def _check_wait(self, req_id: str, t: TenantState, cost: int) -> Refused | None:
        if t.queued_requests < self.config.min_queued_per_tenant:
            others = [u.counter for u in self._queue.backlogged_tenants() if u is not t]
            if others and t.counter <= min(others):
                return None  # owed service: the fair order releases it ahead of the others
        rate = self._drain.rate_tokens_per_s()
        wait_s = self._tokens_ahead(t, cost) / rate
        deadline_s = self.config.queue_deadline_s
        if wait_s <= self.config.predicted_wait_fraction * deadline_s:
            return None
        return self._refusal(
            req_id,
            RefusalReason.PREDICTED_WAIT,
            self._status_for(t),
            wait_s - self.config.predicted_wait_fraction * deadline_s,
            f"predicted queue wait {wait_s:.2f}s exceeds the queue deadline {deadline_s:.2f}s "
            f"(x{self.config.predicted_wait_fraction:g})",
        )

    def _fill(self, u: TenantState, extra: TenantState, add_tokens: int = 0, add_requests: int = 0) -> float:
        """How full the tenant's weighted share of the queue bounds is (> 1: over its share)."""
        cfg = self.config
        frac = u.weight / self._queue.backlogged_weight(extra=extra)
        return max(
            (u.queued_tokens + add_tokens) / (cfg.max_queued_tokens * frac),
            (u.queued_requests + add_requests) / (cfg.max_queued_requests * frac),
        )

    def _make_room(self, req_id: str, t: TenantState, cost: int) -> Refused | None:
        cfg = self.config
        q = self._queue

        def over() -> bool:
            return q.queued_tokens + cost > cfg.max_queued_tokens or len(q) + 1 > cfg.max_queued_requests

        if not over():
            return None
        rate = self._drain.rate_tokens_per_s()
        fill = self._fill(t, t, cost, 1)
        if fill > 1.0:
            return self._refusal(
                req_id,
                RefusalReason.TENANT_QUEUE_FULL,
                429,
                (1.0 - 1.0 / fill)
                * (t.queued_tokens + cost)
                / (rate * t.weight / q.backlogged_weight(extra=t)),
                f"tenant {t.tenant_id!r} holds {t.queued_tokens} queued tokens in {t.queued_requests} "
                f"requests: its weighted share of the queue bounds ({cfg.max_queued_tokens} tokens, "
                f"{cfg.max_queued_requests} requests)",
            )
        # Push out the newest requests of the tenants most over their shares.
        while over():
            victim = max(
                (u for u in q.backlogged_tenants() if u is not t),
                key=lambda u: self._fill(u, t),
                default=None,
            )
            if victim is None or self._fill(victim, t) <= 1.0:
                break
            item = q.newest(victim.tenant_id)
            if item is None:
                break
            q.remove(item.req_id)
            refusal = self._refusal(
                item.req_id,
                RefusalReason.DISPLACED,
                429,
                item.cost_tokens / rate,
                f"displaced from a full queue: tenant {victim.tenant_id!r} exceeds its share",
            )
            self._count_refusal(refusal)
            self._refused.append((item.req_id, refusal))
        if not over():
            return None
        return self._refusal(
            req_id,
            RefusalReason.POOL_QUEUE_FULL,
            503,
            max(q.queued_tokens + cost - cfg.max_queued_tokens, cost) / rate,
            f"the pool's queue is full ({q.queued_tokens} of {cfg.max_queued_tokens} tokens, "
            f"{len(q)} of {cfg.max_queued_requests} requests)",
        )

    def _refusal(
        self, req_id: str, reason: RefusalReason, status: int, retry_after_s: float, message: str
    ) -> Refused:
        return Refused(
            req_id=req_id,
            reason=reason,
            status_code=status,
            retry_after_s=max(self.config.min_retry_after_s, retry_after_s),
            message=message,
            queued_tokens=self._queue.queued_tokens,
            max_queued_tokens=self.config.max_queued_tokens,
        )

    def _count_refusal(self, r: Refused) -> None:
        d = self._stats.refused_total
        d[r.reason.value] = d.get(r.reason.value, 0) + 1

    # ---- release and measurements -----------------------------------------------------------
    def _start(self, req_id: str, t: TenantState, prompt_tokens: int, submitted: float, now: float) -> None:
        self._running[req_id] = _Running(t.tenant_id, prompt_tokens, submitted, now, self._limit.epoch)
        self._in_flight_tokens += prompt_tokens
        t.in_flight += 1
        self._queue.charge(t.tenant_id, prompt_tokens=prompt_tokens)

    def release(self, now: float) -> list[str]:
        self._drain.advance(now, len(self._queue) > 0)
        out: list[str] = []
        while True:
            item = self._queue.peek()
            if item is None or not self._fits(item.prompt_tokens):
                break
            self._queue.remove(item.req_id)
            self._drain.on_release(item.cost_tokens)
            self._start(
                item.req_id, self._queue.tenant(item.tenant_id), item.prompt_tokens, item.submitted_at_s, now
            )
            out.append(item.req_id)
        self._stats.released_total += len(out)
        self._drain.advance(now, len(self._queue) > 0)
        return out

    def on_first_token(self, req_id: str, now: float) -> None:
        r = self._running.get(req_id)
        if r is None or r.first_token_at_s is not None:
            return
        r.first_token_at_s = now
        self._limit.on_ttft(now - r.released_at_s, r.epoch, len(self._running), self._in_flight_tokens)

    def on_tokens(self, req_id: str, n: int, now: float) -> None:
        r = self._running.get(req_id)
        if r is None or n <= 0:
            return
        if r.first_token_at_s is None:
            self.on_first_token(req_id, now)
        r.generated += n
        self._in_flight_tokens += n
        self._queue.charge(r.tenant_id, completion_tokens=n)
        if not r.probed and r.generated - 1 >= self.config.tpot_probe_tokens:
            self._probe(r, now, r.generated)

    def _probe(self, r: _Running, now: float, tokens: int) -> None:
        r.probed = True
        assert r.first_token_at_s is not None
        tpot = (now - r.first_token_at_s) / (tokens - 1)
        binds = len(self._queue) > 0 or len(self._running) >= self._limit.seq_limit - 1
        self._limit.on_tpot(
            tpot,
            r.first_token_at_s - r.released_at_s,
            r.epoch,
            len(self._running),
            self._in_flight_tokens,
            binds,
        )

    def on_finish(self, req_id: str, prompt_tokens: int, completion_tokens: int, now: float) -> None:
        r = self._running.get(req_id)
        if r is None:
            return
        # Settle the counter to the engine's exact counts.
        self._queue.charge(
            r.tenant_id,
            prompt_tokens=prompt_tokens - r.prompt_tokens,
            completion_tokens=completion_tokens - r.generated,
        )
        if completion_tokens > 0 and r.first_token_at_s is None:
            self.on_first_token(req_id, now)
        if not r.probed and completion_tokens >= 2 and r.first_token_at_s is not None:
            self._probe(r, now, completion_tokens)
        del self._running[req_id]
        self._in_flight_tokens -= r.prompt_tokens + r.generated
        self._queue.tenant(r.tenant_id).in_flight -= 1
        self._drain.advance(now, len(self._queue) > 0)
        if r.first_token_at_s is None:
            return
        cfg = self.config
        e2e_ttft = r.first_token_at_s - r.submitted_at_s
        tpot = (now - r.first_token_at_s) / (completion_tokens - 1) if completion_tokens >= 2 else None
        ttft_ok = e2e_ttft * 1000.0 <= cfg.ttft_slo_ms
        tpot_ok = tpot is None or tpot * 1000.0 <= cfg.tpot_slo_ms
        st = self._stats
        st.finished_total += 1
        st.ttft_slo_met_total += ttft_ok
        st.tpot_slo_met_total += tpot_ok
        st.slo_met_total += ttft_ok and tpot_ok
        self._window.add(
            FinishedSample(r.first_token_at_s - r.released_at_s, e2e_ttft, tpot, ttft_ok and tpot_ok)
        )

    # ---- cancel and expiry ---------------------------------------------------------------------
    def cancel(self, req_id: str, now: float) -> bool:
        self._drain.advance(now, len(self._queue) > 0)
        removed = self._queue.remove(req_id) is not None
        self._drain.advance(now, len(self._queue) > 0)
        return removed

    def expire(self, now: float) -> list[tuple[str, Refused]]:
        self._drain.advance(now, len(self._queue) > 0)
        out, self._refused = self._refused, []
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, _, req_id = heapq.heappop(dl)
            item = self._queue.get(req_id)
            if item is None:
                continue
            t = self._queue.tenant(item.tenant_id)
            status = self._status_for(t)
            self._queue.remove(req_id)
            refusal = self._refusal(
                req_id,
                RefusalReason.QUEUE_DEADLINE,
                status,
                self._queue.queued_tokens / self._drain.rate_tokens_per_s(),
                f"not started within the queue deadline of {self.config.queue_deadline_s:.2f}s",
            )
            self._count_refusal(refusal)
            out.append((req_id, refusal))
        self._drain.advance(now, len(self._queue) > 0)
        return out

    def next_deadline(self) -> float | None:
        dl = self._deadlines
        while dl and dl[0][2] not in self._queue:
            heapq.heappop(dl)
        return dl[0][0] if dl else None

    # ---- reporting -------------------------------------------------------------------------------
    def snapshot(self, now: float) -> LoadSnapshot:
        return LoadSnapshot(
            taken_at_s=now,
            queued_requests=len(self._queue),
            queued_tokens=self._queue.queued_tokens,
            in_flight_seqs=len(self._running),
            in_flight_tokens=self._in_flight_tokens,
            seq_limit=self._limit.seq_limit,
            token_limit=self._limit.token_limit,
            kv_capacity_tokens=self.config.kv_capacity_tokens,
            max_queued_tokens=self.config.max_queued_tokens,
            drain_rate_tokens_per_s=self._drain.rate_tokens_per_s(),
            recent_ttft_s=self._window.mean_engine_ttft_s(),
            recent_tpot_s=self._window.mean_tpot_s(),
        )

    def stats(self) -> AdmissionStats:
        st = self._stats
        st.queue_depth = len(self._queue)
        st.queued_tokens = self._queue.queued_tokens
        st.in_flight_seqs = len(self._running)
        st.in_flight_tokens = self._in_flight_tokens
        st.seq_limit = self._limit.seq_limit
        st.token_limit = self._limit.token_limit
        st.drain_rate_tokens_per_s = self._drain.rate_tokens_per_s()
        st.recent_slo_attainment = self._window.attainment()
        st.recent_ttft_s = self._window.mean_engine_ttft_s()
        st.recent_tpot_s = self._window.mean_tpot_s()
        st.limit_increases_total = self._limit.increases_total
        st.limit_decreases_total = self._limit.decreases_total
        st.tenants = {
            t.tenant_id: TenantStats(
                queued_requests=t.queued_requests,
                queued_tokens=t.queued_tokens,
                in_flight_seqs=t.in_flight,
                served_prompt_tokens=t.served_prompt_tokens,
                served_completion_tokens=t.served_completion_tokens,
                virtual_counter=t.counter,
            )
            for t in self._queue.tenants()
        }
        return dataclasses.replace(st, refused_total=dict(st.refused_total))
