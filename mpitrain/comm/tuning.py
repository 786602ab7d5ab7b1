"""Size thresholds and segment size of the collectives, with their measured defaults.

Each can be overridden per Communicator (``Tuning(...)``) or for a whole job
through environment variables (``MPITRAIN_SEGMENT_BYTES`` and so on), which
is how a cluster's own measurements are plugged in without code changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

ENV_PREFIX = "MPITRAIN_"


@dataclass(frozen=True)
class Tuning:
    """Where ``algorithm="auto"`` switches, in bytes.

    Defaults measured with benchmarks/collectives.py on a 2-core machine with
    PyPI's MPICH (see README "Collectives" for the table behind each).

    Attributes:
        segment_bytes: ring pipelining segment; the ring's scratch is 2 segments.
        allreduce_small_bytes: below this, all-reduce of a private buffer uses
            MPI's native call (latency-bound: one library call beats Python-level steps).
        allreduce_shm_bytes: from this size, all-reduce of a node-shared buffer
            reads peers' memory (shm); below it, MPI's native call.
        broadcast_large_bytes: from this size, broadcast uses scatter + ring
            all-gather instead of the binomial tree (on 3 or more ranks).
        broadcast_shm_bytes: from this size, broadcast of a node-shared
            buffer copies from the root's memory.
        staged_bytes: from this size, all-reduce of a private buffer (a
            user's own array) goes through the staging area (shm).
        staged_native_bytes: (from, to): private all-reduce uses MPI's native
            call between these sizes, where MPICH beats staging (it reuses a
            cached temporary there; from glibc's 32 MiB mmap threshold on it
            maps fresh pages on every call and staging wins again).
        broadcast_staged_bytes: from this size, broadcast of a private buffer
            goes through the staging area, on 3 or more ranks (at 2, MPI's
            single send is as fast as the two copies).
        reduce_scatter_shm_bytes / allgather_shm_bytes: from these sizes,
            reduce-scatter and all-gather on one node use node-shared memory
            (in place or staged); below them, MPI's native call.
        staging_bytes: one half of the staging area per rank (larger private
            buffers run in pieces of this size; the area is two halves).
        device_segment_bytes: device arrays staged through host memory move
            in segments of this size, the copies of one overlapping the host
            collective of the next (all-reduce and broadcast).
    """

    segment_bytes: int = 1 << 18
    allreduce_small_bytes: int = 1 << 16
    allreduce_shm_bytes: int = 1 << 14
    broadcast_large_bytes: int = 1 << 20
    broadcast_shm_bytes: int = 1 << 16
    staged_bytes: int = 1 << 20
    staged_native_bytes: tuple[int, int] = (8 << 20, 40 << 20)
    broadcast_staged_bytes: int = 1 << 18
    reduce_scatter_shm_bytes: int = 1 << 16
    allgather_shm_bytes: int = 1 << 18
    staging_bytes: int = 1 << 21
    device_segment_bytes: int = 1 << 22

    def __post_init__(self) -> None:
        if self.segment_bytes < 64:
            raise ValueError(f"segment_bytes must be at least 64, got {self.segment_bytes}")
        for f in fields(self):
            value = getattr(self, f.name)
            if min(value if isinstance(value, tuple) else (value,)) < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Tuning:
        """Defaults, overridden by ``MPITRAIN_<FIELD>`` variables (integers, bytes).

        Raises:
            ValueError: a variable that is not a non-negative integer.
        """
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if name in environ:
                try:
                    numbers = tuple(int(part) for part in environ[name].split(","))
                except ValueError:
                    numbers = ()
                width = len(f.default) if isinstance(f.default, tuple) else 1
                if len(numbers) != width:
                    expected = f"{width} comma-separated integers" if width > 1 else "an integer number"
                    raise ValueError(f"{name}={environ[name]!r}: expected {expected} of bytes")
                values[f.name] = numbers if width > 1 else numbers[0]
        return cls(**values)

    def allreduce_algorithm(self, nbytes: int, half: bool, memory: str) -> str:
        """What ``algorithm="auto"`` all-reduce runs for ``nbytes`` (``half``: a 16-bit float type).

        ``memory``: "shared" (a buffer from ``Communicator.allocate``), "staged"
        (a private buffer on nodes that have node-shared memory) or "none".
        """
        small = nbytes < self.allreduce_small_bytes
        if half:
            # float16 / bfloat16: MPI has no bfloat16, and MPICH's float16 sum measured 2.5-4x
            # slower than ours (1 MiB, 2 ranks: 4.7 ms native, 1.1 ms shm, 1.3 ms ring).
            if memory == "shared" or (memory == "staged" and nbytes >= self.staged_bytes):
                return "shm"
            return "doubling" if small else "ring"
        if memory == "shared":
            return "shm" if nbytes >= self.allreduce_shm_bytes else "native"
        if memory == "staged":
            low, high = self.staged_native_bytes
            return "shm" if nbytes >= self.staged_bytes and not low <= nbytes < high else "native"
        return "native" if small else "ring"

    def broadcast_algorithm(self, nbytes: int, ranks: int, memory: str) -> str:
        """What ``algorithm="auto"`` broadcast runs for ``nbytes`` over ``ranks`` ranks (``memory`` as
        ``allreduce_algorithm``)."""
        if memory == "shared" and nbytes >= self.broadcast_shm_bytes:
            return "shm"
        if memory == "staged" and ranks > 2 and nbytes >= self.broadcast_staged_bytes:
            return "shm"
        # Scatter + all-gather moves 2(p-1)/p of the buffer per link against the tree's
        # log2(p) whole buffers: a gain only from 3 ranks on (measured: 0.8-0.97x at 2, 1.06-1.17x at 4).
        return "scatter" if ranks > 2 and nbytes >= self.broadcast_large_bytes else "native"

    def scatter_gather_algorithm(self, name: str, nbytes: int, half: bool, memory: str) -> str:
        """What ``algorithm="auto"`` reduce-scatter or all-gather (``name``) runs (``half`` and ``memory``
        as ``allreduce_algorithm``; ``memory`` is "none" also when ranks span nodes: there shm's chunks
        are per node rank, not per rank)."""
        least = self.reduce_scatter_shm_bytes if name == "reduce_scatter" else self.allgather_shm_bytes
        if memory != "none":  # one node: below the threshold MPI's call beats both of ours
            return "shm" if nbytes >= least else ("ring" if half and name == "reduce_scatter" else "native")
        native = nbytes < self.allreduce_small_bytes and not (half and name == "reduce_scatter")
        return "native" if native else "ring"

    def describe(self) -> str:
        """One line: every threshold with its value."""
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
