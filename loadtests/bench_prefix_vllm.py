"""Cache-aware routing on the real engine (issue 17): the tiny model on vLLM's CPU build, two replicas
of one pool with prefix caching on, through the live gateway; agent sessions (a few agents, each a
shared system prompt, conversations growing turn by turn) routed cache-blind
(``gateway.prefix_routing: false``) and cache-aware, one deployment after the other in one run.

Prints for each: vLLM's own prefix-cache hit rate (``vllm:prefix_cache_hits`` / ``queries`` over the
run, both replicas), the cached tokens the responses reported, the router's predicted cached tokens
(``tokenweir_prefix_routing_predicted_cached_tokens``, aware only: the index fed by vLLM's KV-cache
events) against vLLM's hits, how many KV-cache event frames reached the gateway, and client-side
TTFT p50/p99. On the tiny model prefill is too cheap for TTFT to show much: the hit counters are the
comparison that means something here.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python loadtests/bench_prefix_vllm.py [--sessions 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's serving and loadtests
from loadtests.overload import ADMIN_KEY, Fleet, deployed, free_port, quantile, scrape


def config(state_dir: Path, aware: bool) -> Any:
    from serving.config import parse_config

    return parse_config(
        {
            "gateway": {
                "host": "127.0.0.1",
                "port": free_port(),
                "internal_port": free_port(),
                "replicas": 1,
                "prefix_routing": aware,
                "access_log": False,
            },
            "metering": {"admin_key": ADMIN_KEY},
            "ray": {"namespace": "tokenweir-bench-prefix"},
            "state_dir": str(state_dir),
            "pools": [
                {
                    "name": "tiny-cpu",
                    "model": "tiny-llama",
                    "accelerator": "CPU",
                    "engine": "vllm",
                    "replicas": 2,
                    "engine_args": {"kv_cache_space_gib": 1, "max_num_seqs": 16},
                    "slo": {"ttft_ms": 10_000, "tpot_ms": 1_000},
                }
            ],
        }
    )


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(100_000)}" for _ in range(n))


async def session(
    http: httpx.AsyncClient, system: str, rng: random.Random, turns: int, out: dict[str, list[float]]
) -> None:
    prompt = system
    for _ in range(turns):
        prompt += "\nuser: " + words(rng, 6) + "\nassistant:"
        t0 = time.perf_counter()
        ttft = None
        answer = ""
        async with http.stream(
            "POST",
            "/v1/completions",
            json={
                "model": "tiny-llama",
                "prompt": prompt,
                "max_tokens": 16,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev.get("choices"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    answer += ev["choices"][0].get("text", "")
                if ev.get("usage"):
                    u = ev["usage"]
                    out["prompt"].append(u["prompt_tokens"])
                    out["cached"].append((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
        out["ttft"].append(ttft or 0.0)
        prompt += answer
        await asyncio.sleep(rng.uniform(0.1, 0.4))  # think time


def _sum(m: dict[str, dict[Any, float]], name: str) -> float:
    return sum(m.get(name, {}).values())


async def run(fleet: Fleet, sessions: int, concurrency: int, seed: int) -> dict[str, float]:
    key = fleet.tenant("bench")
    rng = random.Random(seed)
    systems = [words(random.Random(seed + 100 + a), 110) for a in range(4)]  # 4 agents, ~5 blocks each
    before = scrape(fleet.internal_url)
    out: dict[str, list[float]] = {"ttft": [], "prompt": [], "cached": []}
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=fleet.url, headers={"Authorization": f"Bearer {key}"}, timeout=300
    ) as http:

        async def one(i: int) -> None:
            async with sem:
                await session(http, systems[i % len(systems)], random.Random(rng.random()), 4, out)

        await asyncio.gather(*(one(i) for i in range(sessions)))
    await asyncio.sleep(2.5)  # one more board publication of the gateway's and engines' counters
    after = scrape(fleet.internal_url)

    def delta(name: str) -> float:
        return _sum(after, name) - _sum(before, name)

    return {
        "queries": delta("vllm:prefix_cache_queries_total"),
        "hits": delta("vllm:prefix_cache_hits_total"),
        "reported_cached": float(sum(out["cached"])),
        "prompt": float(sum(out["prompt"])),
        "predicted": delta("tokenweir_prefix_routing_predicted_cached_tokens_total"),
        "routed_prompt": delta("tokenweir_prefix_routing_prompt_tokens_total"),
        "event_frames": delta("tokenweir_prefix_cache_event_frames_total"),
        "ttft_p50_ms": quantile(out["ttft"], 0.5) * 1e3,
        "ttft_p99_ms": quantile(out["ttft"], 0.99) * 1e3,
        "turns": float(len(out["ttft"])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for name, aware in (("cache-blind", False), ("cache-aware", True)):
        state_dir = Path(tempfile.mkdtemp(prefix="tw-bench-prefix-"))
        with deployed(state_dir, config(state_dir, aware)) as fleet:
            r = asyncio.run(run(fleet, args.sessions, args.concurrency, args.seed))
        rate = r["hits"] / r["queries"] if r["queries"] else 0.0
        pred = (
            f"router predicted {r['predicted']:.0f} cached tokens of {r['routed_prompt']:.0f} routed"
            f" ({r['predicted'] / r['hits']:.2f}x vLLM's hits), {r['event_frames']:.0f} KV-event frames"
            if aware and r["hits"]
            else "router: cache-blind"
        )
        rows.append(
            f"{name}: {r['turns']:.0f} turns; vLLM prefix cache hit rate {rate:.1%}"
            f" ({r['hits']:.0f} of {r['queries']:.0f} tokens); responses reported {r['reported_cached']:.0f}"
            f" cached of {r['prompt']:.0f} prompt tokens; {pred}; TTFT p50 {r['ttft_p50_ms']:.0f} ms,"
            f" p99 {r['ttft_p99_ms']:.0f} ms"
        )
        print(rows[-1], flush=True)
    print("\n".join(["", *rows]))


if __name__ == "__main__":
    main()
