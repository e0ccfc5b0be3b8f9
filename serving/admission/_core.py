"""The admission core of one pool replica: fair queue (hierarchical VTC: organization, then project)
+ adaptive in-flight limit + back-pressure.

A request starts at once when nothing is queued and the in-flight limit (``_limit``) has room;
otherwise the back-pressure rules (``_backpressure``) queue it in fair order (``_fair_queue``) or
refuse it, on arrival when it may wait past the queue deadline. Released requests feed their
latencies back to the limit; the queue's drain is measured (``_meters``) to predict waits.

With ``batch_share`` (off by default) an organization too far ahead of the others waits even where
the limit has room, so the batch, not only the queue, is shared by served tokens (see
:class:`~serving.admission.AdmissionSettings`); a request of an organization behind it in fair
order then starts at once past the ones held.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass

from serving.admission._backpressure import BackPressure
from serving.admission._config import AdmissionConfig
from serving.admission._fair_queue import FairQueue, QueuedRequest, TenantState
from serving.admission._interface import AdmissionPolicy
from serving.admission._limit import AdaptiveLimit
from serving.admission._meters import DrainMeter, FinishedSample, LatencyWindow
from serving.admission._types import (
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
    project_id: str | None
    prompt_tokens: int
    submitted_at_s: float
    released_at_s: float
    released_at_seqs: int
    released_at_tokens: int
    first_token_at_s: float | None = None
    last_token_at_s: float = 0.0
    generated: int = 0


class AdmissionCore(AdmissionPolicy):
    """See the module docstring and :class:`AdmissionPolicy` for the contract."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._queue = FairQueue(config.prompt_token_price, config.completion_token_price)
        self._limit = AdaptiveLimit(config)
        self._drain = DrainMeter(
            config.drain_window_s, config.prior_drain_tokens_per_s, config.queue_deadline_s
        )
        self._window = LatencyWindow(config.latency_window)
        self._running: dict[str, _Running] = {}
        self._in_flight_tokens = 0
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = 0
        self._refused: list[tuple[str, Refused]] = []
        self._linger_until: dict[str, float] = {}
        self._lingering: list[tuple[float, str]] = []
        """Batch sharing: organizations counted active though idle, until when (a heap)."""
        self._stats = AdmissionStats()
        self._bp = BackPressure(config, self._queue, self._drain, self._limit)

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
        project_id: str | None = None,
        project_weight: float = 1.0,
    ) -> Decision:
        if req_id in self._running or req_id in self._queue:
            raise ValueError(f"request {req_id!r} is already live")
        if prompt_tokens < 0 or max_tokens < 0:
            raise ValueError(f"token counts must be >= 0 (prompt={prompt_tokens}, max={max_tokens})")
        if not project_weight > 0:
            raise ValueError(f"project {project_id!r}: weight must be > 0, got {project_weight}")
        self._meter(now)
        t = self._queue.tenant(tenant_id, weight)
        cost = prompt_tokens + max_tokens
        if self._may_start_now(t, prompt_tokens):
            self._queue.start(t, project_id, project_weight)
            self._start(req_id, t.tenant_id, project_id, prompt_tokens, cost, now, now)
            self._meter(now)
            self._stats.admitted_total += 1
            return Admitted(req_id)
        refusal = self._bp.check_wait(
            req_id, t, cost, len(self._running), self._in_flight_tokens, project_id, project_weight
        )
        if refusal is None:
            refusal, displaced = self._bp.make_room(req_id, t, cost, project_id, project_weight)
            for rid, r in displaced:
                self._count_refusal(r)
                self._refused.append((rid, r))
        if refusal is not None:
            self._count_refusal(refusal)
            return refusal
        deadline = now + self.config.queue_deadline_s
        self._queue.push(
            QueuedRequest(req_id, tenant_id, prompt_tokens, max_tokens, now, deadline, project_id),
            weight,
            project_weight,
        )
        self._seq += 1
        heapq.heappush(self._deadlines, (deadline, self._seq, req_id))
        self._meter(now)
        self._stats.queued_total += 1
        return Queued(req_id, deadline)

    def _fits(self, prompt_tokens: int) -> bool:
        if not self._running:
            return True  # an empty engine always takes one request: no deadlock on big prompts
        return (
            len(self._running) < self._limit.seq_limit
            and self._in_flight_tokens + prompt_tokens <= self._limit.token_limit
        )

    def _may_start_now(self, t: TenantState, prompt_tokens: int) -> bool:
        """Whether a new request of organization ``t`` starts without queueing: the limit has room and
        nothing queued comes before it in fair order (with batch sharing, what is queued may be
        only organizations held back, behind ``t``; ``t`` itself must not be too far ahead)."""
        if not self._fits(prompt_tokens):
            return False
        if not self.config.batch_share:
            return len(self._queue) == 0
        if self._held_back(t):
            return False
        head = self._queue.peek()
        return head is None or self._queue.tenant(head.tenant_id).counter > self._queue.lifted_counter(t)

    def _held_back(self, t: TenantState) -> bool:
        """Batch sharing: whether organization ``t`` is too far ahead of the active organization with
        the smallest counter to start anything now."""
        if not self.config.batch_share:
            return False
        others = self._queue.active_counters(exclude=t)
        return bool(others) and (
            self._queue.lifted_counter(t) - min(others) > self.config.batch_share_lead_tokens
        )

    def _sharing_holds(self) -> bool:
        """Batch sharing, not the limit, is what keeps the next queued request waiting."""
        if not self.config.batch_share:
            return False
        head = self._queue.peek()
        return (
            head is not None
            and self._fits(head.prompt_tokens)
            and self._held_back(self._queue.tenant(head.tenant_id))
        )

    @property
    def releases_on_tokens(self) -> bool:
        return self.config.batch_share and len(self._queue) > 0

    def _count_refusal(self, r: Refused) -> None:
        d = self._stats.refused_total
        d[r.reason.value] = d.get(r.reason.value, 0) + 1

    # ---- release and measurements -----------------------------------------------------------
    def _saturated(self) -> bool:
        """Whether a new request of the usual size would have to wait (the queue's drain is
        measured over such time)."""
        return len(self._queue) > 0 or not self._fits(round(self._drain.mean_prompt_tokens()))

    def _limit_binds(self) -> bool:
        """Whether the limit is what holds requests back (only then may it grow): saturated, and not
        only because batch sharing holds the queue."""
        if not self._fits(round(self._drain.mean_prompt_tokens())):
            return True
        return len(self._queue) > 0 and not self._sharing_holds()

    def _meter(self, now: float) -> None:
        if self._lingering:
            self._end_lingering(now)
        self._drain.advance(now, self._saturated())

    def _end_lingering(self, now: float) -> None:
        heap = self._lingering
        while heap and heap[0][0] <= now:
            until, tid = heapq.heappop(heap)
            if self._linger_until.get(tid) == until:
                del self._linger_until[tid]
                self._queue.linger(tid, False)

    def _start(
        self,
        req_id: str,
        tenant_id: str,
        project_id: str | None,
        prompt_tokens: int,
        cost_tokens: int,
        submitted: float,
        now: float,
    ) -> None:
        """Book a request the fair queue already counts as in flight."""
        self._drain.on_start(prompt_tokens, cost_tokens)
        self._in_flight_tokens += prompt_tokens
        self._running[req_id] = _Running(
            tenant_id,
            project_id,
            prompt_tokens,
            submitted,
            now,
            len(self._running) + 1,
            self._in_flight_tokens,
        )
        self._queue.charge(tenant_id, prompt_tokens=prompt_tokens, project_id=project_id)

    def release(self, now: float) -> list[str]:
        self._meter(now)
        out: list[str] = []
        while True:
            item = self._queue.peek()
            if item is None or not self._fits(item.prompt_tokens):
                break
            if self._held_back(self._queue.tenant(item.tenant_id)):
                break  # the smallest counter queued is too far ahead: so is every queued one
            self._queue.release(item.req_id)
            self._drain.on_release()
            self._start(
                item.req_id,
                item.tenant_id,
                item.project_id,
                item.prompt_tokens,
                item.cost_tokens,
                item.submitted_at_s,
                now,
            )
            out.append(item.req_id)
        self._stats.released_total += len(out)
        self._meter(now)
        return out

    def on_first_token(self, req_id: str, now: float) -> None:
        r = self._running.get(req_id)
        if r is None or r.first_token_at_s is not None:
            return
        r.first_token_at_s = r.last_token_at_s = now
        self._limit.on_ttft(
            now - r.released_at_s,
            now,
            max(r.released_at_seqs, len(self._running)),
            max(r.released_at_tokens, self._in_flight_tokens),
        )

    def on_tokens(self, req_id: str, n: int, now: float) -> None:
        r = self._running.get(req_id)
        if r is None or n <= 0:
            return
        first = r.first_token_at_s is None
        if first:
            self.on_first_token(req_id, now)
        r.generated += n
        self._in_flight_tokens += n
        self._queue.charge(r.tenant_id, completion_tokens=n, project_id=r.project_id)
        saturated = self._saturated()
        if not first:
            binds = self._limit_binds() if self.config.batch_share else saturated
            self._tpot_sample(r, n, now, binds)
        self._drain.advance(now, saturated)

    def _tpot_sample(self, r: _Running, n: int, now: float, saturated: bool) -> None:
        """``n`` tokens after the first came since the request's last report: a TPOT sample."""
        if now > r.last_token_at_s:
            self._limit.on_tpot(
                (now - r.last_token_at_s) / n, now, len(self._running), self._in_flight_tokens, saturated
            )
        r.last_token_at_s = now

    def on_finish(self, req_id: str, prompt_tokens: int, completion_tokens: int, now: float) -> None:
        r = self._running.get(req_id)
        if r is None:
            return
        # Settle the counter to the engine's exact counts.
        self._queue.charge(
            r.tenant_id,
            prompt_tokens=prompt_tokens - r.prompt_tokens,
            completion_tokens=completion_tokens - r.generated,
            project_id=r.project_id,
        )
        reported = r.generated
        if completion_tokens > 0 and r.first_token_at_s is None:
            self.on_first_token(req_id, now)
            reported = 1  # the first token carries no TPOT
        if completion_tokens > reported:
            self._tpot_sample(r, completion_tokens - reported, now, self._limit_binds())
        del self._running[req_id]
        self._in_flight_tokens -= r.prompt_tokens + r.generated
        self._queue.finish(r.tenant_id, r.project_id)
        if self.config.batch_share:
            t = self._queue.tenant(r.tenant_id)
            if t.in_flight == 0 and not t.backlogged and self.config.batch_share_idle_s > 0:
                until = now + self.config.batch_share_idle_s
                self._linger_until[r.tenant_id] = until
                heapq.heappush(self._lingering, (until, r.tenant_id))
                self._queue.linger(r.tenant_id, True)
        self._meter(now)
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
        if tpot is not None:
            self._limit.on_finished_tpot(tpot)
        self._window.add(
            FinishedSample(r.first_token_at_s - r.released_at_s, e2e_ttft, tpot, ttft_ok and tpot_ok)
        )

    # ---- cancel and expiry ---------------------------------------------------------------------
    def cancel(self, req_id: str, now: float) -> bool:
        self._meter(now)
        removed = self._queue.remove(req_id) is not None
        self._meter(now)
        return removed

    def expire(self, now: float) -> list[tuple[str, Refused]]:
        self._meter(now)
        out, self._refused = self._refused, []
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, _, req_id = heapq.heappop(dl)
            item = self._queue.get(req_id)
            if item is None:
                continue
            t = self._queue.tenant(item.tenant_id)
            status = self._bp.status_for(t)
            self._queue.remove(req_id)
            refusal = self._bp.refusal(
                req_id,
                RefusalReason.QUEUE_DEADLINE,
                status,
                self._queue.queued_tokens / self._drain.rate_tokens_per_s(),
                f"not started within the queue deadline of {self.config.queue_deadline_s:.2f}s",
            )
            self._count_refusal(refusal)
            out.append((req_id, refusal))
        self._meter(now)
        return out

    def next_deadline(self) -> float | None:
        dl = self._deadlines
        while dl and dl[0][2] not in self._queue:
            heapq.heappop(dl)
        at = dl[0][0] if dl else None
        if at is not None and self._lingering:
            # An organization held back by an idle one's counter may start when that one stops
            # counting as active: a time to call release at, whatever else happens.
            at = min(at, self._lingering[0][0])
        return at

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
