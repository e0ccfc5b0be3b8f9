"""A hierarchical fair queue with virtual token counters (VTC, Sheng et al., OSDI '24).

Two levels: an organization (the tenant) and, within it, its projects. Each has a counter that
grows by the weighted tokens it is served: ``(prompt_price * prompt + completion_price *
completion) / weight``, the organization's by its weight, the project's by its weight within the
organization. The next request comes from the backlogged organization with the smallest counter,
within it from the backlogged project with the smallest counter, FIFO within a project. So
organizations share the pool by their weights, and each organization's part is shared by its
projects' weights; a request without a project (``None``) is in its organization's one implicit
project, where this is exactly flat VTC over organizations.

Idle time banks no credit at either level. An organization that becomes active again (backlogged or
with requests in flight) is lifted to the smallest counter among the active organizations; nor does
service owe a debt when nobody else wanted it: one that comes back ahead of every active
organization (it was served alone, and the others arrived since) is brought down to the largest of
their counters, or it would wait until they had caught up with everything it got alone. A
project's state lives only while it is active: an idle project is dropped, and one arriving starts
at the smallest counter among its organization's active projects. (VTC would lift it to the larger
of that and its old counter; an idle project can be ahead by at most what it was served since it was
last the smallest, about one request, so dropping forgets at most that and keeps the state bounded
by the live requests, whatever the number of projects.)

Work per pick is O(backlogged organizations + backlogged projects of the one picked); a lift is
O(active organizations) or O(active projects of the organization).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(slots=True)
class QueuedRequest:
    """One request waiting in the fair queue."""

    req_id: str
    tenant_id: str
    prompt_tokens: int
    max_tokens: int
    submitted_at_s: float
    deadline_s: float
    project_id: str | None = None
    alive: bool = True

    @property
    def cost_tokens(self) -> int:
        """Queue cost: the most tokens this request can occupy (prompt + max_tokens)."""
        return self.prompt_tokens + self.max_tokens


@dataclass(slots=True)
class ProjectState:
    """One project's counter and backlog within its organization (kept only while active)."""

    project_id: str | None
    order: int
    """Tie-break between equal counters within the organization: first arrived first."""
    weight: float = 1.0
    counter: float = 0.0
    queue: deque[QueuedRequest] = field(default_factory=deque)
    queued_requests: int = 0
    queued_tokens: int = 0
    in_flight: int = 0

    @property
    def backlogged(self) -> bool:
        return self.queued_requests > 0


@dataclass(slots=True)
class TenantState:
    """One organization's counter, backlog and service."""

    tenant_id: str
    order: int
    """Tie-break between equal counters: first seen first."""
    weight: float = 1.0
    counter: float = 0.0
    queued_requests: int = 0
    queued_tokens: int = 0
    in_flight: int = 0
    served_prompt_tokens: int = 0
    served_completion_tokens: int = 0
    projects: dict[str | None, ProjectState] = field(default_factory=dict)
    """Its active projects (backlogged or in flight); an idle one is dropped."""
    project_arrivals: int = 0
    lingering: bool = False
    """Counted as active though idle (set by :meth:`FairQueue.linger`): a short pause between two
    of its requests does not lift it on its return."""

    @property
    def backlogged(self) -> bool:
        return self.queued_requests > 0


def _check_weight(what: str, weight: float) -> float:
    if not weight > 0:
        raise ValueError(f"{what}: weight must be > 0, got {weight}")
    return weight


class FairQueue:
    """Per-project FIFO queues, served by smallest virtual token counter: organization, then project."""

    def __init__(self, prompt_token_price: float, completion_token_price: float) -> None:
        self._pp = prompt_token_price
        self._cp = completion_token_price
        self._tenants: dict[str, TenantState] = {}
        """Every organization seen (bounded by the tenant table; its service totals are exported)."""
        self._active: dict[str, TenantState] = {}
        """Organizations backlogged or with requests in flight."""
        self._backlogged: dict[str, TenantState] = {}
        self._by_id: dict[str, QueuedRequest] = {}
        self.queued_tokens = 0

    # ---- organizations and counters --------------------------------------------------------
    def tenant(self, tenant_id: str, weight: float | None = None) -> TenantState:
        """The organization's state (created on first sight); ``weight`` updates its weight."""
        t = self._tenants.get(tenant_id)
        if t is None:
            t = TenantState(tenant_id=tenant_id, order=len(self._tenants))
            self._tenants[tenant_id] = t
        if weight is not None:
            t.weight = _check_weight(f"tenant {tenant_id!r}", weight)
        return t

    def tenants(self) -> Iterator[TenantState]:
        return iter(self._tenants.values())

    def lifted_counter(self, t: TenantState) -> float:
        """The organization's counter once active: if idle, lifted to the smallest active counter and
        brought down to the largest (no credit banked while idle, no debt for what it was served
        while the others were idle)."""
        if t.tenant_id in self._active:
            return t.counter
        active = self.active_counters(exclude=t)
        return min(max(t.counter, min(active)), max(active)) if active else t.counter

    def active_counters(self, exclude: TenantState) -> list[float]:
        """The counters of the other active organizations (backlogged or running)."""
        return [u.counter for u in self._active.values() if u is not exclude]

    def charge(
        self,
        tenant_id: str,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        project_id: str | None = None,
    ) -> None:
        """Add served tokens to the organization's and the project's counters (negative amounts
        correct an over-charge)."""
        t = self.tenant(tenant_id)
        cost = self._pp * prompt_tokens + self._cp * completion_tokens
        t.counter += cost / t.weight
        t.served_prompt_tokens += prompt_tokens
        t.served_completion_tokens += completion_tokens
        p = t.projects.get(project_id)
        if p is not None:
            p.counter += cost / p.weight

    def backlogged_weight(self, extra: TenantState | None = None) -> float:
        """Sum of weights of backlogged organizations (plus ``extra`` if it is not one of them)."""
        w = sum(t.weight for t in self._backlogged.values())
        if extra is not None and not extra.backlogged:
            w += extra.weight
        return w

    @property
    def active_count(self) -> int:
        """Organizations active (backlogged or running)."""
        return len(self._active)

    def backlogged_tenants(self) -> list[TenantState]:
        return list(self._backlogged.values())

    def _sync(self, t: TenantState) -> None:
        """Keep the active and backlogged sets in step with the organization's counts."""
        tid = t.tenant_id
        if t.backlogged:
            self._backlogged[tid] = t
        else:
            self._backlogged.pop(tid, None)
        if t.backlogged or t.in_flight > 0 or t.lingering:
            self._active[tid] = t
        else:
            self._active.pop(tid, None)

    def linger(self, tenant_id: str, on: bool) -> None:
        """Keep an organization active while idle (``on``), or stop: the caller (the admission core,
        which has the clock) decides for how long."""
        t = self._tenants[tenant_id]
        t.lingering = on
        self._sync(t)

    # ---- projects --------------------------------------------------------------------------
    def _activate(self, t: TenantState, project_id: str | None, project_weight: float) -> ProjectState:
        """Lift an organization about to become active and get its project (created at the
        smallest active project counter of the organization when it arrives)."""
        _check_weight(f"project {project_id!r} of tenant {t.tenant_id!r}", project_weight)
        t.counter = self.lifted_counter(t)
        p = t.projects.get(project_id)
        if p is None:
            floor = min((q.counter for q in t.projects.values()), default=0.0)
            p = ProjectState(project_id, t.project_arrivals, counter=floor)
            t.project_arrivals += 1
            t.projects[project_id] = p
        p.weight = project_weight
        return p

    def _drop_if_idle(self, t: TenantState, p: ProjectState) -> None:
        if not p.backlogged and p.in_flight == 0:
            del t.projects[p.project_id]

    def ahead_in_tenant(self, t: TenantState, project_id: str | None, project_weight: float) -> float:
        """Queued tokens of the organization that its fair order serves before a new request of
        this project: the project's own queue, and of each other backlogged project what it is
        served until the project's counter has grown by its queue (bounded by that project's
        queue). With one project, the organization's whole queue."""
        p = t.projects.get(project_id)
        if p is None:
            own = 0.0
            level = min((q.counter for q in t.projects.values()), default=0.0)
        else:
            own = float(p.queued_tokens)
            level = p.counter + p.queued_tokens / project_weight
        for q in t.projects.values():
            if q is not p and q.backlogged:
                own += min(float(q.queued_tokens), max(0.0, (level - q.counter) * q.weight))
        return own

    def owed_in_tenant(self, t: TenantState, project_id: str | None, ahead_in_tenant: float) -> int | None:
        """If a new request of this project is owed service within its organization (no other
        project's work before it in the organization's fair order, ``ahead_in_tenant`` being what
        :meth:`ahead_in_tenant` says, and another active project with a larger counter): the
        project's queued requests. None otherwise, and always with one project."""
        p = t.projects.get(project_id)
        if p is None:
            counter, own, queued = min((q.counter for q in t.projects.values()), default=0.0), 0, 0
        else:
            counter, own, queued = p.counter, p.queued_tokens, p.queued_requests
        if ahead_in_tenant > own or not any(q.counter > counter for q in t.projects.values() if q is not p):
            return None
        return queued

    # ---- the queue ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._by_id

    def get(self, req_id: str) -> QueuedRequest | None:
        return self._by_id.get(req_id)

    def start(self, t: TenantState, project_id: str | None = None, project_weight: float = 1.0) -> None:
        """A request of this organization and project starts without queueing (it is in flight)."""
        p = self._activate(t, project_id, project_weight)
        p.in_flight += 1
        t.in_flight += 1
        self._sync(t)

    def finish(self, tenant_id: str, project_id: str | None = None) -> None:
        """A request in flight ended."""
        t = self._tenants[tenant_id]
        t.in_flight -= 1
        p = t.projects.get(project_id)
        if p is not None:
            p.in_flight -= 1
            self._drop_if_idle(t, p)
        self._sync(t)

    def push(self, item: QueuedRequest, weight: float, project_weight: float = 1.0) -> None:
        if item.req_id in self._by_id:
            raise ValueError(f"request {item.req_id!r} is already queued")
        t = self.tenant(item.tenant_id, weight)
        p = self._activate(t, item.project_id, project_weight)
        p.queue.append(item)
        p.queued_requests += 1
        p.queued_tokens += item.cost_tokens
        t.queued_requests += 1
        t.queued_tokens += item.cost_tokens
        self.queued_tokens += item.cost_tokens
        self._by_id[item.req_id] = item
        self._sync(t)

    def peek(self) -> QueuedRequest | None:
        """The request that is served next, without removing it."""
        best: TenantState | None = None
        for t in self._backlogged.values():
            if best is None or (t.counter, t.order) < (best.counter, best.order):
                best = t
        if best is None:
            return None
        bp: ProjectState | None = None
        for p in best.projects.values():
            if p.backlogged and (bp is None or (p.counter, p.order) < (bp.counter, bp.order)):
                bp = p
        assert bp is not None, "a backlogged organization has a backlogged project"
        while not bp.queue[0].alive:
            bp.queue.popleft()
        return bp.queue[0]

    def release(self, req_id: str) -> QueuedRequest:
        """Take a queued request out to start it: it counts as in flight for its project and
        organization (which stay active throughout, so neither is lifted or dropped)."""
        item = self._by_id[req_id]
        t = self._tenants[item.tenant_id]
        p = t.projects[item.project_id]
        p.in_flight += 1
        t.in_flight += 1
        self.remove(req_id)
        return item

    def remove(self, req_id: str) -> QueuedRequest | None:
        """Take a request out of the queue (expired, displaced or cancelled)."""
        item = self._by_id.pop(req_id, None)
        if item is None:
            return None
        item.alive = False
        t = self._tenants[item.tenant_id]
        p = t.projects[item.project_id]
        p.queued_requests -= 1
        p.queued_tokens -= item.cost_tokens
        t.queued_requests -= 1
        t.queued_tokens -= item.cost_tokens
        self.queued_tokens -= item.cost_tokens
        q = p.queue
        while q and not q[0].alive:
            q.popleft()
        while q and not q[-1].alive:
            q.pop()
        self._drop_if_idle(t, p)
        self._sync(t)
        return item

    def newest(self, tenant_id: str) -> QueuedRequest | None:
        """The organization's request to displace first: the most recently queued live request of
        its project most over its weighted share of the organization's queue."""
        t = self._tenants.get(tenant_id)
        if t is None:
            return None
        victim = max(
            (p for p in t.projects.values() if p.backlogged),
            key=lambda p: (p.queued_tokens / p.weight, -p.order),
            default=None,
        )
        if victim is None:
            return None
        for item in reversed(victim.queue):
            if item.alive:
                return item
        return None
