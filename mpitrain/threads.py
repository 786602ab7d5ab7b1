"""BLAS/OpenMP threads per rank, so the ranks that share cores never run more threads than there are.

Two ranks left at the BLAS default of two threads each on two cores ran a
small MLP 12-40x slower than with one thread each (see shared NOTES). The
ranks that share a rank's cores are counted from what the kernel says, not
from MPI's idea of a node: those on the same machine whose CPU affinity
overlaps this rank's. A launcher that binds each rank to cores of its own
(``srun --cpus-per-task=8``, ``mpirun --map-by slot:PE=8``) then gets all of
them per rank, and ranks that MPI places on different "nodes" of one machine
(containers, ``MPIR_CVAR_NOLOCAL``) still split its cores.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from threadpoolctl import threadpool_info, threadpool_limits

from mpitrain import backend  # noqa: F401 - loads every BLAS the core uses, so the limit reaches them all

if TYPE_CHECKING:
    from mpitrain.comm import Communicator

BOOT_ID = "/proc/sys/kernel/random/boot_id"  # one per running kernel: the same in every container on a machine


def cores_available() -> int:
    """Cores this process may run on."""
    return max(1, min(os.cpu_count() or 1, len(os.sched_getaffinity(0))))


def machine_id() -> str:
    """What tells this machine from the others: the running kernel's boot id, else the host name."""
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def affinity_mask() -> int:
    """The cores this process may run on, as a bit mask (bit i: core i)."""
    return sum(1 << core for core in os.sched_getaffinity(0))


def sharers(places: list[tuple[str, int]], me: int) -> int:
    """How many of ``places`` (each rank's (machine id, affinity mask)) share cores with rank ``me``'s,
    ``me`` included: the same machine and at least one core in common."""
    machine, mask = places[me]
    return sum(1 for other, cores in places if other == machine and cores & mask)


def ranks_sharing_cores(comm: Communicator) -> int:
    """The ranks of ``comm`` that may run on this rank's cores, this one included
    (collective: one small all-gather)."""
    return sharers(comm.allgather_object((machine_id(), affinity_mask())), comm.rank)


def limit_threads(sharing: int, threads: int | None = None) -> int:
    """Limit BLAS/OpenMP thread pools to ``threads`` or cores // ``sharing`` (at least 1), ``sharing``
    being the count of ranks that run on this rank's cores (``ranks_sharing_cores``). Returns the limit set."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    count = threads if threads is not None else max(1, cores_available() // max(1, sharing))
    threadpool_limits(limits=count)
    return count


def thread_pools() -> list[str]:
    """One line per loaded thread pool: library, API, file and current thread count."""
    return [
        f"{p['internal_api']} ({p['user_api']}, {os.path.basename(p['filepath'])}): {p['num_threads']} thread(s)"
        for p in threadpool_info()
    ]
