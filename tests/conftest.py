"""Shared fixtures: one real local Ray + Serve + vLLM (tiny model) deployment per test session."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

SESSION_STARTED_AT = time.time()
"""When this pytest session began: the Ray sessions it started are the ones created since
(``tests/zz_secrets`` reads all their logs)."""
os.environ.setdefault("TOKENWEIR_HOME", str(Path.home() / ".cache" / "tokenweir"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from models.tiny import build_tiny_model

    return str(build_tiny_model())


ADMIN_KEY = "tw-admin-test-" + "k" * 24


@pytest.fixture(scope="session")
def otlp() -> Iterator[Any]:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (tests/_otlp.py) that the live gateways export to."""
    from tests._otlp import OtlpReceiver

    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="session")
def live(tiny_model_path: str, otlp: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Start Ray, deploy two gateway replicas and the tiny-model pool on vLLM's CPU build with
    metering on and request spans exported to ``otlp``; yield the base URL, the admin key and the
    demo tenant's key."""
    from serving.cli import runtime
    from serving.config import parse_config

    state = tmp_path_factory.mktemp("state")
    cfg = parse_config(
        {
            "gateway": {
                "host": "127.0.0.1",
                "port": free_port(),
                "internal_port": free_port(),
                "max_body_bytes": 65536,
                "replicas": 2,
                "access_log_file": str(state / "access.log"),
                "otel_endpoint": otlp.endpoint,
                "otel_batch_delay_ms": 200,
            },
            # A short lease, so the chaos tier sees a dead gateway's reservations resolved quickly.
            "metering": {"admin_key": ADMIN_KEY, "lease_grace_s": 3},
            "models": {
                "llama-3.1-8b-instruct": {"tokenizer": "builtin:tiny-llama"},
                # The ops tier's overloaded pool holds 4,608 KV tokens (below): its model's context too.
                "qwen2.5-7b-instruct": {"tokenizer": "builtin:tiny-llama", "max_model_len": 4608},
            },
            "ray": {"num_cpus": 8},
            "state_dir": str(state),
            "pools": [
                {
                    "name": "tiny-cpu",
                    "model": "tiny-llama",
                    "accelerator": "CPU",
                    "engine": "vllm",
                    "engine_args": {"kv_cache_space_gib": 1, "max_num_seqs": 64},
                    # Generous targets: these tests are about the API, not admission under a loaded CPU.
                    "slo": {"ttft_ms": 60000, "tpot_ms": 5000},
                },
                # A simulated two-type fleet of an 8B model (performance model, no GPU needed).
                {
                    "name": "sim-h100",
                    "model": "llama-3.1-8b-instruct",
                    "accelerator": "H100",
                    "engine": "sim",
                    "sim_speedup": 20,
                    "slo": {"ttft_ms": 2000, "tpot_ms": 60},
                },
                {
                    "name": "sim-a10",
                    "model": "llama-3.1-8b-instruct",
                    "accelerator": "A10",
                    "engine": "sim",
                    "sim_speedup": 20,
                    "slo": {"ttft_ms": 2000, "tpot_ms": 60},
                },
                # A pool the ops tier overloads (its own model, so no other test routes to it): real
                # time, two sequences and two queue places, targets its queue cannot meet, so that its
                # load has admission refusals and SLO misses; and a KV cache of 288 blocks (vLLM's
                # num_gpu_blocks_override: 4,608 tokens) that admission may fill entirely
                # (kv_admit_fraction 1: no room kept for growth) and a limit that stays at two
                # sequences (min_num_seqs: whatever the latencies), so that two sequences outgrow
                # it and the engine preempts (tests/integration/test_ops_prometheus.py).
                {
                    "name": "sim-l40s",
                    "model": "qwen2.5-7b-instruct",
                    "accelerator": "L40S",
                    "engine": "sim",
                    "engine_args": {"max_num_seqs": 2, "num_gpu_blocks_override": 288},
                    "admission": {"max_queued_requests": 2, "kv_admit_fraction": 1.0, "min_num_seqs": 2},
                    "slo": {"ttft_ms": 200, "tpot_ms": 30, "attainment_target": 0.9},
                },
            ],
        }
    )
    runtime.init_ray(cfg)
    try:
        url = runtime.deploy(cfg)
        runtime.wait_ready(url, timeout_s=600)
        demo_key = runtime.ensure_demo_key(cfg)
        internal = f"http://{cfg.gateway.internal_host}:{cfg.gateway.internal_port}"
        yield {
            "url": url,
            "internal_url": internal,
            "admin_key": ADMIN_KEY,
            "api_key": demo_key,
            "state_dir": str(state),
        }
    finally:
        runtime.shutdown()


@pytest.fixture(scope="session")
def gateway_url(live: dict) -> str:
    return str(live["url"])


@pytest.fixture(scope="session")
def internal_url(live: dict) -> str:
    """The operator's listener: /metrics, /internal/pools, the deep /readyz."""
    return str(live["internal_url"])


@pytest.fixture(scope="session")
def api_key(live: dict) -> str:
    return str(live["api_key"])


# -- the ledger's stores ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A PostgreSQL server of this session's own (tests/_ledger_stores.py), removed at its end."""
    from _ledger_stores import PostgresServer

    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: Any) -> str:
    """A fresh, empty database on the session's server."""
    return str(postgres_server.create_database())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_target(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The store a ledger test runs on, each test once per store: a SQLite file in ``tmp_path``, or
    a fresh database on the session's PostgreSQL server (marker ``postgres``)."""
    from _ledger_stores import LedgerTarget

    if request.param == "postgres":
        return LedgerTarget("postgres", tmp_path, request.getfixturevalue("postgres_dsn"))
    return LedgerTarget("sqlite", tmp_path)
