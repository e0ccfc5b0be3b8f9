"""Hardware-aware routing across the pools that serve one model on different GPU types.

For each candidate pool the router predicts the request's TTFT and TPOT from the pool's last load
snapshot (at most ~1 s stale) and the performance model, then picks the cheapest pool (price per
token) predicted to meet both SLOs, else the one predicted to finish soonest.

Prediction for a pool with snapshot ``s`` (all per replica where it matters):

* batch = the sequences that will run beside it: in flight + queued + routed here since the snapshot
  + itself, capped by the pool's current limit; the excess waits in the queue.
* queue wait = 0 if it fits under the limit, else queued tokens over the measured drain rate.
* TPOT = model decode step at that batch and the running sequences' mean context, times the pool's
  measured/predicted TPOT ratio (which folds in chunked-prefill interference and model error).
* TTFT = queue wait + one step per prefill chunk, each the slower of the chunk and a decode step.

Requests routed since a pool's snapshot are added to its load until a newer snapshot covers them,
so a burst between two snapshots does not all land on the same pool.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from serving.admission import LoadSnapshot
from serving.routing._types import (
    NoPoolForGpuError,
    PoolInfo,
    Prediction,
    RouteDecision,
    RouterConfig,
    RouteReason,
    RouteRequest,
    RoutingError,
    RoutingStats,
)


class Router:
    """Pure routing policy (clock passed in); one per gateway replica."""

    def __init__(self, pools: Sequence[PoolInfo], config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        ids = [p.pool_id for p in pools]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate pool ids: {ids}")
        self._pools = {p.pool_id: p for p in pools}
        self._snaps: dict[str, LoadSnapshot] = {}
        self._pending: dict[str, deque[tuple[float, int]]] = {p.pool_id: deque() for p in pools}
        self._stats = RoutingStats()

    def update_snapshot(self, pool_id: str, snap: LoadSnapshot) -> None:
        """Take a pool's newest load (merged over its replicas); older ones are ignored."""
        if pool_id not in self._pools:
            return
        old = self._snaps.get(pool_id)
        if old is not None and old.taken_at_s > snap.taken_at_s:
            return
        self._snaps[pool_id] = snap
        pending = self._pending[pool_id]
        while pending and pending[0][0] <= snap.taken_at_s:
            pending.popleft()
        if snap.recent_tpot_s is not None:
            self._stats.measured_tpot_s[pool_id] = snap.recent_tpot_s

    # ---- prediction -------------------------------------------------------------------------------
    def predict(self, pool: PoolInfo, req: RouteRequest, now: float) -> Prediction:
        cfg = self.config
        out = min(req.max_tokens, cfg.expected_output_tokens)
        snap = self._snaps.get(pool.pool_id)
        if snap is not None and now - snap.taken_at_s > cfg.stale_after_s:
            snap = None
        pending = self._pending[pool.pool_id]
        pend_seqs = len(pending)
        pend_tokens = sum(t for _, t in pending)
        m = pool.predictor
        if snap is None:
            replicas = pool.replicas
            in_flight, queued, queued_tokens = pend_seqs, 0, 0
            limit = pool.max_num_seqs * replicas
            ctx = req.prompt_tokens + out // 2
            drain = math.inf
            corr = 1.0
        else:
            replicas = max(snap.replicas, 1)
            in_flight, queued, queued_tokens = snap.in_flight_seqs, snap.queued_requests, snap.queued_tokens
            limit = max(snap.seq_limit, 1)
            ctx = (
                snap.in_flight_tokens // snap.in_flight_seqs
                if snap.in_flight_seqs
                else req.prompt_tokens + out // 2
            )
            drain = snap.drain_rate_tokens_per_s
            corr = 1.0
            if snap.recent_tpot_s is not None and snap.in_flight_seqs > 0:
                now_batch = math.ceil(snap.in_flight_seqs / replicas)
                base = m.decode_step_time_uniform_s(now_batch, max(ctx, 1))
                lo, hi = cfg.measured_correction_bounds
                corr = min(hi, max(lo, snap.recent_tpot_s / base))
            in_flight += pend_seqs
        wanted = in_flight + queued + 1
        batch = math.ceil(min(wanted, limit) / replicas)
        if wanted > limit:
            wait = (queued_tokens + pend_tokens + req.prompt_tokens + req.max_tokens) / max(drain, 1e-9)
        else:
            wait = 0.0
        tpot = m.decode_step_time_uniform_s(max(batch, 1), max(ctx, 1)) * corr
        cached = min((req.cached_tokens or {}).get(pool.pool_id, 0), max(req.prompt_tokens - 1, 0))
        chunks = max(1, math.ceil((req.prompt_tokens - cached) / pool.chunk_tokens))
        chunk_s = (
            m.chunked_prefill_time_s(req.prompt_tokens, pool.chunk_tokens, cached_tokens=cached) / chunks
        )
        ttft = wait + chunks * max(chunk_s, tpot)
        meets = (
            ttft * 1000.0 <= cfg.slo_margin * req.ttft_slo_ms
            and tpot * 1000.0 <= cfg.slo_margin * req.tpot_slo_ms
            and wait <= pool.queue_deadline_s
        )
        return Prediction(pool.pool_id, ttft, tpot, wait, meets, stale=snap is None)

    # ---- decision ---------------------------------------------------------------------------------
    def route(self, req: RouteRequest, now: float) -> RouteDecision:
        """Choose a pool for ``req``; raises :class:`RoutingError` if none serves it."""
        pools = [p for p in self._pools.values() if p.model == req.model]
        if not pools:
            raise RoutingError(f"no pool serves model {req.model!r}")
        if req.pinned_gpu is not None:
            pinned = [p for p in pools if p.gpu_type.lower() == req.pinned_gpu.lower()]
            if not pinned:
                raise NoPoolForGpuError(req.model, req.pinned_gpu, sorted({p.gpu_type for p in pools}))
            pools = pinned
        preds = {p.pool_id: self.predict(p, req, now) for p in pools}
        by_price = sorted(pools, key=lambda p: (p.price_per_mtok, preds[p.pool_id].ttft_s))
        out = min(req.max_tokens, self.config.expected_output_tokens)

        def finish_s(p: PoolInfo) -> float:
            pr = preds[p.pool_id]
            return pr.ttft_s + max(out - 1, 0) * pr.tpot_s

        if len(pools) == 1:
            chosen, reason = pools[0], RouteReason.ONLY_CANDIDATE
        elif all(pr.stale for pr in preds.values()):
            chosen = next((p for p in by_price if preds[p.pool_id].meets_slo), by_price[0])
            reason = RouteReason.NO_LOAD_DATA
        else:
            meeting = [p for p in by_price if preds[p.pool_id].meets_slo]
            if meeting:
                chosen = meeting[0]
                cheaper_missed = chosen.price_per_mtok > by_price[0].price_per_mtok
                reason = (
                    RouteReason.CHEAPER_POOLS_MISS_SLO if cheaper_missed else RouteReason.CHEAPEST_MEETS_SLO
                )
            else:
                chosen, reason = min(pools, key=finish_s), RouteReason.FASTEST_NONE_MEET_SLO
        self._pending[chosen.pool_id].append((now, req.prompt_tokens + req.max_tokens))
        key = (chosen.pool_id, reason.value)
        self._stats.decisions_total[key] = self._stats.decisions_total.get(key, 0) + 1
        self._stats.predicted_tpot_s[chosen.pool_id] = preds[chosen.pool_id].tpot_s
        return RouteDecision(
            pool_id=chosen.pool_id,
            reason=reason,
            prediction=preds[chosen.pool_id],
            pinned=req.pinned_gpu is not None,
            candidates=tuple(preds[p.pool_id] for p in pools),
        )

    def stats(self) -> RoutingStats:
        st = self._stats
        return RoutingStats(dict(st.decisions_total), dict(st.predicted_tpot_s), dict(st.measured_tpot_s))


def price_per_mtok(price_per_hour: float, tokens_per_s: float, gpus_per_replica: int = 1) -> float:
    """Price per million tokens of a replica costing ``price_per_hour`` per GPU at that throughput."""
    if tokens_per_s <= 0:
        raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s}")
    return price_per_hour * gpus_per_replica / 3600.0 / tokens_per_s * 1e6
