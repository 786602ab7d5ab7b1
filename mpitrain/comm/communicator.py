"""Communicator: validates buffers across ranks and dispatches to an algorithm.

All collectives run on a private duplicate of the communicator passed in, so
they never match a user's own messages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from mpi4py import MPI

from mpitrain.comm import ring, tree

DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int32), np.dtype(np.int64))
OPS = {"sum": np.add, "mean": np.add, "max": np.maximum, "min": np.minimum}
NATIVE_OPS = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
ALLREDUCE_ALGORITHMS = ("ring", "native")
BROADCAST_ALGORITHMS = ("tree", "native")
DEFAULT_SEGMENT_BYTES = 1 << 20
_ERROR_TYPES = {cls.__name__: cls for cls in (ValueError, TypeError, FileNotFoundError, RuntimeError)}


def mark_all_ranks(exc: BaseException) -> BaseException:
    """Tag an exception as raised identically on every rank (so one rank may report it)."""
    exc.on_all_ranks = True  # type: ignore[attr-defined]
    return exc


def raised_on_all_ranks(exc: BaseException) -> bool:
    """True when ``exc`` was raised on every rank by a cross-rank agreement."""
    return getattr(exc, "on_all_ranks", False)


class Communicator:
    """Collectives over an mpi4py communicator (default ``COMM_WORLD``).

    Args:
        comm: the mpi4py communicator to duplicate.
        checked: before every collective, ranks agree on (operation, length,
            dtype, op, root, algorithm) with a small allgather, so a mismatch
            or a bad buffer on any rank raises the same error on every rank
            instead of hanging. Costs one small allgather per call.
        segment_bytes: pipelining segment of the ring; scratch is 2 segments.
    """

    def __init__(self, comm: MPI.Comm | None = None, checked: bool = True, segment_bytes: int = DEFAULT_SEGMENT_BYTES):
        if segment_bytes < 64:
            raise ValueError(f"segment_bytes must be at least 64, got {segment_bytes}")
        self.comm = (MPI.COMM_WORLD if comm is None else comm).Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.checked = checked
        self.segment_bytes = segment_bytes
        self._scratch: dict[np.dtype, np.ndarray] = {}

    def allreduce(self, buf: np.ndarray, op: str = "sum", algorithm: str = "ring") -> np.ndarray:
        """Reduce ``buf`` over all ranks, in place, and return it.

        Contract: same length, dtype, op and algorithm on every rank. op is
        "sum", "mean" (floating dtypes only), "max" or "min"; algorithm is
        "ring" (bandwidth-optimal, bit-identical results on every rank) or
        "native" (MPI's own in-place Allreduce).

        Raises:
            TypeError: not a numpy array, or an unsupported dtype.
            ValueError: non-contiguous or read-only buffer, unknown op or
                algorithm, or ranks that disagree (checked mode: on every rank).
        """
        self._validate("allreduce", buf, ALLREDUCE_ALGORITHMS, algorithm, op=op)
        flat = buf.reshape(-1)
        if self.size == 1 or flat.size == 0:
            return buf
        if algorithm == "native":
            self.comm.Allreduce(MPI.IN_PLACE, flat, op=NATIVE_OPS[op])
            if op == "mean":
                flat /= self.size
            return buf
        finish = (lambda chunk: np.divide(chunk, self.size, out=chunk)) if op == "mean" else None
        segment = self._segment_elems(flat.dtype)
        ring.allreduce(self.comm, flat, OPS[op], segment, self._scratch_for(flat.dtype), finish)
        return buf

    def broadcast(self, buf: np.ndarray, root: int = 0, algorithm: str = "tree") -> np.ndarray:
        """Copy ``buf`` from ``root`` to every rank, in place, and return it.

        Contract: same length, dtype, root and algorithm on every rank.
        algorithm is "tree" (binomial tree) or "native" (MPI's Bcast).

        Raises:
            TypeError / ValueError: as for ``allreduce``; also a root outside [0, size).
        """
        self._validate("broadcast", buf, BROADCAST_ALGORITHMS, algorithm, root=root)
        flat = buf.reshape(-1)
        if algorithm == "native":
            self.comm.Bcast(flat, root=root)
        else:
            tree.broadcast(self.comm, flat, root)
        return buf

    def allgather_object(self, obj: Any) -> list[Any]:
        """Gather a small picklable object from every rank, on every rank (control messages only)."""
        return self.comm.allgather(obj)

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank passes an error; otherwise return on every rank.

        The raised exception has the type of the lowest failing rank's error
        (ValueError, TypeError, FileNotFoundError, else RuntimeError) and a
        message naming that rank.
        """
        local = None if error is None else (type(error).__name__, str(error))
        reports = self.comm.allgather(local)
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if not failed:
            return
        rank, (kind, message) = failed[0]
        others = f" (also failed on ranks {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
        exc = _ERROR_TYPES.get(kind, RuntimeError)(f"rank {rank}: {message}{others}")
        raise mark_all_ranks(exc) from error

    @contextlib.contextmanager
    def agreement(self) -> Iterator[None]:
        """Run a block on every rank; if it raises on any rank, raise on all (see ``agree``)."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every error must reach the other ranks
            self.agree(exc)
        else:
            self.agree(None)

    def _segment_elems(self, dtype: np.dtype) -> int:
        return max(1, self.segment_bytes // dtype.itemsize)

    def _scratch_for(self, dtype: np.dtype) -> np.ndarray:
        scratch = self._scratch.get(dtype)
        if scratch is None:
            scratch = self._scratch[dtype] = np.empty(2 * self._segment_elems(dtype), dtype=dtype)
        return scratch

    def _validate(self, name: str, buf: Any, algorithms: tuple[str, ...], algorithm: str, **params: Any) -> None:
        problem = _local_problem(buf, algorithms, algorithm, self.size, **params)
        if not self.checked:
            if problem is not None:
                raise problem[0](f"{name}: {problem[1]}")
            return
        fingerprint = (name, algorithm, *sorted(params.items()))
        if problem is None:
            fingerprint += (("length", buf.size), ("dtype", str(buf.dtype)))
        reports = self.comm.allgather((fingerprint, problem and (problem[0].__name__, problem[1])))
        bad = [(rank, p) for rank, (_, p) in enumerate(reports) if p is not None]
        if bad:
            rank, (kind, message) = bad[0]
            others = f" (also on ranks {[r for r, _ in bad[1:]]})" if len(bad) > 1 else ""
            raise mark_all_ranks(_ERROR_TYPES[kind](f"{name}: rank {rank}: {message}{others}"))
        prints = [f for f, _ in reports]
        if any(f != prints[0] for f in prints):
            differ = [rank for rank, f in enumerate(prints) if f != prints[0]]
            raise mark_all_ranks(
                ValueError(
                    f"{name}: ranks disagree on the call: rank 0 has {_describe(prints[0])}, "
                    f"rank {differ[0]} has {_describe(prints[differ[0]])} (differing ranks: {differ})"
                )
            )


def _describe(fingerprint: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in fingerprint[2:]) + f", algorithm={fingerprint[1]}"


def _local_problem(
    buf: Any, algorithms: tuple[str, ...], algorithm: str, size: int, op: str | None = None, root: int | None = None
) -> tuple[type[Exception], str] | None:
    """What is wrong with this rank's arguments, as (exception type, message), or None."""
    if not isinstance(buf, np.ndarray):
        return TypeError, f"expected a numpy array, got {type(buf).__name__}"
    if buf.dtype not in DTYPES:
        return TypeError, f"unsupported dtype {buf.dtype}; expected one of {', '.join(map(str, DTYPES))}"
    if not buf.flags.c_contiguous:
        return ValueError, "buffer is not C-contiguous (use numpy.ascontiguousarray)"
    if not buf.flags.writeable:
        return ValueError, "buffer is read-only; collectives work in place"
    if algorithm not in algorithms:
        return ValueError, f"unknown algorithm {algorithm!r}; expected one of {', '.join(algorithms)}"
    if op is not None:
        if op not in OPS:
            return ValueError, f"unknown op {op!r}; expected one of {', '.join(OPS)}"
        if op == "mean" and buf.dtype.kind != "f":
            return TypeError, f"op 'mean' needs a floating dtype, got {buf.dtype}"
    if root is not None and not (isinstance(root, (int, np.integer)) and 0 <= root < size):
        return ValueError, f"root {root!r} is outside [0, {size})"
    return None
