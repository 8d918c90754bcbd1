"""How many cores this process may use, and how a worker fills them: one place for the rule
that the worker (its default ``--lanes`` and ``--threads``) and the clients (``workers="auto"``)
both follow. No onnxruntime here: the host client imports it.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path

__all__ = [
    "CPUS_PER_WORKER",
    "LONE_QUERY_THREADS",
    "auto_workers",
    "size_lanes",
    "usable_cores",
    "usable_cpus",
]


def _usable_cpu_set() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _physical_cores(cpus: set[int]) -> int:
    """Distinct physical cores among ``cpus`` (hyper-thread siblings count once), Linux only."""
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def _cgroup_cpu_limit() -> int | None:
    """The CPU quota of a cgroup v2 container, rounded up, if one is set."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))


@functools.cache
def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, at most the physical cores, at most a
    container's CPU quota; ``0`` outside Linux, where it is not known (ONNX Runtime then picks).
    Read once per process (one sysfs file per CPU): the worker's defaults ask several times.

    ONNX Runtime's own default counts the machine's physical cores and ignores CPU affinity and
    container quotas, which oversubscribes a constrained worker.
    """
    if not sys.platform.startswith("linux"):
        return 0
    cores = _physical_cores(_usable_cpu_set())
    quota = _cgroup_cpu_limit()
    return max(1, min(cores, quota) if quota else cores)


LONE_QUERY_THREADS = 4
"""Intra-op threads a run gets by default, when the cores allow: a lone query is fastest at a
few threads. Measured on a 16-core Xeon (MiniLM, one short sentence, in-process): 3.2-3.4 ms at
4 threads, 4.2-4.7 ms at 16 (short runs scale badly across many threads), 6.4-8.2 ms at 1."""


def size_lanes(cores: int, lanes: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """``(lanes, threads)`` that fill ``cores``: ``lanes`` runs at once, each on its lane's
    thread plus the session's ``threads - 1`` shared pool threads, keep
    ``lanes + threads - 1`` threads busy, so the default makes that ``cores``.

    Neither given: ``threads = min(cores, LONE_QUERY_THREADS)`` (a lone query's best) and the
    rest of the cores as further lanes (2 cores: 1 lane x 2 threads; 16 cores: 13 lanes x 4
    threads). One given: the other fills the cores. ``cores`` 0 (unknown) or ``threads`` 0
    (ONNX Runtime chooses): one lane unless ``lanes`` says otherwise.
    """
    if threads is None:
        if cores == 0:
            threads = 0
        elif lanes is None:
            threads = min(cores, LONE_QUERY_THREADS)
        else:
            threads = max(1, cores - lanes + 1)
    if lanes is None:
        lanes = 1 if cores == 0 or threads == 0 else max(1, cores - threads + 1)
    return lanes, threads


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity; hyper-threads count)."""
    return len(_usable_cpu_set())


CPUS_PER_WORKER = 32
"""``workers="auto"`` starts one worker per this many usable logical CPUs. One worker's Python
steps (reading, tokenizing, pooling, replying: all under one GIL) are what caps a worker once
its lanes fill the cores; the figures behind it are in docs/performance.md (Scaling)."""


def auto_workers(cpus: int | None = None) -> int:
    """Workers of a pool that ``workers="auto"`` starts for ``cpus`` logical CPUs (default:
    this process's): ``ceil(cpus / CPUS_PER_WORKER)``, at least one."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, math.ceil(cpus / CPUS_PER_WORKER))
