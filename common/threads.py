"""How many torch intra-op threads a worker runs: its ``--threads`` setting, or by default the cores
this process may run on (its CPU affinity, which containers and ``taskset`` narrow) shared out among
the workers started together. More threads than free cores makes every thread wait for the others
at each kernel's barrier: on two shared cores two threads per worker cut decode to a tenth."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API on this platform (macOS)
        return max(1, os.cpu_count() or 1)


def threads_for(requested: int, sharing: int = 1, reserved: int = 0) -> int:
    """``requested`` when > 0; else the usable cores, less ``reserved`` ones kept for the other
    processes on the machine (never all of them), divided among ``sharing`` workers (>= 1)."""
    if requested > 0:
        return requested
    cores = usable_cores()
    free = max(1, cores - max(0, min(reserved, cores - 1)))
    return max(1, free // max(1, sharing))
