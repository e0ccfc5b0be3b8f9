"""Back-pressure (pure): when a request that cannot start at once may queue, and what a refusal says.

Nothing queues without bound, and the excess is refused on arrival:

* A request that may wait longer than the queue deadline is refused at once (``PREDICTED_WAIT``):
  it needs as many releases as the work ahead of it in fair order (its own included, and of its
  tenant's queue only what the project order serves first, plus the finishes that open nothing
  while the load is above a limit that came down) takes, and the queue, releasing at its measured
  drain rate, must surely (``1 - deadline_miss_probability``) make that
  many within the deadline: Poisson, widened by the measured dispersion of the releases (see
  ``_wait``). A tenant owed service may queue on the mean instead (``min_queued_per_tenant``).
* The queue holds at most ``max_queued_tokens`` (prompt + max_tokens) and ``max_queued_requests``.
  When a request does not fit, a tenant over its weighted share of the bound is refused (429); a
  tenant within its share pushes out the newest requests of the tenants most over theirs (they are
  refused, 429, through ``expire``); if that cannot make room the pool is full (503). One level
  down the same: in a tenant over its share, a project within its weighted share of the tenant's
  part pushes out the newest requests of the sibling projects most over theirs, when that makes
  room (else the 429 stands); a victim tenant loses its most-over project's newest request first.
* A queued request not released by its deadline is refused (``QUEUE_DEADLINE``, through
  ``expire``); the first rule keeps this rare.
* A refusal for a wait (predicted or actual) is 429 when the tenant already holds more than its
  weighted share of the queue, 503 when it does not (the pool itself is saturated). Pushing others
  out guarantees a tenant within its share room, so ``POOL_QUEUE_FULL`` is only a fallback.
* ``retry_after_s`` is the time the queue needs to drain the excess at the measured rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from serving.admission._config import AdmissionConfig
from serving.admission._fair_queue import FairQueue, ProjectState, QueuedRequest, TenantState
from serving.admission._limit import AdaptiveLimit
from serving.admission._meters import DrainMeter
from serving.admission._types import RefusalReason, Refused
from serving.admission._wait import sure_releases, work_ahead_tokens


class _Left:
    """What a project would keep queued in a dry run of pushing its newest requests out."""

    __slots__ = ("newest_first", "project", "requests", "tokens")

    def __init__(self, project: ProjectState) -> None:
        self.project = project
        self.tokens = project.queued_tokens
        self.requests = project.queued_requests
        self.newest_first: Iterator[QueuedRequest] = reversed(project.queue)


class BackPressure:
    """The refusal rules of one replica's admission core, over its queue, drain meter and limit."""

    def __init__(
        self, config: AdmissionConfig, queue: FairQueue, drain: DrainMeter, limit: AdaptiveLimit
    ) -> None:
        self.config = config
        self._queue = queue
        self._drain = drain
        self._limit = limit

    def status_for(self, t: TenantState) -> int:
        """429 if the tenant already holds more than its weighted share of the queue, else 503."""
        share = self._queue.queued_tokens * t.weight / self._queue.backlogged_weight(extra=t)
        return 429 if t.queued_tokens > share * 1.0001 else 503

    def check_wait(
        self,
        req_id: str,
        t: TenantState,
        cost: int,
        in_flight_seqs: int,
        in_flight_tokens: int,
        project_id: str | None = None,
        project_weight: float = 1.0,
    ) -> Refused | None:
        """The refusal of a request that may wait past the queue deadline (None: it may queue)."""
        cfg = self.config
        q = self._queue
        counter = q.lifted_counter(t)
        rate = self._drain.rate_tokens_per_s()
        per = self._drain.mean_cost_tokens() or float(cost)
        inner = q.ahead_in_tenant(t, project_id, project_weight)
        ahead = work_ahead_tokens(t, counter, cost, q.backlogged_tenants(), inner)
        deadline_s = cfg.queue_deadline_s
        expected = rate * deadline_s / per
        own = inner + cost
        # Owed service: behind another active tenant, and no backlogged one before it in fair order.
        # Keeping such a tenant backlogged is what makes the queue fair (with the queue as short as
        # the rule below keeps it, a tenant not backlogged when a slot opens loses its turn), so it
        # may queue on the releases expected within the deadline, not the sure ones, and at least
        # min_queued_per_tenant. One level down the same: a project first in its tenant's fair
        # order and behind another of its active projects is owed its turns in its tenant's part,
        # so it may queue on the releases expected to cover all the work ahead of it (the other
        # tenants' included), and at least min_queued_per_tenant.
        if (
            ahead == own
            and any(c > counter for c in q.active_counters(exclude=t))
            and (t.queued_requests < cfg.min_queued_per_tenant or math.ceil(own / per - 1e-9) <= expected)
        ):
            return None
        owed_queued = q.owed_in_tenant(t, project_id, inner)
        if owed_queued is not None and (
            owed_queued < cfg.min_queued_per_tenant or math.ceil(ahead / per - 1e-9) <= expected
        ):
            return None
        needed = max(1, math.ceil(ahead / per - 1e-9)) + self._deficit(in_flight_seqs, in_flight_tokens)
        # Lumpy releases: counts spread ``d`` times a Poisson's, like ``d`` x Poisson(expected / d).
        d = self._drain.dispersion()
        sure = math.floor(d * sure_releases(expected / d, cfg.deadline_miss_probability))
        if needed <= sure:
            return None
        return self.refusal(
            req_id,
            RefusalReason.PREDICTED_WAIT,
            self.status_for(t),
            (needed - sure) * per / rate,
            f"predicted queue wait {ahead / rate:.2f}s ({needed} releases at {rate / per:.1f}/s) may "
            f"exceed the queue deadline {deadline_s:.2f}s",
        )

    def _deficit(self, in_flight_seqs: int, in_flight_tokens: int) -> int:
        """Finishes that open nothing before the next opening: the running load above a limit that
        was cut below it, or KV tokens above the token limit (running requests grow)."""
        if in_flight_seqs == 0:
            return 0
        seqs = in_flight_seqs - self._limit.seq_limit
        over = in_flight_tokens + self._drain.mean_prompt_tokens() - self._limit.token_limit
        tokens = math.ceil(over / (in_flight_tokens / in_flight_seqs)) if over > 0 else 0
        return max(0, seqs, tokens)

    def _fill(self, u: TenantState, extra: TenantState, add_tokens: int = 0, add_requests: int = 0) -> float:
        """How full the tenant's weighted share of the queue bounds is (> 1: over its share)."""
        cfg = self.config
        frac = u.weight / self._queue.backlogged_weight(extra=extra)
        return max(
            (u.queued_tokens + add_tokens) / (cfg.max_queued_tokens * frac),
            (u.queued_requests + add_requests) / (cfg.max_queued_requests * frac),
        )

    def make_room(
        self,
        req_id: str,
        t: TenantState,
        cost: int,
        project_id: str | None = None,
        project_weight: float = 1.0,
    ) -> tuple[Refused | None, list[tuple[str, Refused]]]:
        """Room in the queue bounds for a request: its refusal (None: it fits), and the queued
        requests of tenants (or of its tenant's other projects) over their shares pushed out to
        make the room."""
        cfg = self.config
        displaced: list[tuple[str, Refused]] = []
        q = self._queue

        def over() -> bool:
            return q.queued_tokens + cost > cfg.max_queued_tokens or len(q) + 1 > cfg.max_queued_requests

        if not over():
            return None, displaced
        rate = self._drain.rate_tokens_per_s()
        fill = self._fill(t, t, cost, 1)
        if fill > 1.0:
            # Over the tenant's share: room only from its own projects over their shares of it.
            plan = self._within_tenant(t, project_id, project_weight, cost)
            if plan is None:
                return self.refusal(
                    req_id,
                    RefusalReason.TENANT_QUEUE_FULL,
                    429,
                    (1.0 - 1.0 / fill)
                    * (t.queued_tokens + cost)
                    / (rate * t.weight / q.backlogged_weight(extra=t)),
                    f"tenant {t.tenant_id!r} holds {t.queued_tokens} queued tokens in "
                    f"{t.queued_requests} requests: its weighted share of the queue bounds "
                    f"({cfg.max_queued_tokens} tokens, {cfg.max_queued_requests} requests)",
                ), displaced
            for gone in plan:
                q.remove(gone.req_id)
                refusal = self.refusal(
                    gone.req_id,
                    RefusalReason.DISPLACED,
                    429,
                    gone.cost_tokens / rate,
                    f"displaced from a full queue: project {gone.project_id!r} exceeds its share of "
                    f"tenant {t.tenant_id!r}",
                )
                displaced.append((gone.req_id, refusal))
            return None, displaced
        # Push out the newest requests of the tenants most over their shares.
        while over():
            victim = max(
                (u for u in q.backlogged_tenants() if u is not t),
                key=lambda u: (self._fill(u, t), -u.order),
                default=None,
            )
            if victim is None or self._fill(victim, t) <= 1.0:
                break
            item = q.newest(victim.tenant_id)
            if item is None:
                break
            q.remove(item.req_id)
            refusal = self.refusal(
                item.req_id,
                RefusalReason.DISPLACED,
                429,
                item.cost_tokens / rate,
                f"displaced from a full queue: tenant {victim.tenant_id!r} exceeds its share",
            )
            displaced.append((item.req_id, refusal))
        if not over():
            return None, displaced
        return self.refusal(
            req_id,
            RefusalReason.POOL_QUEUE_FULL,
            503,
            max(q.queued_tokens + cost - cfg.max_queued_tokens, cost) / rate,
            f"the pool's queue is full ({q.queued_tokens} of {cfg.max_queued_tokens} tokens, "
            f"{len(q)} of {cfg.max_queued_requests} requests)",
        ), displaced

    def _within_tenant(
        self, t: TenantState, project_id: str | None, project_weight: float, cost: int
    ) -> list[QueuedRequest] | None:
        """The rule one level down: requests of the tenant's other projects to push out (newest of
        the project most over its weighted share of the tenant's share of the bounds first) so that
        a request of a project within its share fits the queue; None when that cannot make room
        (the project is over its share, or the others are not over theirs)."""
        cfg = self.config
        q = self._queue
        org = t.weight / q.backlogged_weight(extra=t)
        p = t.projects.get(project_id)
        weights = sum(u.weight for u in t.projects.values() if u.backlogged and u is not p)
        weights += project_weight

        def fill(tokens: int, requests: int, weight: float) -> float:
            frac = org * weight / weights
            return max(tokens / (cfg.max_queued_tokens * frac), requests / (cfg.max_queued_requests * frac))

        own_tokens = (p.queued_tokens if p is not None else 0) + cost
        own_requests = (p.queued_requests if p is not None else 0) + 1
        if fill(own_tokens, own_requests, project_weight) > 1.0:
            return None
        # Dry run on copies of the others' counts, so nothing is pushed out unless it makes room.
        others = [_Left(u) for u in t.projects.values() if u.backlogged and u is not p]
        over_tokens = q.queued_tokens + cost - cfg.max_queued_tokens
        over_requests = len(q) + 1 - cfg.max_queued_requests
        plan: list[QueuedRequest] = []
        while over_tokens > 0 or over_requests > 0:
            best = max(
                others,
                key=lambda o: (fill(o.tokens, o.requests, o.project.weight), -o.project.order),
                default=None,
            )
            if best is None or fill(best.tokens, best.requests, best.project.weight) <= 1.0:
                return None
            item = next((i for i in best.newest_first if i.alive), None)
            if item is None:
                return None
            plan.append(item)
            best.tokens -= item.cost_tokens
            best.requests -= 1
            over_tokens -= item.cost_tokens
            over_requests -= 1
        return plan

    def refusal(
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
