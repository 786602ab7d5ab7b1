"""Collectives and messages on device (GPU) arrays.

A device array takes one of these paths, named by the ``algorithm`` a
collective is given:

- ``"direct"``: the array goes to MPI's own collective as it is (mpi4py
  reads ``__cuda_array_interface__``), after the current stream has been
  synchronized. Only when the library is CUDA-aware (``cuda_aware``): any
  other MPI would read the device pointer as host memory and crash.
- ``"staged"``: through page-locked host memory, allocated once per
  Communicator and reused: node-shared memory (a window per dtype, page-
  locked with ``cudaHostRegister``) where the node has it, so the host
  collective is ``shm`` in place with no host copy of its own; private
  page-locked memory otherwise. All-reduce and broadcast run in segments of
  ``Tuning.device_segment_bytes``: while the host collective (``auto``, as
  for any host array) works on segment k, segment k+1 is already being
  copied to the host and segment k-1 back to the device, on two side
  streams. Reduce-scatter and all-gather copy only what they need (the
  whole buffer in and this rank's chunk out, or the reverse). Any host
  algorithm's name (``"ring"``, ``"shm"``...) is the staged path with that
  algorithm on the host copy.
- ``"staged-gpu"`` (all-reduce, one node): staged into node-shared memory
  as ``staged``, but reduced on the GPUs: each rank copies its peers' host
  copies of its own chunk to its device (their memory page-locked in its
  process too, on first use), adds them there (in node rank order), and
  copies the result back for the others to fetch. More bytes
  cross PCIe (about 3n instead of 2n per rank) and none go through the
  host's adds, which can be the slower of the two on a many-GPU node.
- ``"nccl"``: NCCL through cupy (all-reduce and broadcast; one GPU per rank).

``"auto"`` is direct on a CUDA-aware MPI and staged otherwise. Every call
ends with its results in place for work queued afterwards on the current
stream. "inspect" callbacks see the reduced values where they were reduced:
host copies on the staged path, device arrays on the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from mpi4py import MPI

from mpitrain import backend
from mpitrain.comm import nccl, ring
from mpitrain.comm.checks import Problem, choice_problem, op_problem, root_problem
from mpitrain.comm.cuda_aware import CudaAwareness, detect
from mpitrain.comm.ops import BFLOAT16, DTYPES, NATIVE_OPS, UFUNCS, Inspect, finisher

PATHS = ("auto", "direct", "staged")
GPU_REDUCED = "staged-gpu"
DEVICE_DTYPES = tuple(d for d in DTYPES if d != BFLOAT16)  # cupy has no bfloat16


def device_buffer_problem(buf: Any) -> Problem | None:
    """What makes a device array unusable for a collective or a message, or None."""
    if buf.dtype not in DEVICE_DTYPES:
        return (
            "TypeError",
            f"unsupported dtype {buf.dtype} on the device; expected one of {', '.join(map(str, DEVICE_DTYPES))}",
        )
    if not buf.flags.c_contiguous:
        return "ValueError", "device buffer is not C-contiguous (use cupy.ascontiguousarray)"
    return None


class DeviceCollectives:
    """The device half of ``Communicator`` (a mixin: uses its ``comm``, ``size``, ``tuning``, ``_check``,
    ``_watched`` and the host algorithms ``_allreduce`` / ``_broadcast`` / ``_reduce_scatter`` /
    ``_scatter_gather``). Its transfers and NCCL communicator are made on first use."""

    comm: MPI.Comm
    size: int
    _transfers: backend.Transfers | None = None
    _nccl: nccl.Nccl | None = None
    _awareness: CudaAwareness | None = None
    # Staging memory per dtype: this rank's node-shared array, and the arrays this process page-locked
    # (its own; its peers' too once "staged-gpu" has copied from them).
    _windows: dict[np.dtype, tuple[np.ndarray, list[np.ndarray]]] | None = None
    _peers_tried: set[np.dtype]  # the windows whose peers' arrays "staged-gpu" has tried to pin

    @property
    def cuda_aware(self) -> CudaAwareness:
        """Whether this Communicator hands device arrays to MPI directly (detected once)."""
        if self._awareness is None:
            self._awareness = detect()
        return self._awareness

    def device_path(self, algorithm: str = "auto") -> str:
        """What a device array given ``algorithm`` goes through: "direct", "staged", "staged-gpu" or "nccl"."""
        if algorithm == "auto":
            return "direct" if self.cuda_aware.aware else "staged"
        return algorithm if algorithm in ("direct", "nccl", GPU_REDUCED) else "staged"

    def _device_problem(self, buf: Any, algorithm: str, host: tuple[str, ...], name: str) -> Problem | None:
        device_only = ("nccl", GPU_REDUCED) if name == "allreduce" else ("nccl",) if name == "broadcast" else ()
        allowed = (*PATHS, *device_only, *(a for a in host if a != "auto"))
        problem = device_buffer_problem(buf) or choice_problem("algorithm", algorithm, allowed)
        if problem is None and algorithm == GPU_REDUCED and not self.single_node:
            return "ValueError", "algorithm 'staged-gpu' needs every rank on one node with node-shared memory"
        if problem is None and algorithm == "direct" and not self.cuda_aware.aware:
            return "ValueError", (
                f"algorithm 'direct' hands device pointers to MPI, which is not CUDA-aware here "
                f"({self.cuda_aware.detail}); use 'staged' or 'auto'"
            )
        if problem is None and algorithm == "nccl":
            return nccl.problem()
        return problem

    def _device_prepare(
        self, name: str, buf: Any, algorithm: str, host: tuple[str, ...], op: Any = None, root: Any = None
    ) -> tuple[Any, str]:
        """Checks and agreement for a device collective; (the flat array, the path it takes)."""
        problem = self._device_problem(buf, algorithm, host, name)
        if op is not None:
            problem = problem or op_problem(op, buf.dtype)
        if root is not None:
            problem = problem or root_problem(root, self.size)
        self._check(name, buf, problem, algorithm, "device", "" if op is None else op, "" if root is None else root)
        if self.size > 1:
            self.sent_bytes += buf.nbytes * (2 if name == "allreduce" else 1) * (self.size - 1) // self.size
        return buf.reshape(-1), self.device_path(algorithm)

    def _device_allreduce(self, buf: Any, op: str, algorithm: str, inspect: Inspect, host: tuple[str, ...]) -> Any:
        flat, path = self._device_prepare("allreduce", buf, algorithm, host, op=op)
        finish = finisher(op, buf.dtype, self.size, inspect)
        if not flat.size:
            return buf
        if self.size == 1:  # nothing to reduce: finish on the device, no copy
            if finish is not None:
                finish(flat)
            return buf
        with self._watched("allreduce", flat):
            if path == "nccl":
                self._nccl_comm().allreduce(flat, op)
                if finish is not None:
                    finish(flat)
            elif path == "direct":
                backend.synchronize_device()
                self.comm.Allreduce(MPI.IN_PLACE, flat, op=NATIVE_OPS[op])
                if finish is not None:
                    finish(flat)
            elif path == GPU_REDUCED:
                self._gpu_reduced_allreduce(flat, op, finish)
            else:
                method = "auto" if algorithm in PATHS else algorithm
                run = lambda piece: self._host_allreduce(piece, buf.dtype, op, method, finish)  # noqa: E731
                self._staged(flat, copy_in=True, copy_out=True, run=run)
        return buf

    def _gpu_reduced_allreduce(self, flat: Any, op: str, finish: Inspect) -> None:
        """All-reduce through node-shared host memory with the adds on the GPU (``"staged-gpu"``)."""
        transfers, node = self._transfers_for(), self.shared.node
        host = self._staging_memory(flat.size, flat.dtype)
        window, _ = self._find_shared(host)
        self._pin_peers(flat.dtype, window.peers)
        peers = [peer[: flat.size] for peer in window.peers]  # every node rank's host copy, in node rank order
        me = node.Get_rank()
        bounds = ring.chunk_bounds(flat.size, node.Get_size())
        start, stop = bounds[me]
        transfers.begin()
        transfers.wait(transfers.to_host(flat, host))
        self.shared.sync(window.win)  # every rank's copy is in
        if stop > start:
            cupy = backend.device_module()
            combine, arriving = getattr(cupy, UFUNCS[op].__name__), cupy.empty(stop - start, flat.dtype)  # cupy's own
            mine = flat[start:stop]
            for rank, peer in enumerate(peers):  # node rank order: one owner sums each chunk, the same way
                if rank != me:
                    transfers.begin()  # the previous add has read ``arriving``
                    transfers.to_device(peer[start:stop], arriving)
                    transfers.end()
                    combine(mine, arriving, out=mine)
            if finish is not None:
                finish(mine)
            transfers.begin()
            transfers.wait(transfers.to_host(mine, host[start:stop]))
        self.shared.sync(window.win)  # every chunk is reduced
        for rank, (a, b) in enumerate(bounds):
            if rank != me and b > a:
                transfers.to_device(peers[rank][a:b], flat[a:b])
        transfers.end()
        self.shared.sync(window.win)  # no rank rewrites its copy while a peer still reads it

    def _host_allreduce(self, piece: np.ndarray, dtype: np.dtype, op: str, method: str, finish: Inspect) -> None:
        self._allreduce(piece, dtype, op, method, self._find_shared(piece), finish)

    def _device_broadcast(self, buf: Any, root: int, algorithm: str, host: tuple[str, ...]) -> Any:
        flat, path = self._device_prepare("broadcast", buf, algorithm, host, root=root)
        if not flat.size or self.size == 1:
            return buf
        with self._watched("broadcast", flat):
            if path == "nccl":
                self._nccl_comm().broadcast(flat, root)
            elif path == "direct":
                backend.synchronize_device()
                self.comm.Bcast(flat, root=root)
            else:
                method = "auto" if algorithm in PATHS else algorithm
                run = lambda piece: self._broadcast(piece, root, method, self._find_shared(piece))  # noqa: E731
                self._staged(flat, copy_in=self.rank == root, copy_out=self.rank != root, run=run)
        return buf

    def _device_reduce_scatter(
        self, buf: Any, op: str, algorithm: str, inspect: Inspect, host: tuple[str, ...]
    ) -> tuple[int, int]:
        flat, path = self._device_prepare("reduce_scatter", buf, algorithm, host, op=op)
        finish = finisher(op, buf.dtype, self.size, inspect)
        bounds = self.chunk_bounds(flat.size)
        if self.size == 1:  # the whole buffer is this rank's chunk: finish it on the device, no copy
            if finish is not None and flat.size:
                finish(flat)
            return bounds[0]
        if path == "direct":
            start, stop = bounds[self.rank]
            if flat.size:
                with self._watched("reduce_scatter", flat):
                    backend.synchronize_device()
                    result = backend.device_module().empty(stop - start, flat.dtype)
                    self.comm.Reduce_scatter(flat, result, [b - a for a, b in bounds], op=NATIVE_OPS[op])
                    flat[start:stop] = result
                    if finish is not None:
                        finish(flat[start:stop])
            return start, stop
        host_view = self._host_copy(flat)
        shared = self._find_shared(host_view)
        method = self._scatter_gather(
            "reduce_scatter", "auto" if algorithm in PATHS else algorithm, host_view, buf.dtype, shared
        )
        start, stop = self._owned(flat.size, method)
        if flat.size:
            with self._watched("reduce_scatter", flat):
                self._reduce_scatter(host_view, buf.dtype, op, method, (start, stop), shared, finish)
                self._back_to_device(host_view, flat, [(start, stop)])
        return start, stop

    def _device_allgather(self, buf: Any, algorithm: str, host: tuple[str, ...]) -> Any:
        flat, path = self._device_prepare("allgather", buf, algorithm, host)
        if not flat.size or self.size == 1:
            return buf
        bounds = self.chunk_bounds(flat.size)
        with self._watched("allgather", flat):
            if path == "direct":
                backend.synchronize_device()
                counts, displs = [b - a for a, b in bounds], [a for a, _ in bounds]
                self.comm.Allgatherv(MPI.IN_PLACE, [flat, (counts, displs)])
                return buf
            host_view = self._staging_memory(flat.size, flat.dtype)
            shared = self._find_shared(host_view)
            method = self._scatter_gather(
                "allgather", "auto" if algorithm in PATHS else algorithm, host_view, buf.dtype, shared
            )
            start, stop = self._owned(flat.size, method)
            self._host_copy(flat, (start, stop))
            self._allgather(host_view, method, shared)
            self._back_to_device(host_view, flat, [(0, start), (stop, flat.size)])
        return buf

    def _staged(self, flat: Any, copy_in: bool, copy_out: bool, run: Callable[[np.ndarray], None]) -> None:
        """Run ``run`` on host copies of ``flat``'s segments, the copies of neighbouring segments overlapping it."""
        transfers = self._transfers_for()
        host = self._staging_memory(flat.size, flat.dtype)
        segments = list(_segments(flat.size, max(1, self.tuning.device_segment_bytes // flat.dtype.itemsize)))
        transfers.begin()
        arriving = transfers.to_host(flat[slice(*segments[0])], host[slice(*segments[0])]) if copy_in else None
        for k, (a, b) in enumerate(segments):
            upcoming = None
            if copy_in and k + 1 < len(segments):
                c, d = segments[k + 1]
                upcoming = transfers.to_host(flat[c:d], host[c:d])
            if arriving is not None:
                transfers.wait(arriving)
            run(host[a:b])
            if copy_out:
                transfers.to_device(host[a:b], flat[a:b])
            arriving = upcoming
        transfers.end()

    def _host_copy(self, flat: Any, part: tuple[int, int] | None = None) -> np.ndarray:
        """The staging memory as ``flat``'s dtype, holding all of ``flat`` or only ``part`` of it."""
        transfers = self._transfers_for()
        host = self._staging_memory(flat.size, flat.dtype)
        a, b = (0, flat.size) if part is None else part
        transfers.begin()
        if b > a:
            transfers.wait(transfers.to_host(flat[a:b], host[a:b]))
        return host

    def _staging_memory(self, count: int, dtype: np.dtype) -> np.ndarray:
        """``count`` elements of host memory for a staged collective (collective: every rank asks alike).

        Node-shared where the node has shared memory, one window per dtype,
        grown (by powers of two) only for a larger buffer and page-locked
        when CUDA allows; the host collective then reads peers' copies in
        place. Private page-locked memory otherwise.
        """
        transfers = self._transfers_for()
        if self.shared is None:
            return transfers.host(count * dtype.itemsize).view(dtype)
        if self._windows is None:
            self._windows, self._peers_tried = {}, set()
        held = self._windows.get(dtype)
        if held is None or held[0].size < count:
            if held is not None:
                self._forget_window(*held)
                self._peers_tried.discard(dtype)
            window = self.allocate(1 << max(count - 1, 1).bit_length(), dtype)
            held = self._windows[dtype] = (window, [window] if transfers.pin(window) else [])
        return held[0][:count]

    def _pin_peers(self, dtype: np.dtype, peers: list[np.ndarray]) -> None:
        """Page-lock, in this process, the node peers' arrays of the ``dtype`` staging window, so copies
        from them to this GPU run as fast as from its own (tried once per window)."""
        if dtype in self._peers_tried:
            return
        self._peers_tried.add(dtype)
        window, pinned = self._windows[dtype]
        mine = window.ctypes.data
        pinned += [peer for peer in peers if peer.ctypes.data != mine and self._transfers_for().pin(peer)]

    def _forget_window(self, window: np.ndarray, pinned: list[np.ndarray]) -> None:
        for array in pinned:
            self._transfers_for().unpin(array)
        self.release(window)

    def _close_device(self) -> None:
        """Give back the staging windows' page-locking (before the windows are freed)."""
        for _, pinned in (self._windows or {}).values():
            for array in pinned:
                self._transfers_for().unpin(array)
        self._windows = None

    def _back_to_device(self, host: np.ndarray, flat: Any, parts: list[tuple[int, int]]) -> None:
        transfers = self._transfers_for()
        for a, b in parts:
            if b > a:
                transfers.to_device(host[a:b], flat[a:b])
        transfers.end()

    def _device_message(self, flat: Any, receiving: bool) -> tuple[Any, Callable[[], None] | None]:
        """What MPI moves for a device array's message, and what to do once the message is complete.

        CUDA-aware: the array itself (the stream synchronized first), nothing
        after. Otherwise a pooled page-locked host buffer: filled from the
        device before a send; copied to the device after a receive; back to
        the pool after either.
        """
        if self.cuda_aware.aware:
            backend.synchronize_device()
            return flat, None
        transfers = self._transfers_for()
        pooled = transfers.message(flat.nbytes)
        host = pooled[: flat.nbytes].view(flat.dtype)
        if not receiving:
            transfers.begin()
            transfers.wait(transfers.to_host(flat, host))
            return host, lambda: transfers.release(pooled)

        def arrived() -> None:
            transfers.to_device(host, flat)
            transfers.end()
            transfers.release(pooled)

        return host, arrived

    def _transfers_for(self) -> backend.Transfers:
        if self._transfers is None:
            self._transfers = backend.Transfers()
        return self._transfers

    def _nccl_comm(self) -> nccl.Nccl:
        if self._nccl is None:
            self._nccl = nccl.Nccl(self)
        return self._nccl


def _segments(count: int, segment: int) -> Iterator[tuple[int, int]]:
    return ((a, min(a + segment, count)) for a in range(0, count, segment))
