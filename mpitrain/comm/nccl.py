"""NCCL all-reduce and broadcast of device arrays, through cupy's bindings (``cupy.cuda.nccl``).

Here so that users and benchmarks can set our device paths against the
library most GPU training uses. One NCCL communicator per Communicator,
made on first use: rank 0's unique id travels by ``bcast_object``. NCCL
refuses two ranks on one GPU, so this checks first that every rank of a
node has a GPU of its own and says so otherwise. Calls are queued on the
current stream and then waited for, so they end as every other collective
does (results in place, the watchdog covering the wait).
"""

from __future__ import annotations

from typing import Any

from mpi4py import MPI

from mpitrain import backend
from mpitrain.comm.checks import Problem

OPS = {"sum": "NCCL_SUM", "mean": "NCCL_SUM", "max": "NCCL_MAX", "min": "NCCL_MIN"}
TYPES = {
    "float16": "NCCL_FLOAT16",
    "float32": "NCCL_FLOAT32",
    "float64": "NCCL_FLOAT64",
    "int8": "NCCL_INT8",
    "uint8": "NCCL_UINT8",
    "int32": "NCCL_INT32",
    "uint32": "NCCL_UINT32",
    "int64": "NCCL_INT64",
    "uint64": "NCCL_UINT64",
}


def problem() -> Problem | None:
    """Why the "nccl" algorithm cannot run in this process, or None."""
    if backend.nccl_module() is None:
        return "ValueError", "algorithm 'nccl' needs cupy with NCCL (cupy.cuda.nccl is not importable here)"
    return None


class Nccl:
    """An NCCL communicator over the ranks of ``comm`` (a Communicator; collective to create)."""

    def __init__(self, comm: Any) -> None:
        self.module = backend.nccl_module()
        places = comm.allgather_object((MPI.Get_processor_name(), backend.current_device()))
        if len(set(places)) < len(places):
            raise ValueError(
                f"algorithm 'nccl' needs one GPU per rank; ranks share GPUs here ((host, GPU) of each: {places})"
            )
        uid = comm.bcast_object(self.module.get_unique_id() if comm.rank == 0 else None)
        self.comm = self.module.NcclCommunicator(comm.size, uid, comm.rank)

    def _args(self, flat: Any) -> tuple[int, int, int]:
        name = TYPES.get(str(flat.dtype))
        if name is None:
            raise TypeError(f"NCCL has no {flat.dtype}; expected one of {', '.join(TYPES)}")
        return flat.data.ptr, flat.size, getattr(self.module, name)

    def allreduce(self, flat: Any, op: str) -> None:
        """Reduce ``flat`` in place over the ranks (op "mean" sums: the caller divides)."""
        pointer, count, dtype = self._args(flat)
        stream = backend.current_stream()
        self.comm.allReduce(pointer, pointer, count, dtype, getattr(self.module, OPS[op]), stream.ptr)
        stream.synchronize()

    def broadcast(self, flat: Any, root: int) -> None:
        """Copy ``flat`` from ``root`` to every rank, in place."""
        pointer, count, dtype = self._args(flat)
        stream = backend.current_stream()
        self.comm.bcast(pointer, count, dtype, root, stream.ptr)
        stream.synchronize()
