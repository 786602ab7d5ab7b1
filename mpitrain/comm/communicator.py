"""Communicator: checks a call across ranks, picks an algorithm, runs it.

All collectives run on a private duplicate of the communicator passed in, so
they never match a user's own messages (point-to-point messages have a
duplicate of their own, see ``p2p``). Buffers are C-contiguous numpy arrays
of the dtypes in ``ops.DTYPES`` (float16 and bfloat16 reduced in float32
arithmetic), reduced in place, or device (cupy) arrays, which ``device``
hands to a CUDA-aware MPI directly or stages through host memory.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from mpi4py import MPI

from mpitrain.backend import is_device_array
from mpitrain.comm import doubling, ring, tree
from mpitrain.comm.checks import (
    ERROR_TYPES,
    Problem,
    QuickAgreement,
    agree_on_call,
    buffer_problem,
    choice_problem,
    op_problem,
    root_problem,
)
from mpitrain.comm.device import DeviceCollectives
from mpitrain.comm.groups import Groups
from mpitrain.comm.objects import ObjectCollectives
from mpitrain.comm.ops import BFLOAT16, NATIVE_OPS, Inspect, combiner, finisher, is_half, wire
from mpitrain.comm.p2p import PointToPoint
from mpitrain.comm.shm import Reduction, SharedBuffers
from mpitrain.comm.staging import Staging
from mpitrain.comm.tuning import Tuning
from mpitrain.comm.watchdog import Watchdog

_ABSENT = object()  # a collective without an op or a root
_UNWATCHED = contextlib.nullcontext()  # reusable: what a collective runs in without a watchdog
ALLREDUCE_ALGORITHMS = ("auto", "ring", "doubling", "shm", "native")
SCATTER_GATHER_ALGORITHMS = ("auto", "ring", "native", "shm")
BROADCAST_ALGORITHMS = ("auto", "tree", "scatter", "shm", "native")


def _shm_problem(algorithm: str, staging: Staging | None, buf: np.ndarray) -> Problem | None:
    if algorithm == "shm" and staging is None and buf.size:
        return "ValueError", "algorithm 'shm' needs node-shared memory, which nodes of unequal rank counts lack"
    return None


def _native_problem(algorithm: str, dtype: np.dtype) -> Problem | None:
    if algorithm == "native" and dtype == BFLOAT16:
        return "ValueError", "MPI cannot reduce bfloat16 buffers; use another algorithm"
    return None


class Communicator(PointToPoint, ObjectCollectives, Groups, DeviceCollectives):
    """Collectives and point-to-point messages over an mpi4py communicator (default ``COMM_WORLD``).

    Args:
        comm: the mpi4py communicator to duplicate.
        checked: ranks agree on every collective's (sequence, operation,
            length, dtype, op, root, algorithm) first, with one small
            allgather, so a mismatch or a bad buffer on any rank is the same
            error on every rank instead of a hang.
        tuning: ``algorithm="auto"`` thresholds and ring segment (default ``Tuning.from_env()``).
        node_size: treat each run of this many consecutive ranks as one node
            (to exercise the hierarchical path on one machine).
        timeout: seconds a collective, a message or a ``watch`` region may take
            before a watchdog reports it and aborts the job; None: no watchdog.
        watchdog: share this watchdog (a parent's, see ``split``); not with ``timeout``.

    Node-shared windows are created on first ``allocate``. ``close`` (or the
    end of a ``with`` block) frees everything; a closed one raises RuntimeError.

    ``sent_bytes`` counts what this rank has sent: messages exactly, and for
    each collective what a bandwidth-optimal algorithm sends from every rank
    (all-reduce 2(p-1)/p of the buffer, the others (p-1)/p), whichever
    algorithm ran, so strategies compare by the traffic they ask for.
    """

    def __init__(
        self,
        comm: MPI.Comm | None = None,
        checked: bool = True,
        tuning: Tuning | None = None,
        node_size: int | None = None,
        timeout: float | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        if watchdog is not None and timeout is not None:
            raise ValueError("give a timeout for a new watchdog or a watchdog to share, not both")
        self.comm = (MPI.COMM_WORLD if comm is None else comm).Dup()
        self._p2p = self.comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.checked = checked
        self.tuning = Tuning.from_env() if tuning is None else tuning
        self.sequence = 0
        self.sent_bytes = 0  # see _prepare and PointToPoint
        self.closed = False
        self._scratch: dict[np.dtype, np.ndarray] = {}
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank) if node_size is None else None
        if node is None:
            if node_size < 1:
                raise ValueError(f"node_size must be >= 1, got {node_size}")
            node = self.comm.Split(self.rank // node_size, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        self.shared, watched = SharedBuffers.over(self.comm, node, timeout is not None)
        self._staging = None if self.shared is None else Staging(self.shared, self.tuning.staging_bytes)
        quick = checked and self.size > 1 and self.shared is not None
        self._quick = QuickAgreement(self.shared) if quick else None
        # The progress array is allocated on every rank when any rank wants a watchdog: it is collective.
        progress = self.shared.progress(self.rank) if watched and self.shared is not None else (None, [])
        self._owns_watchdog = timeout is not None
        self.watchdog = Watchdog(self.rank, timeout, *progress) if timeout is not None else watchdog

    def chunk_bounds(self, count: int) -> list[tuple[int, int]]:
        """(start, stop) of each rank's chunk of a ``count``-element buffer in reduce_scatter / allgather."""
        return ring.chunk_bounds(count, self.size)

    def allocate(self, count: int, dtype: Any = np.float32) -> np.ndarray:
        """A zeroed 1-D buffer that the ranks of a node share (collective).

        All-reduce on such buffers reads peers' memory directly (``shm``),
        the fastest path inside a node. Falls back to a plain array when nodes
        hold different numbers of ranks. ``release`` frees it.
        """
        self._guard()
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        dtype = np.dtype(dtype)
        if self.shared is None:
            return np.zeros(count, dtype=dtype)
        if dtype == BFLOAT16:  # the window holds the bit patterns; the caller sees bfloat16
            return self.shared.allocate(count, np.uint16).view(BFLOAT16)
        return self.shared.allocate(count, dtype)

    def release(self, *buffers: Any) -> None:
        """Free the node-shared memory of buffers from ``allocate`` (collective: the same buffers, in the
        same order, on every rank); other arrays are left alone. The buffers are unusable afterwards."""
        self._guard()
        for buf in buffers:
            found = self._find_shared(buf.reshape(-1)) if isinstance(buf, np.ndarray) else None
            if found is not None:
                self.shared.release(found[0])

    def _prepare(
        self, name: str, buf: Any, algorithm: str, allowed: tuple[str, ...], op: Any = _ABSENT, root: Any = _ABSENT
    ) -> tuple:
        """The one preamble of every collective: guard, local checks, cross-rank agreement (checked mode).

        Returns (the wire view of the flat buffer, its shared window and offset or None). Written for
        speed: it runs before every collective, and a few microseconds here are the Communicator's
        whole overhead over calling MPI directly.
        """
        if self.closed:
            self._guard()
        flat = wire(buf if buf.ndim == 1 else buf.reshape(-1)) if isinstance(buf, np.ndarray) else buf
        shared = self.shared.find(flat) if self.shared is not None and self.shared.windows else None
        problem = buffer_problem(buf) or (
            None if algorithm in allowed else choice_problem("algorithm", algorithm, allowed)
        )
        if op is not _ABSENT:
            problem = problem or op_problem(op, buf.dtype) or _native_problem(algorithm, buf.dtype)
        if root is not _ABSENT:
            problem = problem or root_problem(root, self.size)
        if algorithm == "shm":
            problem = problem or _shm_problem(algorithm, self._staging, buf)
        self._check(name, buf, problem, algorithm, shared and shared[1], op, root)
        if self.size > 1:  # what a bandwidth-optimal algorithm sends from each rank
            self.sent_bytes += flat.nbytes * (2 if name == "allreduce" else 1) * (self.size - 1) // self.size
        return flat, shared

    def allreduce(self, buf: np.ndarray, op: str = "sum", algorithm: str = "auto", inspect: Inspect = None) -> Any:
        """Reduce ``buf`` over all ranks, in place, and return it.

        Contract: same length, dtype, op and algorithm on every rank, and
        either buffers from ``allocate`` at the same offset on every rank or
        other arrays on every rank. op: "sum", "mean" (floating dtypes),
        "max", "min"; integers wrap as in MPI. algorithm: "ring"
        (bandwidth-optimal, pipelined), "doubling" (few rounds, for small
        buffers), "shm" (node shared memory, hierarchical across nodes: a
        buffer from ``allocate`` in place, any other array through the
        staging area of ``staging``), "native" (MPI's in-place Allreduce), or
        "auto" (by ``Tuning.allreduce_algorithm``). All but native leave bit-identical
        results on every rank. ``inspect`` (e.g. a finiteness check) sees final
        values before other ranks copy them: for "ring" and "shm" the parts
        this rank reduced (all ranks' calls together see every element, once
        per node for "shm"), otherwise the whole buffer.

        A device (cupy) array also takes "direct", "staged", "staged-gpu" and
        "nccl" (see ``device``); "auto" is direct on a CUDA-aware MPI, else staged.

        Raises (checked mode: on every rank): TypeError (not a numpy or device
        array, an unsupported dtype); ValueError (non-contiguous or read-only,
        unknown op or algorithm, ranks that disagree); RuntimeError (closed).
        """
        if type(buf) is not np.ndarray and is_device_array(buf):
            return self._device_allreduce(buf, op, algorithm, inspect, ALLREDUCE_ALGORITHMS)
        flat, shared = self._prepare("allreduce", buf, algorithm, ALLREDUCE_ALGORITHMS, op=op)
        finish = finisher(op, buf.dtype, self.size, inspect)
        if self.size > 1 and flat.size:
            with self._watched("allreduce", flat):
                self._allreduce(flat, buf.dtype, op, algorithm, shared, finish)
        elif inspect is not None and flat.size:
            finisher("sum", buf.dtype, 1, inspect)(flat)
        return buf

    def _allreduce(self, flat: np.ndarray, dtype: np.dtype, op: str, algorithm: str, shared: Any, finish) -> None:
        if algorithm == "auto":
            algorithm = self.tuning.allreduce_algorithm(flat.nbytes, is_half(dtype), self._memory(shared))
        if algorithm == "native":
            self.comm.Allreduce(MPI.IN_PLACE, flat, op=NATIVE_OPS[op])
            if finish is not None:
                finish(flat)
        elif algorithm == "doubling":
            doubling.allreduce(self.comm, flat, combiner(op, dtype), self._scratch_for(flat.dtype, flat.size))
            if finish is not None:
                finish(flat)
        elif algorithm == "shm" and shared is None:
            self._staging.allreduce(flat, self._reduction(op, dtype, flat, finish))
        elif algorithm == "shm":
            window, offset = shared
            self.shared.allreduce(window, offset, flat.size, self._reduction(op, dtype, flat, finish))
        else:
            segment, scratch = self._segment_elems(flat), self._scratch_for(flat.dtype)
            ring.allreduce(self.comm, flat, combiner(op, dtype), segment, scratch, finish)

    def reduce_scatter(
        self, buf: np.ndarray, op: str = "sum", algorithm: str = "auto", inspect: Inspect = None
    ) -> tuple[int, int]:
        """Reduce ``buf`` over all ranks so that this rank's chunk holds the result; return its (start, stop).

        In place; chunks are ``chunk_bounds(buf.size)``, rank r owning chunk
        r; other chunks are left with partial results. Contract: same length,
        dtype, op and algorithm on every rank (and buffers as ``allreduce``).
        algorithm: "ring", "native" (MPI's Reduce_scatter), "shm" (node-shared
        memory, in place or staged; chunk i of the node size belongs to node
        rank i, the same chunk on every node; other chunks keep this rank's
        values), or "auto" (by ``Tuning.scatter_gather_algorithm``; shm only
        on one node, where its chunks are the ranks'). ``inspect`` is
        called with this rank's finished chunk (in parts for "shm"). Device
        arrays: as ``allreduce`` ("nccl" excepted). Raises as ``allreduce``.
        """
        if type(buf) is not np.ndarray and is_device_array(buf):
            return self._device_reduce_scatter(buf, op, algorithm, inspect, SCATTER_GATHER_ALGORITHMS)
        flat, shared = self._prepare("reduce_scatter", buf, algorithm, SCATTER_GATHER_ALGORITHMS, op=op)
        algorithm = self._scatter_gather("reduce_scatter", algorithm, flat, buf.dtype, shared)
        start, stop = self._owned(flat.size, algorithm)
        finish = finisher(op, buf.dtype, self.size, inspect)
        if self.size > 1 and flat.size:
            with self._watched("reduce_scatter", flat):
                self._reduce_scatter(flat, buf.dtype, op, algorithm, (start, stop), shared, finish)
        elif finish is not None and flat.size:
            finish(flat[start:stop])
        return start, stop

    def _reduction(self, op: str, dtype: np.dtype, flat: np.ndarray, finish: Inspect) -> Reduction:
        """How the shared-memory algorithms reduce and finish ``flat`` (its segment and scratch included)."""
        return Reduction(combiner(op, dtype), finish, self._segment_elems(flat), self._scratch_for(flat.dtype))

    def _owned(self, count: int, algorithm: str) -> tuple[int, int]:
        if algorithm == "shm" and self.shared is not None:
            return ring.chunk_bounds(count, self.shared.node.Get_size())[self.shared.node.Get_rank()]
        return self.chunk_bounds(count)[self.rank]

    def _reduce_scatter(self, flat, dtype, op: str, algorithm: str, owned: tuple[int, int], shared, finish) -> None:
        start, stop = owned
        if algorithm == "shm" and shared is None:
            self._staging.reduce_scatter(flat, self._reduction(op, dtype, flat, finish))
            return
        if algorithm == "shm":  # finishes each part of the chunk while it is in cache
            window, offset = shared
            self.shared.reduce_scatter(window, offset, flat.size, self._reduction(op, dtype, flat, finish))
            return
        if algorithm == "native":
            # Out of place: MPICH 5.0.2's in-place Reduce_scatter fails an overlap
            # assertion at 4 ranks and uneven chunks of a few hundred KiB.
            counts = [b - a for a, b in self.chunk_bounds(flat.size)]
            result = np.empty(stop - start, flat.dtype)
            self.comm.Reduce_scatter(flat, result, counts, op=NATIVE_OPS[op])
            flat[start:stop] = result
        else:
            scratch = self._scratch_for(flat.dtype)
            ring.reduce_scatter(self.comm, flat, combiner(op, dtype), self._segment_elems(flat), scratch)
        if finish is not None:
            finish(flat[start:stop])

    def allgather(self, buf: np.ndarray, algorithm: str = "auto") -> np.ndarray:
        """Fill every rank's ``buf`` with chunk r taken from rank r, in place; return ``buf``.

        Chunks are ``chunk_bounds(buf.size)``. Contract: same length, dtype
        and algorithm on every rank (and buffers as ``allreduce``).
        algorithm: "ring", "native" (MPI's Allgatherv), "shm" (node-shared
        memory, in place or staged, chunks as ``reduce_scatter`` with "shm"
        owns them) or "auto" (as ``reduce_scatter``). Device arrays: as
        ``reduce_scatter``. Raises as ``allreduce``.
        """
        if type(buf) is not np.ndarray and is_device_array(buf):
            return self._device_allgather(buf, algorithm, SCATTER_GATHER_ALGORITHMS)
        flat, shared = self._prepare("allgather", buf, algorithm, SCATTER_GATHER_ALGORITHMS)
        algorithm = self._scatter_gather("allgather", algorithm, flat, buf.dtype, shared)
        if self.size > 1 and flat.size:
            with self._watched("allgather", flat):
                self._allgather(flat, algorithm, shared)
        return buf

    def _allgather(self, flat: np.ndarray, algorithm: str, shared: Any) -> None:
        if algorithm == "native":
            bounds = self.chunk_bounds(flat.size)
            counts, displs = [b - a for a, b in bounds], [a for a, _ in bounds]
            self.comm.Allgatherv(MPI.IN_PLACE, [flat, (counts, displs)])
        elif algorithm == "shm" and shared is None:
            self._staging.allgather(flat)
        elif algorithm == "shm":
            window, offset = shared
            self.shared.allgather(window, offset, flat.size)
        else:
            ring.allgather(self.comm, flat, self._segment_elems(flat))

    def broadcast(self, buf: np.ndarray, root: int = 0, algorithm: str = "auto") -> np.ndarray:
        """Copy ``buf`` from ``root`` to every rank, in place, and return it.

        Contract: same length, dtype, root and algorithm on every rank ("shm":
        as ``allreduce``). algorithm: "tree" (binomial), "scatter" (scatter +
        ring all-gather, for large buffers), "shm" (readers copy from the
        root's shared or staged buffer; tree between nodes), "native" (MPI's Bcast), or
        "auto" (by ``Tuning.broadcast_algorithm``). Device arrays: as
        ``allreduce``. Raises as ``allreduce``, and ValueError for a root
        outside [0, size).
        """
        if type(buf) is not np.ndarray and is_device_array(buf):
            return self._device_broadcast(buf, root, algorithm, BROADCAST_ALGORITHMS)
        flat, shared = self._prepare("broadcast", buf, algorithm, BROADCAST_ALGORITHMS, root=root)
        if self.size > 1 and flat.size:
            with self._watched("broadcast", flat):
                self._broadcast(flat, root, algorithm, shared)
        return buf

    def _broadcast(self, flat: np.ndarray, root: int, algorithm: str, shared: Any) -> None:
        if algorithm == "auto":
            algorithm = self.tuning.broadcast_algorithm(flat.nbytes, self.size, self._memory(shared))
        if algorithm == "shm" and shared is None:
            self._staging.broadcast(flat, root)
        elif algorithm == "shm":
            window, offset = shared
            self.shared.broadcast(window, offset, flat.size, root)
        elif algorithm == "native":
            self.comm.Bcast(flat, root=root)
        elif algorithm == "scatter":
            tree.scatter_allgather(self.comm, flat, root, self._segment_elems(flat))
        else:
            tree.broadcast(self.comm, flat, root)

    def close(self) -> None:
        """Stop this Communicator's own watchdog, free its shared windows and communicators (collective).

        Idempotent. Every array that ``allocate`` returned is unusable
        afterwards, and every method but ``close`` raises RuntimeError.
        """
        if self.closed:
            return
        self.closed = True
        if self._owns_watchdog:
            self.watchdog.stop()  # before the window that holds its progress array goes
        if self.shared is not None:
            self._close_device()
            self._staging.free()
            self.shared.free()
        self._p2p.Free()
        self.comm.Free()

    free = close

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guard(self) -> None:
        if self.closed:
            raise RuntimeError("this Communicator is closed; create a new one (Communicator()) to go on")

    @property
    def single_node(self) -> bool:
        """Whether every rank shares one node's memory, so no collective crosses a network."""
        return self.shared is not None and self.shared.cross is None

    def shares(self, buf: Any) -> bool:
        """Whether ``buf`` lies in node-shared memory from ``allocate`` (so "shm" algorithms take it)."""
        return self._find_shared(wire(buf) if isinstance(buf, np.ndarray) else buf) is not None

    def _memory(self, shared: Any) -> str:
        """How a buffer reaches node-shared memory: "shared" (from ``allocate``), "staged" (copied through
        the staging area) or "none" (nodes of unequal rank counts)."""
        return "shared" if shared is not None else ("staged" if self._staging is not None else "none")

    def _scatter_gather(self, name: str, algorithm: str, flat: np.ndarray, dtype: np.dtype, shared: Any) -> str:
        """What reduce-scatter and all-gather run: "auto" resolved (shm keeps rank r's chunk r only on one node)."""
        if algorithm != "auto":
            return algorithm
        nbytes = flat.nbytes
        memory = self._memory(shared) if self.single_node else "none"
        return self.tuning.scatter_gather_algorithm(name, nbytes, is_half(dtype), memory)

    def _find_shared(self, flat: Any) -> tuple[Any, int] | None:
        return self.shared.find(flat) if self.shared is not None else None

    def _check(
        self, name: str, buf: Any, problem: Problem | None, algorithm: str, shared: Any, op: Any, root: Any
    ) -> None:
        self.sequence += 1
        if not self.checked:
            if problem is not None:
                raise ERROR_TYPES[problem[0]](f"{name}: {problem[1]}")
            return
        sequence = self.sequence
        waiting = _UNWATCHED if self.watchdog is None else self._wait(lambda: f"checking {name} #{sequence}", sequence)
        with waiting:
            if self._quick is not None:  # one line of text for the digest; the fingerprint only when it differs
                shown = (None if op is _ABSENT else op, None if root is _ABSENT else root)
                size, dtype = (buf.size, buf.dtype) if problem is None else (None, None)
                key = f"{sequence}|{name}|{algorithm}|{shared}|{shown[0]}|{shown[1]}|{size}|{dtype}"
                if self._quick.agree(key, problem):
                    return
            fingerprint = {"seq": sequence, "collective": name, "algorithm": algorithm, "shared": shared}
            if op is not _ABSENT:
                fingerprint["op"] = op
            if root is not _ABSENT:
                fingerprint["root"] = root
            if problem is None:
                fingerprint.update(length=buf.size, dtype=str(buf.dtype))
            agree_on_call(self.comm, name, fingerprint, problem)

    def watch(
        self, what: Any, sequence: int | None = None, waiting: bool = False
    ) -> contextlib.AbstractContextManager[None]:
        """A context that the watchdog (if any) aborts the job from when it overruns (``what``: a text,
        or a callable giving it).

        ``sequence`` marks a collective of this Communicator for the node's
        progress report; only the watchdog's owner records it. ``waiting``:
        the block waits on other ranks (see ``Watchdog.watch``); every wait
        of the Communicator's own is marked so.
        """
        if self.watchdog is None:
            return contextlib.nullcontext()
        return self.watchdog.watch(what, sequence if self._owns_watchdog else None, waiting)

    def _wait(self, what: Any, sequence: int | None = None) -> contextlib.AbstractContextManager[None]:
        """``watch`` for a wait on other ranks."""
        return self.watch(what, sequence, waiting=True)

    def _watched(self, name: str, flat: Any) -> contextlib.AbstractContextManager[None]:
        if self.watchdog is None:
            return _UNWATCHED
        sequence, size, dtype = self.sequence, flat.size, flat.dtype
        return self._wait(lambda: f"{name} #{sequence} ({size} x {dtype})", sequence)  # formatted only if late

    def _segment_elems(self, flat: np.ndarray) -> int:
        return max(1, self.tuning.segment_bytes // flat.dtype.itemsize)

    def _scratch_for(self, dtype: np.dtype, count: int = 0) -> np.ndarray:
        """Per-dtype scratch of one segment (or ``count`` elements if more), allocated once and reused."""
        need = max(2, self.tuning.segment_bytes // dtype.itemsize, count)
        scratch = self._scratch.get(dtype)
        if scratch is None or scratch.size < need:
            scratch = self._scratch[dtype] = np.empty(need, dtype=dtype)
        return scratch
