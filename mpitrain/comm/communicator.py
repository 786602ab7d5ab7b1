"""Communicator: checks a call across ranks, picks an algorithm, runs it.

All collectives run on a private duplicate of the communicator passed in, so
they never match a user's own messages. Buffers are C-contiguous numpy
arrays of float16 (reduced in float32 arithmetic), float32, float64, int32,
int64, or uint16 holding bfloat16 bit patterns (reduced in float32; not with
MPI's native calls), reduced in place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from mpi4py import MPI

from mpitrain.comm import doubling, ring, tree
from mpitrain.comm.checks import (
    ERROR_TYPES,
    Problem,
    agree_on_call,
    agree_on_error,
    buffer_problem,
    choice_problem,
    op_problem,
    root_problem,
)
from mpitrain.comm.shm import Reduction, SharedBuffers
from mpitrain.comm.tuning import Tuning
from mpitrain.comm.watchdog import Peer, Watchdog, process_start

UFUNCS = {"sum": np.add, "mean": np.add, "max": np.maximum, "min": np.minimum}
NATIVE_OPS = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
ALLREDUCE_ALGORITHMS = ("auto", "ring", "doubling", "shm", "native")
SCATTER_GATHER_ALGORITHMS = ("auto", "ring", "native", "shm")
BROADCAST_ALGORITHMS = ("auto", "tree", "scatter", "shm", "native")


def _shm_problem(algorithm: str, shared: Any, buf: np.ndarray) -> tuple[str, str] | None:
    if algorithm == "shm" and shared is None and buf.size:
        return "ValueError", "algorithm 'shm' needs a buffer from Communicator.allocate"
    return None


def _bf16_problem(algorithm: str, dtype: np.dtype) -> tuple[str, str] | None:
    if algorithm == "native" and dtype == np.uint16:
        return "ValueError", "MPI cannot reduce bfloat16 (uint16) buffers; use another algorithm"
    return None


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (uint16)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray, out: np.ndarray) -> None:
    """Write the bfloat16 bit patterns of float32 ``values`` into uint16 ``out`` (truncating the mantissa)."""
    np.copyto(out, np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16, casting="unsafe")


def reducer(op: str, dtype: np.dtype) -> Callable[..., Any]:
    """The in-place reduction ``f(a, b, out=...)`` for an op; float16 and bfloat16 are computed in float32."""
    ufunc = UFUNCS[op]
    if dtype == np.float16:
        return lambda a, b, out: ufunc(a, b, out=out, dtype=np.float32)
    if dtype == np.uint16:
        return lambda a, b, out: f32_to_bf16(ufunc(bf16_to_f32(a), bf16_to_f32(b)), out)
    return ufunc


def finisher(
    op: str, dtype: np.dtype, size: int, inspect: Callable[[np.ndarray], None] | None = None
) -> Callable[[np.ndarray], None] | None:
    """What to do to each fully reduced chunk: divide by the world size for "mean", then ``inspect`` it."""
    if op != "mean":
        return inspect

    def finish(chunk: np.ndarray) -> None:
        if dtype == np.uint16:
            f32_to_bf16(bf16_to_f32(chunk) / size, chunk)
        else:
            np.divide(chunk, size, out=chunk)
        if inspect is not None:
            inspect(chunk)

    return finish


class Communicator:
    """Collectives over an mpi4py communicator (default ``COMM_WORLD``).

    Args:
        comm: the mpi4py communicator to duplicate.
        checked: before every collective, ranks agree on (operation, length,
            dtype, op, root, algorithm) with a small allgather, so a mismatch
            or a bad buffer on any rank raises the same error on every rank
            instead of hanging. Costs one small allgather per call.
        tuning: thresholds for ``algorithm="auto"`` and the ring segment size
            (default: ``Tuning.from_env()``).
        node_size: treat each run of this many consecutive ranks as one node
            instead of asking MPI which ranks share memory (to exercise the
            hierarchical path on one machine).
        timeout: seconds a collective (or a region under ``watch``) may take
            before a watchdog prints what this rank waits in and aborts the
            whole job (``watchdog.EXIT_TIMEOUT``); None: no watchdog.

    Every collective has a sequence number (``sequence``), part of its
    fingerprint in checked mode, so ranks that call collectives in a
    different order get an error naming both calls.
    """

    def __init__(
        self,
        comm: MPI.Comm | None = None,
        checked: bool = True,
        tuning: Tuning | None = None,
        node_size: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self.comm = (MPI.COMM_WORLD if comm is None else comm).Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.checked = checked
        self.tuning = Tuning.from_env() if tuning is None else tuning
        self.sequence = 0
        self._scratch: dict[np.dtype, np.ndarray] = {}
        self.shared = self._shared_buffers(node_size)
        progress = self._progress()  # allocated on every rank, whatever its timeout: it is collective
        self.watchdog = None if timeout is None else Watchdog(self.rank, timeout, *progress)

    def _progress(self) -> tuple[np.ndarray | None, list[Peer]]:
        """This rank's node-shared progress array and every node-local rank as a watchdog ``Peer``."""
        if self.shared is None:
            return None, []
        progress = self.shared.allocate(2, np.int64)
        members = self.shared.node.allgather((self.rank, os.getpid(), process_start()))
        arrays = self.shared.windows[-1].peers
        return progress, [
            Peer(rank, array, pid, start) for (rank, pid, start), array in zip(members, arrays, strict=True)
        ]

    def _shared_buffers(self, node_size: int | None) -> SharedBuffers | None:
        if node_size is None:
            node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        else:
            if node_size < 1:
                raise ValueError(f"node_size must be >= 1, got {node_size}")
            node = self.comm.Split(self.rank // node_size, key=self.rank)
        sizes = self.comm.allgather(node.Get_size())
        if len(set(sizes)) != 1:  # uneven nodes: no hierarchical path, plain ring instead
            node.Free()
            return None
        cross = None
        if node.Get_size() < self.size:
            cross = self.comm.Split(node.Get_rank(), key=self.rank)
        placement = self.comm.allgather((node.Get_rank(), 0 if cross is None else cross.Get_rank()))
        return SharedBuffers(node, cross, placement)

    @property
    def segment(self) -> int:
        """Ring segment size in bytes."""
        return self.tuning.segment_bytes

    def chunk_bounds(self, count: int) -> list[tuple[int, int]]:
        """(start, stop) of each rank's chunk of a ``count``-element buffer in reduce_scatter / allgather."""
        return ring.chunk_bounds(count, self.size)

    def allocate(self, count: int, dtype: Any = np.float32) -> np.ndarray:
        """A zeroed 1-D buffer that the ranks of a node share (collective).

        All-reduce on such buffers reads peers' memory directly (``shm``),
        the fastest path inside a node. Falls back to a plain array when nodes
        hold different numbers of ranks.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if self.shared is None:
            return np.zeros(count, dtype=dtype)
        return self.shared.allocate(count, dtype)

    def allreduce(
        self,
        buf: np.ndarray,
        op: str = "sum",
        algorithm: str = "auto",
        inspect: Callable[[np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """Reduce ``buf`` over all ranks, in place, and return it.

        Contract: same length, dtype, op and algorithm on every rank; for
        "shm", buffers from ``allocate`` at the same offset on every rank.
        op: "sum", "mean" (floating dtypes), "max", "min". algorithm:
        "ring" (bandwidth-optimal, pipelined), "doubling" (recursive doubling,
        few rounds for small buffers), "shm" (node shared memory, hierarchical
        across nodes), "native" (MPI's in-place Allreduce), or "auto":
        shm for shared buffers from ``tuning.allreduce_shm_bytes``, ring for
        others from ``tuning.allreduce_small_bytes``, native below (16-bit
        types never go to native). Every algorithm but native gives bit-identical
        results on every rank. ``inspect`` (for example a finiteness check)
        is called with final values before other ranks copy them: for "ring"
        and "shm" with the parts this rank reduced (the ranks' calls together
        see every element, once per node for "shm", so combine their
        verdicts), otherwise with the whole buffer.

        Raises:
            TypeError: not a numpy array, or an unsupported dtype.
            ValueError: non-contiguous or read-only buffer, unknown op or
                algorithm, or ranks that disagree (checked mode: on every rank).
        """
        flat = buf.reshape(-1) if isinstance(buf, np.ndarray) else buf
        shared = self._find_shared(flat)
        problem = buffer_problem(buf) or choice_problem("algorithm", algorithm, ALLREDUCE_ALGORITHMS)
        problem = problem or op_problem(op, buf.dtype) or _shm_problem(algorithm, shared, buf)
        problem = problem or _bf16_problem(algorithm, buf.dtype)
        self._check("allreduce", buf, problem, op=op, algorithm=algorithm, shared=shared and shared[1])
        if self.size > 1 and flat.size:
            with self._watched("allreduce", flat):
                self._allreduce(flat, op, algorithm, shared, inspect)
        elif inspect is not None and flat.size:
            inspect(flat)
        return buf

    def _allreduce(
        self, flat: np.ndarray, op: str, algorithm: str, shared: Any, inspect: Callable[[np.ndarray], None] | None
    ) -> None:
        if algorithm == "auto":
            algorithm = self._auto_allreduce(flat, shared is not None)
        reduce, finish = reducer(op, flat.dtype), finisher(op, flat.dtype, self.size, inspect)
        if algorithm == "native":
            self.comm.Allreduce(MPI.IN_PLACE, flat, op=NATIVE_OPS[op])
            if finish is not None:
                finish(flat)
        elif algorithm == "doubling":
            doubling.allreduce(self.comm, flat, reduce, self._scratch_for(flat.dtype, flat.size))
            if finish is not None:
                finish(flat)
        elif algorithm == "shm":
            window, offset = shared
            self.shared.allreduce(window, offset, flat.size, self._reduction(op, flat, finish))
        else:
            ring.allreduce(self.comm, flat, reduce, self._segment_elems(flat), self._scratch_for(flat.dtype), finish)

    def reduce_scatter(
        self,
        buf: np.ndarray,
        op: str = "sum",
        algorithm: str = "auto",
        inspect: Callable[[np.ndarray], None] | None = None,
    ) -> tuple[int, int]:
        """Reduce ``buf`` over all ranks so that this rank's chunk holds the result; return its (start, stop).

        In place; chunks are ``chunk_bounds(buf.size)``, rank r owning chunk
        r; other chunks are left with partial results. Contract: same length,
        dtype, op and algorithm on every rank. algorithm: "ring" (auto),
        "native" (MPI's Reduce_scatter) or "shm" (buffers from ``allocate``;
        chunk i of the node size belongs to node rank i, the same chunk on
        every node; other chunks keep this rank's values). ``inspect`` is
        called with this rank's finished chunk (in parts for "shm"). Raises as ``allreduce``.
        """
        flat = buf.reshape(-1) if isinstance(buf, np.ndarray) else buf
        shared = self._find_shared(flat)
        problem = buffer_problem(buf) or choice_problem("algorithm", algorithm, SCATTER_GATHER_ALGORITHMS)
        problem = problem or op_problem(op, buf.dtype) or _bf16_problem(algorithm, buf.dtype)
        problem = problem or _shm_problem(algorithm, shared, buf)
        self._check("reduce_scatter", buf, problem, op=op, algorithm=algorithm, shared=shared and shared[1])
        start, stop = self._owned(flat.size, algorithm)
        finish = finisher(op, flat.dtype, self.size, inspect)
        if self.size > 1 and flat.size:
            with self._watched("reduce_scatter", flat):
                self._reduce_scatter(flat, op, algorithm, start, stop, shared, finish)
        elif finish is not None and flat.size:
            finish(flat[start:stop])
        return start, stop

    def _reduction(self, op: str, flat: np.ndarray, finish: Callable[[np.ndarray], None] | None) -> Reduction:
        """How the shared-memory algorithms reduce and finish ``flat`` (its segment and scratch included)."""
        return Reduction(reducer(op, flat.dtype), finish, self._segment_elems(flat), self._scratch_for(flat.dtype))

    def _owned(self, count: int, algorithm: str) -> tuple[int, int]:
        if algorithm == "shm" and self.shared is not None:
            return ring.chunk_bounds(count, self.shared.node.Get_size())[self.shared.node.Get_rank()]
        return self.chunk_bounds(count)[self.rank]

    def _reduce_scatter(
        self,
        flat: np.ndarray,
        op: str,
        algorithm: str,
        start: int,
        stop: int,
        shared: Any,
        finish: Callable[[np.ndarray], None] | None,
    ) -> None:
        if algorithm == "shm":  # finishes each part of the chunk while it is in cache
            window, offset = shared
            self.shared.reduce_scatter(window, offset, flat.size, self._reduction(op, flat, finish))
            return
        if algorithm == "native":
            # Out of place: MPICH 5.0.2's in-place Reduce_scatter fails an overlap
            # assertion at 4 ranks and uneven chunks of a few hundred KiB.
            counts = [b - a for a, b in self.chunk_bounds(flat.size)]
            result = np.empty(stop - start, flat.dtype)
            self.comm.Reduce_scatter(flat, result, counts, op=NATIVE_OPS[op])
            flat[start:stop] = result
        else:
            reduce = reducer(op, flat.dtype)
            ring.reduce_scatter(self.comm, flat, reduce, self._segment_elems(flat), self._scratch_for(flat.dtype))
        if finish is not None:
            finish(flat[start:stop])

    def allgather(self, buf: np.ndarray, algorithm: str = "auto") -> np.ndarray:
        """Fill every rank's ``buf`` with chunk r taken from rank r, in place; return ``buf``.

        Chunks are ``chunk_bounds(buf.size)``. Contract: same length, dtype
        and algorithm on every rank. algorithm: "ring" (auto), "native"
        (MPI's Allgatherv) or "shm" (buffers from ``allocate``, chunks as
        ``reduce_scatter`` with "shm" owns them). Raises as ``allreduce``.
        """
        flat = buf.reshape(-1) if isinstance(buf, np.ndarray) else buf
        shared = self._find_shared(flat)
        problem = buffer_problem(buf) or choice_problem("algorithm", algorithm, SCATTER_GATHER_ALGORITHMS)
        problem = problem or _shm_problem(algorithm, shared, buf)
        self._check("allgather", buf, problem, algorithm=algorithm, shared=shared and shared[1])
        if self.size > 1 and flat.size:
            with self._watched("allgather", flat):
                if algorithm == "native":
                    bounds = self.chunk_bounds(flat.size)
                    counts, displs = [b - a for a, b in bounds], [a for a, _ in bounds]
                    self.comm.Allgatherv(MPI.IN_PLACE, [flat, (counts, displs)])
                elif algorithm == "shm":
                    window, offset = shared
                    self.shared.allgather(window, offset, flat.size)
                else:
                    ring.allgather(self.comm, flat, self._segment_elems(flat))
        return buf

    def broadcast(self, buf: np.ndarray, root: int = 0, algorithm: str = "auto") -> np.ndarray:
        """Copy ``buf`` from ``root`` to every rank, in place, and return it.

        Contract: same length, dtype, root and algorithm on every rank; for
        "shm", buffers from ``allocate`` at the same offset on every rank.
        algorithm: "tree" (binomial tree), "scatter" (scatter + ring
        all-gather, for large buffers), "shm" (readers copy from the root's
        node-shared buffer; tree between nodes), "native" (MPI's Bcast), or
        "auto": shm for shared buffers from ``tuning.broadcast_shm_bytes``,
        else scatter from ``tuning.broadcast_large_bytes`` on 3 or more ranks,
        else tree.

        Raises:
            TypeError / ValueError: as for ``allreduce``; also a root outside [0, size).
        """
        flat = buf.reshape(-1) if isinstance(buf, np.ndarray) else buf
        shared = self._find_shared(flat)
        problem = buffer_problem(buf) or choice_problem("algorithm", algorithm, BROADCAST_ALGORITHMS)
        problem = problem or root_problem(root, self.size) or _shm_problem(algorithm, shared, buf)
        self._check("broadcast", buf, problem, root=root, algorithm=algorithm, shared=shared and shared[1])
        if self.size > 1 and flat.size:
            with self._watched("broadcast", flat):
                self._broadcast(flat, root, algorithm, shared)
        return buf

    def _broadcast(self, flat: np.ndarray, root: int, algorithm: str, shared: Any) -> None:
        if algorithm == "auto":
            algorithm = self._auto_broadcast(flat, shared is not None)
        if algorithm == "shm":
            window, offset = shared
            self.shared.broadcast(window, offset, flat.size, root)
        elif algorithm == "native":
            self.comm.Bcast(flat, root=root)
        elif algorithm == "scatter":
            tree.scatter_allgather(self.comm, flat, root, self._segment_elems(flat))
        else:
            tree.broadcast(self.comm, flat, root)

    def allgather_object(self, obj: Any) -> list[Any]:
        """Gather a small picklable object from every rank, on every rank (control messages only)."""
        with self.watch("allgather_object"):
            return self.comm.allgather(obj)

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank passes an error (see ``checks.agree_on_error``)."""
        with self.watch("agreement on errors"):
            agree_on_error(self.comm, error)

    @contextlib.contextmanager
    def agreement(self) -> Iterator[None]:
        """Run a block on every rank; if it raises on any rank, raise on all (see ``agree``)."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every error must reach the other ranks
            self.agree(exc)
        else:
            self.agree(None)

    def free(self) -> None:
        """Release shared windows and communicators (collective).

        The object, and every array that ``allocate`` returned, is unusable afterwards.
        """
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.shared is not None:
            self.shared.free()
        self.comm.Free()

    def _auto_allreduce(self, flat: np.ndarray, shared: bool) -> str:
        small = flat.nbytes < self.tuning.allreduce_small_bytes
        if flat.dtype.itemsize == 2:
            # float16 / bfloat16: MPI has no bfloat16, and MPICH's float16 sum measured 2.5-4x
            # slower than ours (1 MiB, 2 ranks: 4.7 ms native, 1.1 ms shm, 1.3 ms ring).
            return "shm" if shared else ("doubling" if small else "ring")
        if shared:
            return "shm" if flat.nbytes >= self.tuning.allreduce_shm_bytes else "native"
        return "native" if small else "ring"

    def _auto_broadcast(self, flat: np.ndarray, shared: bool) -> str:
        if shared and flat.nbytes >= self.tuning.broadcast_shm_bytes:
            return "shm"
        # Scatter + all-gather moves 2(p-1)/p of the buffer per link against the tree's
        # log2(p) whole buffers: a gain only from 3 ranks on (measured: 0.8-0.97x at 2, 1.06-1.17x at 4).
        return "scatter" if self.size > 2 and flat.nbytes >= self.tuning.broadcast_large_bytes else "tree"

    @property
    def single_node(self) -> bool:
        """Whether every rank shares one node's memory, so no collective crosses a network."""
        return self.shared is not None and self.shared.cross is None

    def shares(self, buf: Any) -> bool:
        """Whether ``buf`` lies in node-shared memory from ``allocate`` (so "shm" algorithms take it)."""
        return self._find_shared(buf) is not None

    def _find_shared(self, flat: Any) -> tuple[Any, int] | None:
        return self.shared.find(flat) if self.shared is not None else None

    def _check(self, name: str, buf: Any, problem: Problem | None, **params: Any) -> None:
        self.sequence += 1
        if not self.checked:
            if problem is not None:
                raise ERROR_TYPES[problem[0]](f"{name}: {problem[1]}")
            return
        fingerprint = {"seq": self.sequence, "collective": name, **params}
        if problem is None:
            fingerprint.update(length=buf.size, dtype=str(buf.dtype))
        with self.watch(f"checking {name} #{self.sequence}", self.sequence):
            agree_on_call(self.comm, name, fingerprint, problem)

    def watch(self, what: str, sequence: int | None = None) -> contextlib.AbstractContextManager[None]:
        """A context that the watchdog (if ``timeout`` was given) aborts the job from when it overruns."""
        if self.watchdog is None:
            return contextlib.nullcontext()
        return self.watchdog.watch(what, sequence)

    def _watched(self, name: str, flat: Any) -> contextlib.AbstractContextManager[None]:
        shape = f"{name} #{self.sequence} ({flat.size} x {flat.dtype})"
        return self.watch(shape, self.sequence)

    def _segment_elems(self, flat: np.ndarray) -> int:
        return max(1, self.segment // flat.dtype.itemsize)

    def _scratch_for(self, dtype: np.dtype, count: int = 0) -> np.ndarray:
        """Per-dtype scratch of one segment (or ``count`` elements if more), allocated once and reused."""
        need = max(2, self.segment // dtype.itemsize, count)
        scratch = self._scratch.get(dtype)
        if scratch is None or scratch.size < need:
            scratch = self._scratch[dtype] = np.empty(need, dtype=dtype)
        return scratch
