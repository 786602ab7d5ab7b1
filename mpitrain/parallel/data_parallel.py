"""Synchronous data parallelism (``--strategy allreduce``): one replica per rank, gradients averaged
every step.

``DataParallel`` is the engine: the local step (``LocalStep``), the
bucketed, overlapped gradient average (``GradientReducer``) and one
optimizer update, identical on every rank, so the replicas stay
bit-identical (``replicas.check_replicas`` verifies it). ``AllReduce`` is
the strategy the training loop drives: it builds the model and optimizer
from a ``Job`` and adds start, sync, checkpoint state and the periodic
replica check.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpitrain import backend
from mpitrain.cli_types import compression, nonneg_int, positive_float, positive_int
from mpitrain.comm import Communicator, mark_all_ranks
from mpitrain.comm.communicator import ALLREDUCE_ALGORITHMS
from mpitrain.nn import Module, Sequential
from mpitrain.optim import Optimizer, clip_grad_norm
from mpitrain.parallel.base import (
    Job,
    Loss,
    State,
    Strategy,
    Sums,
    exported,
    from_json_array,
    json_array,
    load_optimizer,
    optimizer_arrays,
    register,
    release_model,
)
from mpitrain.parallel.local_step import LocalStep
from mpitrain.parallel.reducer import DEFAULT_BUCKET_BYTES, GradientReducer, finite
from mpitrain.parallel.replicas import check_replicas
from mpitrain.timeline import SPANS

PHASES = ("forward", "backward", "allreduce_wait", "optimizer")
NONFINITE = ("abort", "skip")


class DataParallel:
    """Wraps a model and its optimizer so every rank applies the same averaged update.

    Each step: forward and backward on this rank's batch (``LocalStep``),
    the mean of the flat gradient buffer over the ranks bucket by bucket
    (``GradientReducer``), then one optimizer update of the flat parameter
    buffer. Every rank starts from rank 0's parameters (``broadcast_parameters``)
    and applies bit-identical gradients, so the replicas stay bit-identical.

    Args:
        model: a model whose ``init_params`` has run.
        optimizer: an optimizer over ``model.flat_params`` / ``model.flat_grads``.
        comm: the communicator of the data-parallel group.
        loss: the loss object.
        algorithm, bucket_bytes, overlap, compression: see ``GradientReducer``
            (overlap needs a Sequential model; others reduce after backward).
        accumulate, micro_batch: see ``LocalStep``.
        nonfinite: what a NaN/Inf in the averaged gradients does: "abort"
            (raise on every rank, naming the step and the ranks whose local
            gradients were non-finite, found by replaying the step) or "skip"
            (no update on any rank, counted in ``skipped_steps``).
        clip_grad_norm: clip the averaged gradients to this global L2 norm
            before each update (0: off); the norm is computed from identical
            values (sharded: each rank's owned chunks, summed), so every rank
            applies the same factor. ``grad_norm`` is the last step's norm.
        shard_optimizer: reduce-scatter each bucket instead of all-reducing
            it, update only the chunks this rank owns, then all-gather the
            updated parameters (as ZeroRedundancyOptimizer, with the state
            kept whole-sized): the results are bit-identical to the unsharded
            path with the same algorithm. Uses node-shared memory when the
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
        *,
        loss: Loss,
        algorithm: str = "auto",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        overlap: bool = True,
        compression: str = "none",
        accumulate: int = 1,
        nonfinite: str = "abort",
        micro_batch: int = 0,
        shard_optimizer: bool = False,
        clip_grad_norm: float = 0.0,
    ) -> None:
        if optimizer.params is not model.flat_params or optimizer.grads is not model.flat_grads:
            raise ValueError("the optimizer must update the model's own flat_params and flat_grads")
        if nonfinite not in NONFINITE:
            raise ValueError(f"unknown nonfinite policy {nonfinite!r}; expected one of {', '.join(NONFINITE)}")
        self.model, self.optimizer, self.comm, self.nonfinite = model, optimizer, comm, nonfinite
        self.local = LocalStep(model, loss, accumulate, micro_batch)
        shard = None
        if shard_optimizer:
            buffers = [model.flat_params, model.flat_grads, *optimizer.state_dict().values()]
            shard = "shm" if all(comm.shares(b) for b in buffers if getattr(b, "ndim", 0)) else "ring"
        self.reducer = GradientReducer(
            comm, model.flat_grads, model.layout, algorithm, bucket_bytes, overlap, compression, shard
        )
        ready = model.ready_offsets() if self.reducer.overlap and isinstance(model, Sequential) else None
        self._after_backward = (lambda layer: self.reducer.ready(ready[layer])) if ready is not None else None
        self.skipped_steps = 0
        self.clip, self.grad_norm = clip_grad_norm, 0.0
        self.timings = dict.fromkeys(PHASES, 0.0)
        self.steps = 0

    @property
    def shard(self) -> str | None:
        """The reduce-scatter algorithm of a sharded optimizer, or None."""
        return self.reducer.shard

    def broadcast_parameters(self, root: int = 0) -> None:
        """Copy ``root``'s parameters to every rank."""
        self.comm.broadcast(self.model.flat_params, root=root)

    def train_step(self, x: Any, y: Any) -> Sums:
        """One synchronous step on this rank's batch; returns this rank's (loss sum, correct, samples)."""
        clock, reducer = time.perf_counter, self.reducer
        reducer.begin()
        sums = self.local.gradients(x, y, self._after_backward)
        t2 = clock()
        averaged_finite = reducer.finish()
        t3 = clock()
        sharded = self.shard is not None
        if averaged_finite:
            if self.clip:
                total = (
                    (lambda sq: float(self.comm.allreduce(np.array([sq]), algorithm="doubling")[0]))
                    if sharded
                    else None
                )
                owned = reducer.owned if sharded else None
                self.grad_norm = clip_grad_norm(self.model.flat_grads, self.clip, owned, total)
            self.optimizer.step(reducer.owned if sharded else None)
        else:
            self._nonfinite(x, y)
        t4 = SPANS.add("optimizer", t3)
        if sharded and averaged_finite:
            reducer.gather(self.model.flat_params)
        self._record(self.local.forward_s, self.local.backward_s, t3 - t2 + clock() - t4, t4 - t3)
        return sums

    def consolidate_optimizer_state(self) -> None:
        """Make every rank's optimizer state whole (collective; a no-op unless sharded), e.g. for a checkpoint."""
        if self.shard is None:
            return
        for state in self.optimizer.state_dict().values():
            if getattr(state, "ndim", 0):
                self.reducer.gather(state)

    def _nonfinite(self, x: Any, y: Any) -> None:
        step = self.steps + 1
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            return
        # The all-reduce consumed the local gradients: replay the step to name the ranks they came from.
        self.local.replay(x, y)
        local = self.comm.allgather_object(finite(self.model.flat_grads))
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

    def check_replicas(self) -> None:
        """Compare parameter digests across ranks (collective); raises on every rank when they differ."""
        check_replicas(self.comm, self.model.flat_params)

    def close(self) -> None:
        """End the reducer's worker thread and release its buffers (collective)."""
        self.reducer.close()


@dataclass
class AllReduceOptions:
    """Options of ``--strategy allreduce`` (see ``DataParallel``)."""

    algorithm: str = "auto"
    bucket_mb: float = DEFAULT_BUCKET_BYTES / 2**20
    overlap: bool = True
    compression: str = "none"
    accumulate: int = 1
    micro_batch: int = 0
    shard_optimizer: bool = False
    nonfinite: str = "abort"
    check_replicas_every: int = 100


@register
class AllReduce(Strategy):
    """Synchronous data parallelism: every rank reads its own shard and holds a whole replica; "consistent"
    means bit-identical parameters on every rank (checked by digest every ``check_replicas_every`` steps
    and at every ``check``)."""

    name = "allreduce"
    Options = AllReduceOptions

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        d = AllReduceOptions()
        group.add_argument("--algorithm", choices=ALLREDUCE_ALGORITHMS, default=d.algorithm, help="gradient all-reduce")
        group.add_argument("--bucket-mb", type=positive_float, default=d.bucket_mb, help="MiB per gradient all-reduce")
        group.add_argument("--no-overlap", dest="overlap", action="store_false", help="all-reduce only after backward")
        group.add_argument(
            "--compression", type=compression, default=d.compression, help="none, fp16, bf16, topk:RATIO"
        )
        group.add_argument("--accumulate", type=positive_int, default=d.accumulate, help="micro-batches per step")
        group.add_argument(
            "--shard-optimizer",
            action="store_true",
            help="reduce-scatter gradients, update own chunks, all-gather parameters",
        )
        group.add_argument(
            "--micro-batch",
            type=nonneg_int,
            default=d.micro_batch,
            help="at most N samples per forward/backward (0: automatic, ~4 MiB of layer outputs)",
        )
        group.add_argument("--nonfinite", choices=NONFINITE, default=d.nonfinite, help="NaN/Inf gradients")
        group.add_argument(
            "--check-replicas-every",
            type=nonneg_int,
            default=d.check_replicas_every,
            help="steps between replica digest checks (and every epoch end; 0: epoch ends only)",
        )

    @classmethod
    def validate(cls, options: AllReduceOptions, batch_size: int, world_size: int) -> None:
        if options.shard_optimizer and options.compression != "none":
            raise ValueError(
                f"--shard-optimizer works with uncompressed gradients, not --compression {options.compression}"
            )
        if options.accumulate > batch_size:
            raise ValueError(f"--accumulate {options.accumulate} exceeds the per-rank batch size {batch_size}")

    def __init__(self, job: Job, comm: Communicator, options: AllReduceOptions) -> None:
        super().__init__(job, comm, options)
        allocate = comm.allocate if job.xp is np else None  # host buffers in node-shared memory
        self.model = job.build_model().init_params(seed=job.seed, xp=job.xp, dtype=job.dtype, allocate=allocate)
        self.optimizer = job.build_optimizer(self.model.flat_params, self.model.flat_grads, allocate)
        self.engine = DataParallel(
            self.model,
            self.optimizer,
            comm,
            loss=job.loss(),
            algorithm=options.algorithm,
            bucket_bytes=max(1, int(options.bucket_mb * 2**20)),
            overlap=options.overlap,
            compression=options.compression,
            accumulate=options.accumulate,
            nonfinite=options.nonfinite,
            micro_batch=options.micro_batch,
            shard_optimizer=options.shard_optimizer,
            clip_grad_norm=job.clip_grad_norm,
        )
        self._steps = 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.comm.rank, self.comm.size

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def start(self) -> None:
        self.engine.broadcast_parameters()

    def step(self, x: Any, y: Any) -> Sums:
        sums = self.engine.train_step(x, y)
        self._steps += 1
        every = self.options.check_replicas_every
        if every and self._steps % every == 0:
            self.engine.check_replicas()
        return sums

    def evaluate(self, x: Any, y: Any) -> Sums:
        return self.engine.local.evaluate(x, y)

    def sync(self) -> None:
        self.engine.consolidate_optimizer_state()

    def check(self) -> None:
        self.engine.check_replicas()

    def state_dict(self) -> State:
        state = self.optimizer.state_dict()
        replicated = {"params": backend.to_host(self.model.flat_params)}
        replicated.update(optimizer_arrays(self.optimizer))
        local = {"random_state": json_array(self.model.random_state())}  # each rank's own dropout streams
        residual = getattr(self.engine.reducer.compressor, "residual", None)  # top-k error feedback
        if residual is not None:
            local["residual"] = backend.to_host(residual)
        meta = {
            "optimizer_steps": int(state["steps"]),
            "skipped_steps": self.engine.skipped_steps,
            "steps": self._steps,
        }
        return State(replicated, local, meta)

    def load_state_dict(self, state: State, same_world: bool) -> None:
        xp = self.job.xp
        self.model.flat_params[...] = backend.to_device(state.replicated["params"], xp)
        load_optimizer(self.optimizer, state.replicated, state.meta["optimizer_steps"], xp)
        self.engine.skipped_steps = state.meta["skipped_steps"]
        self._steps = state.meta["steps"]
        if same_world:
            if "residual" in state.local:
                self.engine.reducer.compressor.residual[...] = state.local["residual"]
            self.model.set_random_state(from_json_array(state.local["random_state"]))

    def load_parameters(self, named: dict[str, np.ndarray]) -> None:
        self.model.load_state_dict(named)

    def export(self) -> dict[str, np.ndarray] | None:
        return exported(self.comm, self.model)

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "lr": self.optimizer.lr,
            "skipped_steps": self.engine.skipped_steps,
            "steps": self._steps,
            "wait_s": self.engine.timings["allreduce_wait"],
            "sent_bytes": self.sent_bytes,
            **({"grad_norm": self.engine.grad_norm} if self.job.clip_grad_norm else {}),
        }

    def close(self) -> None:
        """End the reducer and free the shared memory; the model stays readable (its buffers are
        copied out first), the optimizer does not."""
        self.engine.close()
        release_model(self.comm, self.model, self.optimizer)
