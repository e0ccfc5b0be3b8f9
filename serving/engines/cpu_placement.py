"""Core placement for vLLM's CPU build: keep the serving processes off the cores the model runs on.

vLLM's CPU backend binds the model's OpenMP threads to some cores (on this 2-core machine: core 0)
and expects everything else (API front end, engine core) on the others. Left to itself it runs the
model in a separate worker process, and that worker and the engine core busy-wait with
``sched_yield()`` for up to a second after each message (the shared-memory queues' ``busy_loop_s``),
and a process sharing a core with such a spinner is starved for up to seconds: a TTFT spike and a
gap in every stream (measured: README, "Speed", items 1 and 2).

Pools therefore run the model in the engine-core process by default (``VllmEngine``,
``cpu_model_in_engine_core``): no worker process, no spinning hand-off, the engine core's threads get
the OpenMP binding vLLM would give the worker. Either way, when a pool replica has started a vLLM CPU
engine:

* the engine core goes onto the model's cores (the worker's, when there is one: each step is
  sequential, so the two take turns there instead of one of them spinning on a core of its own);
* the pool replica itself (vLLM's output processing, the token channel) moves to the other cores;
* the pool publishes the model's cores on the load board, and a gateway on the same node moves off
  them too (:func:`avoid_cores`).

Nothing changes on GPU engines, or where the model is not bound to a subset of the cores.

The policy (:func:`plan_placement`) is pure; the functions around it read ``/proc`` and call
``sched_setaffinity``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

log = logging.getLogger("tokenweir.placement")

WORKER_PREFIX = "VLLM::Worker"
"""The process title vLLM gives its model workers (``setproctitle``)."""
ENGINE_CORE_PREFIX = "VLLM::EngineCore"
"""The process title of vLLM's engine core (scheduler; with no worker process, also the model)."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Where each process should run: ``worker_cores`` for the engine core, ``serving_cores`` for
    the pool replica and gateways on the node."""

    worker_cores: frozenset[int]
    """The cores the model runs on: its worker process's, or the engine core's when that runs it."""
    serving_cores: frozenset[int]
    engine_pids: tuple[int, ...]
    """The engine's non-worker processes (the engine core): they go onto ``worker_cores``."""


def plan_placement(
    all_cores: Iterable[int],
    processes: Mapping[int, tuple[str, frozenset[int]]],
    model_cores: Iterable[int] | None = None,
) -> Placement | None:
    """From the engine's processes (``pid -> (title, current affinity)``), where to put them.

    ``model_cores``: the cores the model's threads were given when it runs in the engine-core
    process (no worker process); then every engine process goes there. Otherwise the worker
    processes' affinity says where the model runs.

    None when there is nothing to separate: no worker found, the worker may run anywhere, or it
    holds every core (then moving the rest would only crowd them onto the same cores).
    """
    cores = frozenset(all_cores)
    workers = {pid: aff for pid, (title, aff) in processes.items() if title.startswith(WORKER_PREFIX)}
    if model_cores is not None and not workers:
        worker_cores = frozenset(model_cores) & cores
    elif workers:
        worker_cores = frozenset().union(*workers.values()) & cores
    else:
        return None
    serving = cores - worker_cores
    if not worker_cores or not serving:
        return None
    others = tuple(sorted(pid for pid in processes if pid not in workers))
    return Placement(worker_cores, serving, others)


def engine_cores_on(node: str, payloads: Iterable[Mapping[str, object]]) -> frozenset[int]:
    """The worker cores that load-board payloads (``engine_cores: (node, [cores])``) report on
    ``node``."""
    out: set[int] = set()
    for p in payloads:
        entry = p.get("engine_cores")
        if isinstance(entry, (tuple, list)) and len(entry) == 2 and entry[0] == node:
            out.update(int(c) for c in entry[1])
    return frozenset(out)


# ---------------------------------------------------------------- the /proc shell around it
def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return ""


def pids_titled(prefix: str) -> list[int]:
    """Every live process whose title (first word of its command line) starts with ``prefix``."""
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and _title(int(n)).startswith(prefix)]


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def pin_process(pid: int, cores: Iterable[int]) -> None:
    """Set the affinity of every thread of ``pid`` (Linux affinity is per thread)."""
    mask = set(cores)
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(tid, mask)


def avoid_cores(cores: Iterable[int]) -> frozenset[int] | None:
    """Move this process (all its threads) off ``cores``; returns its new cores, or None when that
    would leave it none or it is already off them."""
    current = frozenset(os.sched_getaffinity(0))
    keep = current - frozenset(cores)
    if not keep or keep == current:
        return None
    try:
        pin_process(os.getpid(), keep)
    except OSError as e:
        log.warning("could not move off cores %s: %s", sorted(cores), e)
        return None
    return keep


def place_cpu_engine(model_cores: Iterable[int] | None = None) -> Placement | None:
    """Call in the pool replica once a vLLM CPU engine has started below this process;
    ``model_cores`` as for :func:`plan_placement`."""
    pids = descendants(os.getpid())
    procs: dict[int, tuple[str, frozenset[int]]] = {}
    for pid in pids:
        try:
            procs[pid] = (_title(pid), frozenset(os.sched_getaffinity(pid)))
        except OSError:
            continue
    plan = plan_placement(
        os.sched_getaffinity(0) | frozenset().union(*(a for _t, a in procs.values())), procs, model_cores
    )
    if plan is None:
        return None
    try:
        for pid in plan.engine_pids:
            pin_process(pid, plan.worker_cores)
        pin_process(os.getpid(), plan.serving_cores)
    except OSError as e:
        log.warning("vLLM CPU core placement failed (%s); processes stay where they are", e)
        return None
    log.info(
        "vLLM CPU engine: model and engine core on cores %s, serving on %s",
        sorted(plan.worker_cores),
        sorted(plan.serving_cores),
    )
    return plan
