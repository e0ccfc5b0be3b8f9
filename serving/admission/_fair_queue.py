"""A tenant-fair queue with virtual token counters (VTC, Sheng et al., OSDI '24).

Each tenant has a counter that grows by the weighted tokens it is served:
``(prompt_price * prompt + completion_price * completion) / weight``. The next request comes from
the backlogged tenant with the smallest counter (FIFO within a tenant). A tenant that becomes
backlogged again is lifted to the smallest counter among the active tenants (backlogged or with
requests in flight), so idle time banks no credit.
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
    alive: bool = True

    @property
    def cost_tokens(self) -> int:
        """Queue cost: the most tokens this request can occupy (prompt + max_tokens)."""
        return self.prompt_tokens + self.max_tokens


@dataclass(slots=True)
class TenantState:
    """One tenant's counter, backlog and service."""

    tenant_id: str
    order: int
    """Tie-break between equal counters: first seen first."""
    weight: float = 1.0
    counter: float = 0.0
    queue: deque[QueuedRequest] = field(default_factory=deque)
    queued_requests: int = 0
    queued_tokens: int = 0
    in_flight: int = 0
    served_prompt_tokens: int = 0
    served_completion_tokens: int = 0

    @property
    def backlogged(self) -> bool:
        return self.queued_requests > 0


class FairQueue:
    """Per-tenant FIFO queues served in order of smallest virtual token counter."""

    def __init__(self, prompt_token_price: float, completion_token_price: float) -> None:
        self._pp = prompt_token_price
        self._cp = completion_token_price
        self._tenants: dict[str, TenantState] = {}
        self._by_id: dict[str, QueuedRequest] = {}
        self.queued_tokens = 0

    # ---- tenants and counters -------------------------------------------------------------
    def tenant(self, tenant_id: str, weight: float | None = None) -> TenantState:
        """The tenant's state (created on first sight); ``weight`` updates its weight."""
        t = self._tenants.get(tenant_id)
        if t is None:
            t = TenantState(tenant_id=tenant_id, order=len(self._tenants))
            self._tenants[tenant_id] = t
        if weight is not None:
            if weight <= 0:
                raise ValueError(f"tenant {tenant_id!r}: weight must be > 0, got {weight}")
            t.weight = weight
        return t

    def tenants(self) -> Iterator[TenantState]:
        return iter(self._tenants.values())

    def activate(self, t: TenantState) -> None:
        """Apply the lift rule to a tenant that is about to become active (backlogged or running)."""
        t.counter = self.lifted_counter(t)

    def lifted_counter(self, t: TenantState) -> float:
        """The tenant's counter once active: lifted to the smallest active counter if it is idle."""
        if t.backlogged or t.in_flight > 0:
            return t.counter
        active = self.active_counters(exclude=t)
        return max(t.counter, min(active)) if active else t.counter

    def active_counters(self, exclude: TenantState) -> list[float]:
        """The counters of the other active tenants (backlogged or running)."""
        return [
            u.counter for u in self._tenants.values() if u is not exclude and (u.backlogged or u.in_flight)
        ]

    def charge(self, tenant_id: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Add served tokens to the tenant's counter (negative amounts correct an over-charge)."""
        t = self.tenant(tenant_id)
        t.counter += (self._pp * prompt_tokens + self._cp * completion_tokens) / t.weight
        t.served_prompt_tokens += prompt_tokens
        t.served_completion_tokens += completion_tokens

    def backlogged_weight(self, extra: TenantState | None = None) -> float:
        """Sum of weights of backlogged tenants (plus ``extra`` if it is not one of them)."""
        w = sum(t.weight for t in self._tenants.values() if t.backlogged)
        if extra is not None and not extra.backlogged:
            w += extra.weight
        return w

    def backlogged_tenants(self) -> list[TenantState]:
        return [t for t in self._tenants.values() if t.backlogged]

    # ---- the queue ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._by_id

    def get(self, req_id: str) -> QueuedRequest | None:
        return self._by_id.get(req_id)

    def push(self, item: QueuedRequest, weight: float) -> None:
        if item.req_id in self._by_id:
            raise ValueError(f"request {item.req_id!r} is already queued")
        t = self.tenant(item.tenant_id, weight)
        self.activate(t)
        t.queue.append(item)
        t.queued_requests += 1
        t.queued_tokens += item.cost_tokens
        self.queued_tokens += item.cost_tokens
        self._by_id[item.req_id] = item

    def peek(self) -> QueuedRequest | None:
        """The request that is served next, without removing it."""
        best: TenantState | None = None
        for t in self._tenants.values():
            if t.backlogged and (best is None or (t.counter, t.order) < (best.counter, best.order)):
                best = t
        if best is None:
            return None
        while not best.queue[0].alive:
            best.queue.popleft()
        return best.queue[0]

    def remove(self, req_id: str) -> QueuedRequest | None:
        """Take a request out of the queue (served, expired, displaced or cancelled)."""
        item = self._by_id.pop(req_id, None)
        if item is None:
            return None
        item.alive = False
        t = self._tenants[item.tenant_id]
        t.queued_requests -= 1
        t.queued_tokens -= item.cost_tokens
        self.queued_tokens -= item.cost_tokens
        q = t.queue
        while q and not q[0].alive:
            q.popleft()
        while q and not q[-1].alive:
            q.pop()
        return item

    def newest(self, tenant_id: str) -> QueuedRequest | None:
        """The tenant's most recently queued live request (the one to displace first)."""
        t = self._tenants.get(tenant_id)
        if t is None:
            return None
        for item in reversed(t.queue):
            if item.alive:
                return item
        return None
