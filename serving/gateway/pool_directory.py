"""The gateway's view of the pools: their Serve handles (control calls only), static facts for
routing, the load each publishes on the load board (refreshed every ``PUBLISH_INTERVAL_S``, so at
most ~1 s stale), and which of their replicas the transport reaches."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from serving.admission import LoadSnapshot, merge_snapshots
from serving.config.resolved import ResolvedPool
from serving.engines.cpu_placement import avoid_cores, engine_cores_on
from serving.errors import PoolUnavailableError
from serving.gateway.transport import ChannelLost, ChannelTransport
from serving.hardware import PerfModel
from serving.kvcache import CacheRuns
from serving.pools.loadboard import PUBLISH_INTERVAL_S
from serving.routing import (
    PoolInfo,
    PrefixRouter,
    PromptBlocks,
    RouteDecision,
    Router,
    RouteRequest,
    pick_replica,
)

log = logging.getLogger("tokenweir.gateway.pools")


@dataclass
class PoolRef:
    """A pool as the gateway sees it: config facts and its deployment handle (for control calls)."""

    name: str
    model: str
    accelerator: str
    replicas: int
    handle: Any
    ttft_slo_ms: float = 2000.0
    tpot_slo_ms: float = 100.0
    in_flight: int = 0
    board: list[dict[str, Any]] = field(default_factory=list)
    """The latest payload of each replica from the load board (for /metrics and status)."""
    replica_keys: list[str] = field(default_factory=list)
    """The replicas on the board: where requests may go."""

    async def stats(self) -> dict[str, Any]:
        """One replica's stats (whichever Serve picks)."""
        return dict(await self.handle.stats.remote())

    async def ready(self) -> bool:
        """Whether a replica answers its readiness probe."""
        return bool(await self.handle.ready.remote())


def pool_info(pool: ResolvedPool) -> PoolInfo:
    """Static routing facts of a pool: its performance model, price per token, batch bounds, and
    whether its replicas are chosen by cached prefix (:attr:`ResolvedPool.prefix_routed`)."""
    args = pool.engine_args
    perf = PerfModel(pool.arch, pool.gpu)
    chunk = int(args.get("max_num_batched_tokens", 2048))
    block = pool.block_tokens
    kv = pool.kv_capacity_tokens(perf)
    return PoolInfo(
        pool_id=pool.name,
        model=pool.model,
        gpu_type=pool.accelerator,
        price_per_mtok=pool.price_per_mtok,
        predictor=perf,
        chunk_tokens=chunk,
        max_num_seqs=int(args.get("max_num_seqs", 256)),
        queue_deadline_s=pool.admission.queue_deadline_s_at(pool.slo.ttft_ms),
        replicas=pool.replicas,
        prefix_caching=pool.prefix_routed and kv > 0,
        block_tokens=block,
        kv_capacity_tokens=kv,
    )


class PoolDirectory:
    """Pools by model, the router over them, and the board reader that feeds it."""

    def __init__(
        self,
        pools: list[PoolRef],
        infos: list[PoolInfo],
        transport: ChannelTransport,
        node: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``node``: this gateway's node address; it keeps off the cores of same-node vLLM CPU
        workers that pools publish (:mod:`serving.engines.cpu_placement`)."""
        self.pools = pools
        self.node = node
        self.avoided_cores: frozenset[int] = frozenset()
        self.transport = transport
        transport.on_cache = self._apply_cache
        self._pool_of: dict[str, str] = {}
        """Replica key -> its pool's name (from the board)."""
        self._rng = rng or random.Random()
        self.by_name = {p.name: p for p in pools}
        self.router = Router(infos)
        self.prefix = {
            i.pool_id: PrefixRouter(i.block_tokens, max(i.kv_capacity_tokens // i.block_tokens, 1))
            for i in infos
            if i.prefix_caching
        }
        """Per pool with a prefix cache: replica choice by cached prefix (this gateway's estimate)."""
        self._by_model: dict[str, list[PoolRef]] = defaultdict(list)
        for p in pools:
            self._by_model[p.model].append(p)
        self.gpu_types = {p.accelerator.lower() for p in pools}

    def serves(self, model: str) -> bool:
        """Whether some pool serves ``model``."""
        return model in self._by_model

    def choose(
        self,
        model: str,
        prompt_tokens: int,
        max_tokens: int,
        pinned_gpu: str | None,
        exclude: str | None = None,
        blocks: PromptBlocks | None = None,
    ) -> tuple[PoolRef, RouteDecision | None]:
        """The pool for one request (``exclude``: a pool just failed; take another if any). An
        unpinned request goes to a pool with a replica on the board: the router's last snapshot of
        a pool whose replicas are all gone is stale, which it reads as an idle pool. With the
        prompt's ``blocks``, each prefix-caching pool's predicted TTFT counts only what its best
        replica has not cached."""
        candidates = self._by_model[model]
        if exclude and len(candidates) > 1 and pinned_gpu is None:
            others = [p for p in candidates if p.name != exclude]
            return min(others, key=lambda p: p.in_flight / p.replicas), None
        slo_ttft = min(p.ttft_slo_ms for p in candidates)
        slo_tpot = min(p.tpot_slo_ms for p in candidates)
        cached = None
        if blocks is not None and len(candidates) > 1:
            cached = {
                p.name: self.prefix[p.name].cached_tokens(p.replica_keys, blocks)
                for p in candidates
                if p.name in self.prefix
            }
        decision = self.router.route(
            RouteRequest(model, prompt_tokens, max_tokens, slo_ttft, slo_tpot, pinned_gpu, cached),
            time.time(),
        )
        chosen = self.by_name[decision.pool_id]
        if pinned_gpu is None and not chosen.replica_keys:
            up = [p for p in candidates if p.replica_keys]
            if up:
                return min(up, key=lambda p: p.in_flight / p.replicas), None
        return chosen, decision

    def _follow_engine_hashing(self, name: str, payloads: list[dict[str, Any]]) -> None:
        """Hash prompts as the pool's engines say they do (block size and ``NONE_HASH`` seed, read
        from the started engine): a config that assumed otherwise would never predict a hit."""
        prefix = self.prefix.get(name)
        hashing = next((tuple(p["prefix_hashing"]) for p in payloads if p.get("prefix_hashing")), None)
        if prefix is None or hashing is None or hashing == (prefix.block_tokens, prefix.none_hash_seed):
            return
        block, seed = int(hashing[0]), str(hashing[1])
        capacity_tokens = prefix.index.capacity_blocks * prefix.block_tokens
        log.warning(
            "pool %s: its engines hash blocks of %d tokens (seed %r), not %d (%r): the router follows them",
            name,
            block,
            seed,
            prefix.block_tokens,
            prefix.none_hash_seed,
        )
        self.prefix[name] = PrefixRouter(block, max(capacity_tokens // block, 1), none_hash_seed=seed)

    def _apply_cache(self, replica: str, runs: CacheRuns, cleared: bool) -> None:
        """A pool replica's KV-cache events (its engine's own account of what it holds, whoever
        routed there): the router's index of that replica follows them."""
        name = self._pool_of.get(replica)
        prefix = self.prefix.get(name) if name is not None else None
        if prefix is not None:
            prefix.index.apply(replica, runs, cleared)
            prefix.stats.cache_events += 1

    def reachable(self) -> dict[str, str]:
        """Per pool: ``"ready"`` when this gateway reaches one of its replicas on the transport."""
        return {
            p.name: "ready"
            if any(self.transport.usable(k) for k in p.replica_keys)
            else "not ready: no reachable replica"
            for p in self.pools
        }

    async def replica(
        self,
        pool: PoolRef,
        exclude: str | None,
        deadline: float,
        prompt_ids: Sequence[int] | PromptBlocks = (),
        cache_salt: str | None = None,
    ) -> str:
        """A usable replica of ``pool`` (another than ``exclude`` if there is one), waiting for one
        to connect until ``deadline`` (loop clock): :class:`ChannelLost` past it. With the prompt's
        token ids and a prefix-caching pool, the one holding most of its prefix within the load bound
        (hashed with the request's ``cache_salt``, as the engine hashes it).

        Waits only while the board lists a replica of the pool (one whose channel is connecting or
        reconnecting): with none listed, as when every node of its GPU type is gone, nothing is
        coming to wait for, and :class:`PoolUnavailableError` says so at once (503)."""
        loop = asyncio.get_running_loop()
        transport = self.transport
        prefix = self.prefix.get(pool.name) if prompt_ids else None
        while True:
            if not pool.replica_keys:
                raise PoolUnavailableError(pool.name)
            usable = [k for k in pool.replica_keys if transport.usable(k)]
            others = [k for k in usable if k != exclude]
            if prefix is not None:
                choice = prefix.choose(
                    others or usable, transport.load, prompt_ids, self._rng, cache_salt=cache_salt
                )
                key = choice.replica if choice is not None else None
            else:
                key = pick_replica(others or usable, transport.load, self._rng)
            if key is not None:
                return key
            left = deadline - loop.time()
            if left <= 0:
                raise ChannelLost(f"no replica of pool {pool.name} is reachable")
            await transport.wait_changed(left)

    def apply_board(self, entries: list[tuple[str, str, float, Any]]) -> None:
        """Take the board's pool entries: merge each pool's replica snapshots for the router."""
        per_pool: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for _kind, _key, _age, payload in entries:
            per_pool[payload["pool"]].append(payload)
        self.transport.sync(
            (p["replica"], *p["channel"]) for _k, _key, _a, p in entries if p.get("pool") in self.by_name
        )
        if self.node is not None:
            busy = engine_cores_on(self.node, (p for _k, _key, _a, p in entries))
            if busy - self.avoided_cores:
                self.avoided_cores |= busy
                moved = avoid_cores(self.avoided_cores)
                if moved is not None:
                    log.info(
                        "gateway moved to cores %s (vLLM CPU workers on %s)", sorted(moved), sorted(busy)
                    )
        for name, ref in self.by_name.items():
            payloads = per_pool.get(name, [])
            ref.board = payloads
            keys = [p["replica"] for p in payloads]
            for gone in set(ref.replica_keys) - set(keys):
                self._pool_of.pop(gone, None)
                if name in self.prefix:
                    self.prefix[name].index.forget(gone)  # a replica that comes back starts cold
            ref.replica_keys = keys
            for k in keys:
                self._pool_of[k] = name
            self._follow_engine_hashing(name, payloads)
            snaps: list[LoadSnapshot] = [p["snapshot"] for p in payloads]
            if snaps:
                self.router.update_snapshot(name, merge_snapshots(snaps))
        self.transport.notify()

    async def follow_board(self, board: Any) -> None:
        """Background task: read the board every publish interval (one small actor call)."""
        while True:
            try:
                self.apply_board(await board.read.remote("pool"))
            except Exception:  # keep routing on the last snapshots; they go stale and are ignored
                log.debug("load board read failed", exc_info=True)
            await asyncio.sleep(PUBLISH_INTERVAL_S)
