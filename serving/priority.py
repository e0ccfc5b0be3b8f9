"""Process priority of the serving processes.

Ray starts its worker processes at nice 15, below everything else on the machine. The gateway
replicas, the pool replicas (with the engine processes they spawn) and the ledger are on every
request's path, so each raises itself back to normal priority where the OS allows it (root or
CAP_SYS_NICE; elsewhere this is a no-op). Measured on this 2-core machine: README "Speed".
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["run_at_normal_priority"]


def run_at_normal_priority() -> int:
    """Set the nice value of every thread of this process to 0 where it is higher and that is
    permitted (on Linux a nice value belongs to a thread; threads started later inherit it from
    their creator); return this thread's value."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        with contextlib.suppress(OSError):
            if os.getpriority(os.PRIO_PROCESS, tid) > 0:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
    return os.getpriority(os.PRIO_PROCESS, 0)
