"""Synchronous data parallelism: one replica per rank, gradients averaged every step.

The flat gradient buffer is laid out in reverse layer order, so the
gradients that backward finishes first sit at its front. It is cut into
buckets of about ``bucket_bytes``; with ``overlap`` a worker thread averages
each bucket across the ranks as soon as backward has filled it, while the
main thread goes on with earlier layers (numpy and MPI release the GIL). The
optimizer waits for every bucket. Overlapped or not, the same buckets are
reduced the same way, so the results are bit-identical.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mpitrain import backend
from mpitrain.comm import Communicator, mark_all_ranks
from mpitrain.comm.compress import build_compressor
from mpitrain.nn import Dropout, Module, Sequential, SoftmaxCrossEntropy
from mpitrain.optim import Optimizer

DEFAULT_BUCKET_BYTES = 1 << 20
# Layer outputs per micro-batch when the size is automatic. Measured (2-core Xeon, one thread,
# per-rank batch 128): the CNN (119 KiB of outputs per sample) took 46 ms per step as one batch,
# 42 ms in micro-batches of 64, 34 ms in 32 and 33 ms in 16; the MLP 784-1024-1024-10 (20 KiB
# per sample) took 15 ms whole and 18 ms in 64s, as it re-reads its 7 MiB of weights per micro-batch.
MICRO_BATCH_BYTES = 4 << 20
PHASES = ("forward", "backward", "allreduce_wait", "optimizer")
NONFINITE = ("abort", "skip")


def _finite(values: Any) -> bool:
    """Whether every value is finite, in one pass: a dot product with itself is NaN/Inf when any value is,
    and BLAS reads it 1.4-2.4x faster than a sum. Only when it overflows (values past 1e19) does an exact
    sum decide."""
    xp = backend.array_module_of(values)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow here is an answer, not a problem
        return math.isfinite(float(xp.dot(values, values))) or math.isfinite(float(values.sum()))


def plan_buckets(model: Module, bucket_bytes: int) -> list[tuple[int, int]]:
    """(start, stop) of each bucket of the flat gradient buffer, in the order backward fills them.

    Buckets end on parameter boundaries and hold at least ``bucket_bytes``
    (the last may hold less).
    """
    itemsize = model.flat_grads.dtype.itemsize
    buckets, start, end = [], 0, 0
    for param in reversed(model.parameters()):
        end += param.size
        if (end - start) * itemsize >= bucket_bytes:
            buckets.append((start, end))
            start = end
    if end > start:
        buckets.append((start, end))
    return buckets


class _Reducer(threading.Thread):
    """A worker thread that runs the bucket all-reduces in the order they are queued."""

    def __init__(self, work: Callable[[int, int], None]) -> None:
        super().__init__(name="mpitrain-allreduce", daemon=True)
        self.work = work
        self.jobs: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if self.error is None:
                    self.work(*job)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread in wait()
                self.error = exc
            finally:
                self.jobs.task_done()

    def wait(self) -> None:
        self.jobs.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


class DataParallel:
    """Wraps a model and its optimizer so every rank applies the same averaged update.

    Each step: forward and backward on this rank's batch (as ``accumulate``
    micro-batches, summed locally), the mean all-reduce of the flat gradient
    buffer bucket by bucket, then one optimizer update of the flat parameter
    buffer. Every rank starts from rank 0's parameters and applies
    bit-identical gradients, so the replicas stay bit-identical.

    Args:
        model: a model whose ``init_params`` has run.
        optimizer: an optimizer over ``model.flat_params`` / ``model.flat_grads``.
        comm: the communicator of the data-parallel group.
        algorithm: all-reduce algorithm (see ``Communicator.allreduce``).
        bucket_bytes: gradient bytes per all-reduce.
        overlap: start each bucket's all-reduce during backward (needs a
            Sequential model; other models reduce after backward).
        compression: "none", "fp16", "bf16" or "topk:RATIO" (see ``comm.compress``).
        accumulate: micro-batches per step, summed locally before one all-reduce.
        micro_batch: at most this many samples per forward/backward (0: automatic,
            about ``MICRO_BATCH_BYTES`` of layer outputs each, which keeps a
            convolutional model's activations in cache). Splitting changes
            only the round-off of the summed gradient.
        nonfinite: what a NaN/Inf in the averaged gradients does: "abort"
            (raise on every rank, naming the step and the ranks whose local
            gradients were non-finite) or "skip" (no update on any rank,
            counted in ``skipped_steps``). Each rank checks the averaged
            values it finishes, inside the reduction, and one small
            all-reduce combines the verdicts; the local gradients of an
            aborted step are recomputed to name the ranks.
        shard_optimizer: reduce-scatter each bucket instead of all-reducing
            it, update only the chunks this rank owns, then all-gather the
            updated parameters (as ZeroRedundancyOptimizer, with the state
            kept whole-sized): the optimizer's work is divided by the rank
            count and the results are bit-identical to the unsharded path
            with the same algorithm. Uses node-shared memory when the
            parameters, gradients and optimizer state come from
            ``comm.allocate``, else the ring. Not with compression.

    Attributes:
        timings: seconds spent per phase (forward, backward, allreduce_wait,
            optimizer) over ``steps`` steps.
    """

    def __init__(
        self,
        model: Module,
        optimizer: Optimizer,
        comm: Communicator,
        algorithm: str = "auto",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        overlap: bool = True,
        compression: str = "none",
        accumulate: int = 1,
        nonfinite: str = "abort",
        micro_batch: int = 0,
        shard_optimizer: bool = False,
    ) -> None:
        if optimizer.params is not model.flat_params or optimizer.grads is not model.flat_grads:
            raise ValueError("the optimizer must update the model's own flat_params and flat_grads")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be at least 1, got {bucket_bytes}")
        if accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {accumulate}")
        if micro_batch < 0:
            raise ValueError(f"micro_batch must be at least 0 (automatic), got {micro_batch}")
        self.model, self.optimizer, self.comm, self.algorithm = model, optimizer, comm, algorithm
        model.need_input_grad = False  # nothing uses the gradient with respect to the data
        if nonfinite not in NONFINITE:
            raise ValueError(f"unknown nonfinite policy {nonfinite!r}; expected one of {', '.join(NONFINITE)}")
        self.accumulate, self.nonfinite, self.micro_batch = accumulate, nonfinite, micro_batch
        self._auto_micro: dict[tuple[int, ...], int] = {}
        self.skipped_steps = 0
        self._averaged_finite = True
        self._dropouts = [layer for layer in model.modules() if isinstance(layer, Dropout)]
        self.loss_fn = SoftmaxCrossEntropy()
        self.compressor = build_compressor(compression, comm, model.flat_grads.size)
        if shard_optimizer and compression != "none":
            raise ValueError(f"shard_optimizer works with uncompressed gradients, not compression {compression!r}")
        buffers = [model.flat_params, model.flat_grads, *optimizer.state_dict().values()]
        shared = all(comm.shares(b) for b in buffers if getattr(b, "ndim", 0))
        self.shard = ("shm" if shared else "ring") if shard_optimizer else None
        self._owned: list[tuple[int, int]] = []
        self.buckets = plan_buckets(model, bucket_bytes)
        self.overlap = overlap
        self._ready = self._ready_offsets() if overlap and isinstance(model, Sequential) else None
        self._next_bucket = 0
        self._worker = _Reducer(self._reduce_bucket) if overlap else None
        self.timings = dict.fromkeys(PHASES, 0.0)
        self.steps = 0

    def _ready_offsets(self) -> list[int]:
        """For each layer index i: how many leading flat-gradient elements are final once layer i's backward ran."""
        sizes = [sum(p.size for p in layer.parameters()) for layer in self.model.layers]
        return [sum(sizes[i:]) for i in range(len(sizes))]

    def _reduce_bucket(self, start: int, stop: int) -> None:
        grads = self.model.flat_grads
        # Averaged values are checked inside the reduction, by the rank that finishes them and while they
        # are in cache; train_step combines the ranks' verdicts. (Which ranks' local gradients were
        # non-finite is found only when needed, by replaying the step.)
        if self.shard is None:
            self.compressor.reduce_mean(self.comm, grads, start, stop, self.algorithm, self._inspect)
        else:  # only the owned chunk ends averaged
            a, b = self.comm.reduce_scatter(grads[start:stop], op="mean", algorithm=self.shard, inspect=self._inspect)
            self._owned.append((start + a, start + b))

    def _inspect(self, averaged: Any) -> None:
        self._averaged_finite = self._averaged_finite and _finite(averaged)

    def _submit_ready(self, layer: int) -> None:
        ready = self._ready[layer]
        while self._next_bucket < len(self.buckets) and self.buckets[self._next_bucket][1] <= ready:
            self._worker.jobs.put(self.buckets[self._next_bucket])
            self._next_bucket += 1

    def pieces(self, x: Any) -> int:
        """How many micro-batches a step on batch ``x`` runs: at least ``accumulate``, and enough that
        none exceeds the micro-batch size."""
        size = self.micro_batch
        if not size:
            shape = tuple(x.shape[1:])
            if shape not in self._auto_micro:
                per_sample = self.model.output_bytes_per_sample(x[:1]) if isinstance(self.model, Sequential) else 0
                self._auto_micro[shape] = max(1, MICRO_BATCH_BYTES // per_sample) if per_sample else len(x)
            size = self._auto_micro[shape]
        return min(len(x), max(self.accumulate, -(-len(x) // size)))

    def broadcast_parameters(self, root: int = 0) -> None:
        """Copy ``root``'s parameters to every rank."""
        self.comm.broadcast(self.model.flat_params, root=root)

    def train_step(self, x: Any, y: Any) -> tuple[float, int]:
        """One synchronous step on this rank's batch; returns (local mean loss, local correct count).

        The batch is cut into ``pieces(x)`` micro-batches whose gradients are
        summed with weights len(micro)/len(batch): the same gradient as the
        whole batch at once, up to round-off.
        """
        if len(y) < self.accumulate:
            raise ValueError(f"a batch of {len(y)} cannot be cut into {self.accumulate} micro-batches")
        clock = time.perf_counter
        self._averaged_finite = True
        self._owned.clear()
        streams = [layer.rng.bit_generator.state for layer in self._dropouts]  # to replay this step's masks
        loss, correct, forward, backward = self._local_gradients(x, y, overlap=self._ready is not None)
        t2 = clock()
        if self._worker is not None:
            for bucket in self.buckets[self._next_bucket if self._ready is not None else 0 :]:
                self._worker.jobs.put(bucket)
            self._worker.wait()
        else:
            for bucket in self.buckets:
                self._reduce_bucket(*bucket)
        # Each rank checked the values it finished: agree on one verdict.
        verdict = self.comm.allreduce(np.array([self._averaged_finite], np.int64), op="min")
        self._averaged_finite = bool(verdict[0])
        t3 = clock()
        if self._averaged_finite:
            self.optimizer.step(self._owned if self.shard is not None else None)
        else:
            self._nonfinite(x, y, streams)
        t4 = clock()
        if self.shard is not None and self._averaged_finite:
            self._share_owned(self.model.flat_params)
        self._record(forward, backward, t3 - t2 + clock() - t4, t4 - t3)
        return loss, correct

    def _local_gradients(self, x: Any, y: Any, overlap: bool) -> tuple[float, int, float, float]:
        """Forward and backward over the micro-batches into the zeroed flat gradients; with ``overlap``
        the last backward hands each finished bucket to the worker. Returns (loss, correct, seconds of
        forward, seconds of backward)."""
        model, clock, pieces = self.model, time.perf_counter, self.pieces(x)
        model.train()
        model.zero_grad(lazy=True)  # the first backward writes the gradients
        loss, correct, forward, backward = 0.0, 0, 0.0, 0.0
        bounds = [len(y) * i // pieces for i in range(pieces + 1)]
        for i in range(pieces):
            xm, ym = x[bounds[i] : bounds[i + 1]], y[bounds[i] : bounds[i + 1]]
            t0 = clock()
            logits = model.forward(xm)
            weight = len(ym) / len(y)
            loss += weight * self.loss_fn.forward(logits, ym)
            correct += int((logits.argmax(axis=1) == ym).sum())
            grad = self.loss_fn.backward()
            if pieces > 1:
                grad *= weight
            t1 = clock()
            hooked = overlap and i == pieces - 1
            if hooked:
                self._next_bucket = 0
                model.after_backward = self._submit_ready
            try:
                model.backward(grad)
                if i == 0:  # a layer whose backward did not run (a custom model) still holds old gradients
                    model.settle_grads()
            finally:
                if hooked:
                    model.after_backward = None
            backend.synchronize(model.xp)
            forward, backward = forward + t1 - t0, backward + clock() - t1
        return loss, correct, forward, backward

    def consolidate_optimizer_state(self) -> None:
        """Make every rank's optimizer state whole (collective; a no-op unless sharded), e.g. for a checkpoint."""
        if self.shard is None:
            return
        for state in self.optimizer.state_dict().values():
            if getattr(state, "ndim", 0):
                self._share_owned(state)

    def _share_owned(self, buffer: Any) -> None:
        """All-gather ``buffer`` bucket by bucket: every rank's owned chunks reach every rank."""
        for start, stop in self.buckets:
            self.comm.allgather(buffer[start:stop], algorithm=self.shard)

    def _nonfinite(self, x: Any, y: Any, streams: list[dict]) -> None:
        step = self.steps + 1
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            return
        # The all-reduce consumed the local gradients: replay this step's forward and backward (same
        # parameters, data and dropout masks, so the same local gradients) to name the ranks they came from.
        for layer, state in zip(self._dropouts, streams, strict=True):
            layer.rng.bit_generator.state = state
        self._local_gradients(x, y, overlap=False)
        local = self.comm.allgather_object(_finite(self.model.flat_grads))
        culprits = [rank for rank, ok in enumerate(local) if not ok]
        raise mark_all_ranks(
            FloatingPointError(
                f"step {step}: non-finite gradients after the all-reduce; local gradients were non-finite on "
                f"ranks {culprits} (use --nonfinite skip to skip such steps)"
            )
        )

    def _record(self, *seconds: float) -> None:
        for phase, value in zip(PHASES, seconds, strict=True):
            self.timings[phase] += value
        self.steps += 1

    def parameter_digest(self) -> str:
        """sha256 of this rank's parameter bytes."""
        return hashlib.sha256(backend.to_host(self.model.flat_params).tobytes()).hexdigest()

    def check_replicas(self) -> None:
        """Compare parameter digests across ranks (collective).

        Raises:
            RuntimeError: on every rank, naming the ranks whose parameters differ from rank 0's.
        """
        digests = self.comm.allgather_object(self.parameter_digest())
        differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise mark_all_ranks(
                RuntimeError(f"replicas diverged: ranks {differ} hold parameters different from rank 0's")
            )
