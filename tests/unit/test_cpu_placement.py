"""Core placement for vLLM's CPU build: the pure plan, the board payload reader, and real affinity
changes on this process (restored afterwards)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serving.engines.cpu_placement import (
    avoid_cores,
    descendants,
    engine_cores_on,
    pin_process,
    plan_placement,
)

F = frozenset


def test_engine_core_joins_the_workers_cores_and_serving_gets_the_rest() -> None:
    procs = {10: ("VLLM::EngineCore", F({0, 1})), 11: ("VLLM::Worker_TP0", F({0})), 12: ("python", F({0, 1}))}
    plan = plan_placement({0, 1}, procs)
    assert plan is not None
    assert plan.worker_cores == F({0})
    assert plan.serving_cores == F({1})
    assert plan.engine_pids == (10, 12)


def test_several_workers_are_unioned() -> None:
    procs = {
        1: ("VLLM::Worker_TP0", F({0, 1})),
        2: ("VLLM::Worker_TP1", F({2, 3})),
        3: ("VLLM::EngineCore", F(range(8))),
    }
    plan = plan_placement(range(8), procs)
    assert plan is not None
    assert plan.worker_cores == F({0, 1, 2, 3})
    assert plan.serving_cores == F({4, 5, 6, 7})


def test_model_in_the_engine_core_takes_the_cores_its_threads_were_given() -> None:
    procs = {10: ("VLLM::EngineCore", F({0, 1, 2, 3})), 11: ("resource_tracker", F({0, 1, 2, 3}))}
    plan = plan_placement(range(4), procs, model_cores={0, 1, 2})
    assert plan is not None
    assert plan.worker_cores == F({0, 1, 2})
    assert plan.serving_cores == F({3})
    assert plan.engine_pids == (10, 11)
    # a worker process, where there is one, still decides
    procs[12] = ("VLLM::Worker_TP0", F({0}))
    plan = plan_placement(range(4), procs, model_cores={0, 1, 2})
    assert plan is not None and plan.worker_cores == F({0}) and plan.engine_pids == (10, 11)
    # given every core (or none we manage), there is nothing to separate
    assert plan_placement(range(4), {10: procs[10]}, model_cores=range(4)) is None
    assert plan_placement(range(4), {10: procs[10]}, model_cores={7}) is None


@pytest.mark.parametrize(
    "procs",
    [
        {},  # engine not started / no worker found
        {1: ("VLLM::EngineCore", F({0, 1}))},  # no worker process
        {1: ("VLLM::Worker_TP0", F({0, 1})), 2: ("VLLM::EngineCore", F({0, 1}))},  # worker holds every core
        {1: ("VLLM::Worker_TP0", F({5}))},  # bound outside the cores we manage
    ],
)
def test_nothing_to_separate_means_no_plan(procs: dict[int, tuple[str, frozenset[int]]]) -> None:
    assert plan_placement({0, 1}, procs) is None


def test_board_payloads_name_cores_per_node() -> None:
    payloads = [
        {"engine_cores": ("10.0.0.1", [0])},
        {"engine_cores": ("10.0.0.2", [3])},
        {"engine_cores": None},
        {},
        {"engine_cores": ("10.0.0.1", [1, 2])},
        {"engine_cores": "garbage"},
    ]
    assert engine_cores_on("10.0.0.1", payloads) == F({0, 1, 2})
    assert engine_cores_on("10.0.0.9", payloads) == F()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to move between")
def test_avoid_cores_moves_every_thread_and_refuses_to_leave_none() -> None:
    import threading

    before = F(os.sched_getaffinity(0))
    first = min(before)
    started = threading.Event()
    stop = threading.Event()

    def idle() -> None:
        started.set()
        stop.wait()

    t = threading.Thread(target=idle)
    t.start()
    started.wait()
    try:
        assert avoid_cores(before) is None  # would leave no core: nothing changes
        assert F(os.sched_getaffinity(0)) == before
        kept = avoid_cores({first})
        assert kept == before - {first}
        assert t.native_id is not None
        assert F(os.sched_getaffinity(t.native_id)) == kept  # the other thread moved too
        assert avoid_cores({first}) is None  # already off it
    finally:
        stop.set()
        t.join()
        pin_process(os.getpid(), before)
    assert F(os.sched_getaffinity(0)) == before


def test_descendants_finds_grandchildren() -> None:
    code = "import subprocess,sys,time; p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)']); print(p.pid, flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        found = descendants(os.getpid())
        assert child.pid in found and grandchild in found
        assert grandchild in descendants(child.pid)
    finally:
        subprocess.run(["pkill", "-P", str(child.pid)], check=False)
        child.kill()
        child.wait()


def test_the_model_runs_in_the_engine_core_only_on_one_cpu_device_with_no_executor_chosen() -> None:
    from vllm.platforms import current_platform

    from serving.engines.vllm_engine import _cpu_uniproc_applies

    on_cpu = current_platform.is_cpu()  # the CPU build here; the CUDA build on a GPU machine
    assert _cpu_uniproc_applies({}) is on_cpu
    assert _cpu_uniproc_applies({"max_num_seqs": 8, "tensor_parallel_size": 1}) is on_cpu
    assert not _cpu_uniproc_applies({"distributed_executor_backend": "mp"})
    assert not _cpu_uniproc_applies({"tensor_parallel_size": 2})
    assert not _cpu_uniproc_applies({"pipeline_parallel_size": 2})
    assert not _cpu_uniproc_applies({"data_parallel_size": 2})
