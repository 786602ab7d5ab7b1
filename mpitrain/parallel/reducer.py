"""Bucketed, overlapped averaging of a flat gradient buffer: the piece data parallelism and
``DistributedOptimizer`` share.

The buffer is cut into buckets of about ``bucket_bytes`` on parameter
boundaries, in the order backward fills it (the reverse layout puts the last
layer first). During backward the caller says how many leading elements are
final (``ready``); each bucket that is then complete goes to a worker thread
that averages it across the ranks while backward goes on (numpy and MPI
release the GIL). ``finish`` averages what is left, waits, and combines the
ranks' finiteness verdicts. Overlapped or not, the same buckets are reduced
the same way, so the results are bit-identical.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from mpitrain import backend
from mpitrain.comm import Communicator
from mpitrain.comm.compress import build_compressor
from mpitrain.timeline import SPANS, clock

DEFAULT_BUCKET_BYTES = 1 << 20


def finite(values: Any) -> bool:
    """Whether every value is finite, in one pass: a dot product with itself is NaN/Inf when any value is,
    and BLAS reads it faster than a sum. Only when it overflows (values past 1e19) does an exact sum decide."""
    xp = backend.array_module_of(values)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow here is an answer, not a problem
        return math.isfinite(float(xp.dot(values, values))) or math.isfinite(float(values.sum()))


def plan_buckets(layout: Sequence[tuple[str, int, int]], itemsize: int, bucket_bytes: int) -> list[tuple[int, int]]:
    """(start, stop) of each bucket of a flat buffer laid out as ``layout`` ((name, start, stop) in
    buffer order): buckets end on parameter boundaries and hold at least ``bucket_bytes`` (the last may
    hold less)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be at least 1, got {bucket_bytes}")
    buckets, start = [], 0
    for _, _, end in layout:
        if (end - start) * itemsize >= bucket_bytes:
            buckets.append((start, end))
            start = end
    if layout and layout[-1][2] > start:
        buckets.append((start, layout[-1][2]))
    return buckets


class _Worker(threading.Thread):
    """Runs queued bucket averages in order; ``close`` ends it."""

    def __init__(self, work: Any, grads: Any) -> None:
        super().__init__(name="mpitrain-gradients", daemon=True)
        self.work, self.scope = work, backend.device_scope(grads)  # the gradients' GPU, in this thread too
        self.jobs: queue.Queue[tuple[int] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        with self.scope:
            while (job := self.jobs.get()) is not None:
                try:
                    if self.error is None:
                        self.work(*job)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller in wait()
                    self.error = exc
                finally:
                    self.jobs.task_done()

    def wait(self) -> None:
        self.jobs.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        self.jobs.put(None)
        self.join()


class GradientReducer:
    """Averages a flat gradient buffer over ``comm`` in buckets, optionally during backward.

    Args:
        comm: the data-parallel group.
        grads: the flat gradient buffer (``Module.flat_grads``).
        layout: its (name, start, stop) in buffer order (``Module.layout``).
        algorithm: all-reduce algorithm (see ``Communicator.allreduce``).
        bucket_bytes: gradient bytes per reduction.
        overlap: reduce in a worker thread as buckets become ready (where
            there is more than one rank and more than one bucket).
        compression: "none", "fp16", "bf16" or "topk:RATIO" (see ``comm.compress``).
        shard: reduce-scatter each bucket with this algorithm instead of
            all-reducing it, so each rank ends with only its owned chunks
            averaged (``owned``); None: all-reduce. Not with compression.

    A step: ``begin()``, then ``ready(n)`` as backward finishes the first
    ``n`` elements (optional), then ``finish()``, which returns whether the
    averaged gradients are finite on every rank (each rank checks the values
    it finishes, inside the reduction). ``close()`` ends the worker and
    gives back the compressor's buffers.
    """

    def __init__(
        self,
        comm: Communicator,
        grads: Any,
        layout: Sequence[tuple[str, int, int]],
        algorithm: str = "auto",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        overlap: bool = True,
        compression: str = "none",
        shard: str | None = None,
    ) -> None:
        if shard is not None and compression != "none":
            raise ValueError(f"a sharded reduction works with uncompressed gradients, not compression {compression!r}")
        self.comm, self.grads, self.algorithm, self.shard = comm, grads, algorithm, shard
        self.buckets = plan_buckets(layout, grads.dtype.itemsize, bucket_bytes)
        self.compressor = build_compressor(compression, comm, grads.size, backend.array_module_of(grads))
        self.owned: list[tuple[int, int]] = []  # with shard: the (start, stop) this rank holds averaged
        self._xp = backend.array_module_of(grads)
        self._finite = True
        self._next = 0
        self.contributors = comm.size  # ranks whose gradients came from a batch in the last finish
        # A worker only where it can overlap anything: with one rank there is nothing to send, and one
        # bucket can only start once backward is done; handing work to a thread then costs the step.
        useful = overlap and comm.size > 1 and len(self.buckets) > 1
        self._worker = _Worker(self._reduce, grads) if useful else None

    @property
    def overlap(self) -> bool:
        """Whether buckets are reduced by a worker thread during backward."""
        return self._worker is not None

    def begin(self) -> None:
        """Start a step: no bucket submitted yet."""
        self._finite, self._next = True, 0
        self.owned.clear()

    def ready(self, count: int) -> None:
        """The first ``count`` elements are final: hand every bucket they complete to the worker."""
        synced = False
        while self._next < len(self.buckets) and self.buckets[self._next][1] <= count:
            if not synced:  # a device's queued kernels must have written the bucket before it travels
                backend.synchronize(self._xp)
                synced = True
            self._submit(self._next)
            self._next += 1

    def finish(self, contributes: bool = True) -> bool:
        """Reduce the buckets not yet handed over, wait for all, and return whether the averaged
        gradients are finite on every rank.

        ``contributes``: whether this rank's gradients came from a batch (False:
        a rank that has run out of data adds zeros, see ``api.join``);
        ``contributors`` is then how many ranks did, the same on every rank.
        The time this keeps the caller is the step's exposed communication
        (spans "exposed_comm"; a worker's bucket reductions are "allreduce").
        """
        backend.synchronize(self._xp)
        for index in range(self._next, len(self.buckets)):
            self._submit(index)
        self._next = len(self.buckets)
        began = clock()
        if self._worker is not None:
            self._worker.wait()
        if self.comm.size == 1:
            finite, self.contributors = self._finite, int(contributes)
        else:  # one small all-reduce for both verdicts
            broken, self.contributors = self.comm.count_true(not self._finite, contributes)
            finite = broken == 0
        SPANS.add("exposed_comm", began)
        return finite

    def gather(self, buffer: Any) -> None:
        """All-gather ``buffer`` bucket by bucket, so every rank's owned chunks reach every rank (shard only)."""
        began = clock()
        for start, stop in self.buckets:
            self.comm.allgather(buffer[start:stop], algorithm=self.shard)
        SPANS.add("exposed_comm", began, what="allgather")

    def close(self) -> None:
        """End the worker thread and release the compressor's buffers (collective)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        self.compressor.close(self.comm)

    def _submit(self, index: int) -> None:
        if self._worker is not None:
            self._worker.jobs.put((index,))
        else:
            self._reduce(index)

    def _reduce(self, index: int) -> None:
        start, stop = self.buckets[index]
        began = clock()
        self._average(start, stop)
        # In the worker it overlaps backward; in the caller's thread it is exposed, inside finish's span.
        name = "allreduce" if threading.current_thread() is self._worker else "exposed_comm"
        SPANS.add(name, began, bucket=index, bytes=(stop - start) * self.grads.itemsize)

    def _average(self, start: int, stop: int) -> None:
        if self.comm.size == 1 and self.shard is None and self.compressor.name == "none":  # nothing to average
            self._inspect(self.grads[start:stop])
        elif self.shard is None:
            self.compressor.reduce_mean(self.comm, self.grads, start, stop, self.algorithm, self._inspect)
        else:  # only the owned chunk ends averaged
            view = self.grads[start:stop]
            a, b = self.comm.reduce_scatter(view, op="mean", algorithm=self.shard, inspect=self._inspect)
            self.owned.append((start + a, start + b))

    def _inspect(self, averaged: Any) -> None:
        self._finite = self._finite and finite(averaged)
