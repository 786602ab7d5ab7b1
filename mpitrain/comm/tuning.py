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
    """

    segment_bytes: int = 1 << 18
    allreduce_small_bytes: int = 1 << 16
    allreduce_shm_bytes: int = 1 << 14
    broadcast_large_bytes: int = 1 << 20
    broadcast_shm_bytes: int = 1 << 16

    def __post_init__(self) -> None:
        if self.segment_bytes < 64:
            raise ValueError(f"segment_bytes must be at least 64, got {self.segment_bytes}")
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0, got {getattr(self, f.name)}")

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
                    values[f.name] = int(environ[name])
                except ValueError:
                    raise ValueError(f"{name}={environ[name]!r}: expected an integer number of bytes") from None
        return cls(**values)

    def allreduce_algorithm(self, nbytes: int, half: bool, shared: bool) -> str:
        """What ``algorithm="auto"`` all-reduce runs for ``nbytes`` (``half``: a 16-bit float type;
        ``shared``: a buffer from ``Communicator.allocate``)."""
        small = nbytes < self.allreduce_small_bytes
        if half:
            # float16 / bfloat16: MPI has no bfloat16, and MPICH's float16 sum measured 2.5-4x
            # slower than ours (1 MiB, 2 ranks: 4.7 ms native, 1.1 ms shm, 1.3 ms ring).
            return "shm" if shared else ("doubling" if small else "ring")
        if shared:
            return "shm" if nbytes >= self.allreduce_shm_bytes else "native"
        return "native" if small else "ring"

    def broadcast_algorithm(self, nbytes: int, ranks: int, shared: bool) -> str:
        """What ``algorithm="auto"`` broadcast runs for ``nbytes`` over ``ranks`` ranks."""
        if shared and nbytes >= self.broadcast_shm_bytes:
            return "shm"
        # Scatter + all-gather moves 2(p-1)/p of the buffer per link against the tree's
        # log2(p) whole buffers: a gain only from 3 ranks on (measured: 0.8-0.97x at 2, 1.06-1.17x at 4).
        return "scatter" if ranks > 2 and nbytes >= self.broadcast_large_bytes else "tree"

    def describe(self) -> str:
        """One line: every threshold with its value."""
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
