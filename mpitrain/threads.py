"""BLAS/OpenMP threads per rank, so ranks x threads never exceed a node's cores.

Two ranks left at the BLAS default of two threads each on two cores ran a
small MLP 12-40x slower than with one thread each (see shared NOTES).
"""

from __future__ import annotations

import os

from threadpoolctl import threadpool_info, threadpool_limits

from mpitrain import backend  # noqa: F401 - loads every BLAS the core uses, so the limit reaches them all


def cores_available() -> int:
    """Cores this process may run on."""
    return max(1, min(os.cpu_count() or 1, len(os.sched_getaffinity(0))))


def limit_threads(ranks_on_node: int, threads: int | None = None) -> int:
    """Limit BLAS/OpenMP thread pools to ``threads`` or cores // ``ranks_on_node`` (at least 1)
    (``Communicator.local_size`` is the count of ranks on this node). Returns the limit set."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    count = threads if threads is not None else max(1, cores_available() // max(1, ranks_on_node))
    threadpool_limits(limits=count)
    return count


def thread_pools() -> list[str]:
    """One line per loaded thread pool: library, API, file and current thread count."""
    return [
        f"{p['internal_api']} ({p['user_api']}, {os.path.basename(p['filepath'])}): {p['num_threads']} thread(s)"
        for p in threadpool_info()
    ]
