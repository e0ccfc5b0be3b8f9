"""An OpenAI-compatible streaming server on the simulated engine, for agent-workload tests and runs
without Ray (a network-boundary fake around a real ``SimEngine``, prefix cache included).

``/v1/chat/completions`` renders the messages with a fixed template (a role marker token, then one
token per whitespace-separated word, ids from a CRC of the word), so a conversation that grows by
its previous answer shares its prompt prefix block for block, as it would with a real tokenizer.
Responses stream the engine's deltas; the usage chunk carries ``prompt_tokens_details.cached_tokens``
(the engine's prefix-cache hit). ``GET /metrics`` exports ``vllm:prefix_cache_queries_total`` and
``vllm:prefix_cache_hits_total``.

Run: ``python -m loadtests.sim_server --port 0 --speedup 10`` prints ``LISTENING <port>``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import zlib
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from serving.engines.base import EngineError, EngineRequest, SamplingSpec
from serving.engines.sim import SimEngine
from serving.hardware import EngineSettings, ModelArch, get_gpu

__all__ = ["SimServerConfig", "chat_token_ids", "start_sim_server"]

LLAMA8B = ModelArch("llama-3.1-8b", 8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256, 2)
_ROLE_IDS = {"system": 1, "user": 2, "assistant": 3, "tool": 4}
_GENERATION_PROMPT = 5
_VOCAB = 128_000


@dataclass(frozen=True, slots=True)
class SimServerConfig:
    """The simulated replica behind the server."""

    gpu: str = "H100"
    arch: ModelArch = LLAMA8B
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    speedup: float = 1.0
    """Step times are divided by this (a test runs the model's timeline faster)."""
    enable_prefix_caching: bool = True
    kv_capacity_tokens: int | None = None
    """Override the performance model's KV capacity (to force evictions in a test)."""


def _word_id(w: str) -> int:
    return 16 + zlib.crc32(w.encode()) % (_VOCAB - 16)


def chat_token_ids(messages: list[dict[str, Any]]) -> list[int]:
    """The prompt token ids of a chat: per message its role marker and one id per word."""
    ids: list[int] = []
    for m in messages:
        ids.append(_ROLE_IDS.get(str(m.get("role")), 4))
        ids += [_word_id(w) for w in str(m.get("content") or "").split()]
    ids.append(_GENERATION_PROMPT)
    return ids


def _err(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return web.json_response(body, status=status)


def make_app(engine: SimEngine) -> web.Application:
    ids = itertools.count()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        try:
            prompt = chat_token_ids(list(body["messages"]))
            sp = SamplingSpec(
                max_tokens=int(body.get("max_tokens", 16)), ignore_eos=bool(body.get("ignore_eos"))
            )
        except (KeyError, TypeError, ValueError) as e:
            return _err(400, "invalid_request", str(e))
        rid = f"sim-{next(ids)}"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        usage: dict[str, Any] = {}
        try:
            async for chunk in engine.generate(EngineRequest(rid, prompt, sp)):
                for d in chunk.deltas:
                    if d.text:
                        event = {"id": rid, "choices": [{"index": d.index, "delta": {"content": d.text}}]}
                        await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                usage = {
                    "prompt_tokens": chunk.prompt_tokens,
                    "completion_tokens": chunk.completion_tokens,
                    "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": chunk.cached_tokens},
                }
        except EngineError as e:
            err = {
                "error": {"message": str(e), "type": "server_error", "param": None, "code": "engine_error"}
            }
            await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
        await resp.write(
            b"data: " + json.dumps({"id": rid, "choices": [], "usage": usage}).encode() + b"\n\n"
        )
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def metrics(request: web.Request) -> web.Response:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily

        st = engine.prefix_cache_stats()

        class Engine:
            def collect(self) -> Any:
                if st is None:
                    return
                q = CounterMetricFamily(
                    "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
                )
                h = CounterMetricFamily(
                    "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
                )
                q.add_metric([], float(st.queries))
                h.add_metric([], float(st.hits))
                yield from (q, h)

        reg = CollectorRegistry(auto_describe=False)
        reg.register(Engine())  # type: ignore[arg-type]
        return web.Response(body=generate_latest(reg), content_type="text/plain")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/metrics", metrics)
    return app


async def start_sim_server(
    cfg: SimServerConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int, SimEngine]:
    """Start engine and server in the running loop: (runner, port, engine); stop with
    ``await runner.cleanup(); await engine.shutdown()``."""
    cfg = cfg or SimServerConfig()
    engine = SimEngine(
        cfg.arch,
        get_gpu(cfg.gpu),
        EngineSettings(cfg.max_num_seqs, cfg.max_num_batched_tokens, 0.9),
        speedup=cfg.speedup,
        eos_mean_tokens=None,
        enable_prefix_caching=cfg.enable_prefix_caching,
        kv_capacity_tokens=cfg.kv_capacity_tokens,
    )
    await engine.start()
    runner = web.AppRunner(make_app(engine), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, int(bound), engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--gpu", default="H100")
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--no-prefix-caching", action="store_true")
    a = p.parse_args()

    async def serve() -> None:
        cfg = SimServerConfig(gpu=a.gpu, speedup=a.speedup, enable_prefix_caching=not a.no_prefix_caching)
        _, port, _ = await start_sim_server(cfg, port=a.port)
        print(f"LISTENING {port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
