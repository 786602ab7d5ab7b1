"""Pipeline model parallelism (``--strategy pipeline``), alone or with data parallelism (P x D hybrid).

The world of P x D ranks is a grid (``Communicator.grid``): rank r is stage
r % P of pipeline r // P. A ``Sequential`` model is cut into P * V
consecutive stages (``--split``, or balanced by parameters plus activation
elements per sample); rank s of a pipeline holds stages s, s + P, ... (V model
chunks; V > 1 only with the interleaved schedule) in one pair of flat
buffers. Each step cuts the batch into M micro-batches exactly as one process
does with ``--accumulate M`` (``LocalStep``) and runs this rank's actions of a
schedule that ``schedules.build`` generated and proved sound before anything
ran. Activations go forward and their gradients backward as checked, watched
point-to-point messages between preallocated contiguous buffers, one per
(micro-batch, stage) and direction; every receive is posted when the step
starts and every send is an ``isend`` completed when it ends. Only stage 0
reads input batches; the last stage gets the labels, computes the loss and
the accuracy counts, and returns the step's sums.

The layers keep what their backward needs in their own workspaces, so a
stage with k micro-batches in flight runs them on k copies of its layers
(slots) that share its parameters, gradients and random streams; k is the
schedule's peak of live activations for that stage, counted again while the
steps run (``stats["peak_live"]``). Gradients accumulate over the M
micro-batches in micro-batch order. With D > 1 each stage's gradients are
averaged over its D replicas by the ``GradientReducer`` (buckets fired as the
last micro-batch's backward finishes each layer, so the all-reduce overlaps
the rest of the backward), then every rank steps its own optimizer.

Checkpoints and ``--save`` hold the whole model in the layout of one
process: the stages' parameters and optimizer state gathered on rank 0, so a
data-parallel checkpoint's parameters load into a pipeline (``--init-from``),
a pipeline's saved model loads into any other run, and a resume may change P
or D. Deterministic: the same seed, P, D, M and schedule give the same bits.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpitrain import backend
from mpitrain.cli_types import positive_int
from mpitrain.comm import Communicator, mark_all_ranks
from mpitrain.nn import Sequential
from mpitrain.optim import clip_grad_norm
from mpitrain.parallel.base import (
    Job,
    State,
    Strategy,
    Sums,
    from_json_array,
    json_array,
    load_optimizer,
    register,
    release_model,
)
from mpitrain.parallel.reducer import GradientReducer
from mpitrain.parallel.replicas import check_replicas
from mpitrain.parallel.schedules import (
    BACKWARD,
    FORWARD,
    RECV_ACT,
    RECV_GRAD,
    SCHEDULES,
    SEND_ACT,
    build,
    owner,
    simulate,
)
from mpitrain.parallel.stages import Chunks, Slot, balanced_split, check_split, layer_list, layer_span, profile, twin
from mpitrain.timeline import SPANS

TAG_BASE = 100  # message tags: TAG_BASE + ((direction * stages) + stage) * micro-batches + micro-batch
GATHER_TAG = 31
EVAL_TAG, EVAL_ROWS_TAG = 32, 33
MAX_TAG = 32767  # the largest tag every MPI library accepts


@dataclass
class PipelineOptions:
    """Options of ``--strategy pipeline``."""

    pipeline_stages: int = 2
    micro_batches: int = 4
    schedule_pp: str = "1f1b"
    virtual_stages: int = 1
    split: tuple[int, ...] = ()


@register
class Pipeline(Strategy):
    """Pipeline stages across ranks, optionally replicated for data parallelism (see the module docstring)."""

    name = "pipeline"
    Options = PipelineOptions

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        d = PipelineOptions()
        group.add_argument(
            "--pipeline-stages", type=positive_int, default=d.pipeline_stages, help="ranks per pipeline (P)"
        )
        group.add_argument("--micro-batches", type=positive_int, default=d.micro_batches, help="per step (M)")
        group.add_argument("--schedule-pp", choices=SCHEDULES, default=d.schedule_pp, help="pipeline schedule")
        group.add_argument(
            "--virtual-stages", type=positive_int, default=d.virtual_stages, help="model chunks per rank (interleaved)"
        )
        group.add_argument("--split", type=layer_list, default=d.split, help="layer indices where stages begin")

    @classmethod
    def validate(cls, options: PipelineOptions, batch_size: int, world_size: int) -> None:
        p, m, v = options.pipeline_stages, options.micro_batches, options.virtual_stages
        if p > world_size:
            raise ValueError(f"--pipeline-stages {p} exceeds the {world_size} ranks")
        if world_size % p:
            raise ValueError(
                f"the world of {world_size} ranks is not divisible by --pipeline-stages {p} "
                f"(a hybrid runs {world_size} // P pipelines of P stages)"
            )
        if m > batch_size:
            raise ValueError(f"--micro-batches {m} exceeds the per-pipeline batch size {batch_size}")
        if options.schedule_pp not in SCHEDULES:
            raise ValueError(f"unknown --schedule-pp {options.schedule_pp!r}; expected one of {', '.join(SCHEDULES)}")
        if v > 1 and options.schedule_pp != "interleaved":
            raise ValueError(f"--virtual-stages {v} needs --schedule-pp interleaved")
        if v > 1 and p < 2:
            raise ValueError("--schedule-pp interleaved needs --pipeline-stages of at least 2")
        if TAG_BASE + 2 * p * v * m > MAX_TAG:
            raise ValueError(f"{p * v} stages x --micro-batches {m} need more message tags than MPI guarantees")

    @classmethod
    def data_shards(cls, options: PipelineOptions, world_size: int) -> int:
        return world_size // options.pipeline_stages

    def __init__(self, job: Job, comm: Communicator, options: PipelineOptions) -> None:
        super().__init__(job, comm, options)
        P, V, M = options.pipeline_stages, options.virtual_stages, options.micro_batches
        self.P, self.V, self.M, self.last = P, V, M, P * V - 1
        whole = job.build_model()
        try:  # the same on every rank, before any collective: one message, printed once
            self.validate(options, job.batch_size, comm.size)
            if job.batch_size < 1 or not job.sample_shape:
                raise ValueError("a pipeline needs the job's batch_size and sample_shape to size its messages")
            if not isinstance(whole, Sequential):
                raise TypeError(f"a pipeline cuts a Sequential model into stages, not a {type(whole).__name__}")
            layers = len(whole.layers)
            if layers < P * V:
                raise ValueError(
                    f"--pipeline-stages {P} x --virtual-stages {V} = {P * V} stages exceed the model's {layers} layers"
                )
            if options.split:
                check_split(options.split, layers, P * V)
        except (ValueError, TypeError) as exc:
            raise mark_all_ranks(exc) from None
        shapes, costs = profile(job)
        self.bounds = [0, *(options.split or balanced_split(costs, P * V)), layers]
        self.row, self.column = comm.grid(comm.size // P, P)  # this pipeline's stages; this stage's replicas
        self.rank = self.row.rank  # the stage rank in the pipeline
        self.stages = list(range(self.rank, P * V, P))  # this rank's virtual stages, in chunk order
        chunks = [job.build_model().stage(self.bounds[k], self.bounds[k + 1]) for k in self.stages]
        for k, chunk in zip(self.stages, chunks, strict=True):
            chunk.need_input_grad = k > 0  # stage 0's input is data
        allocate = self.column.allocate if job.xp is np else None  # node-shared memory for the all-reduce
        self.model = Chunks(chunks).init_params(seed=job.seed, xp=job.xp, dtype=job.dtype, allocate=allocate)
        self.optimizer = job.build_optimizer(self.model.flat_params, self.model.flat_grads, allocate)
        self.schedule = build(options.schedule_pp, P, M, V)
        self.actions = self.schedule[self.rank]
        peaks = simulate(self.schedule, M, V).peak_live
        self.slots = {
            k: [Slot(chunk, job.loss())]
            + [
                Slot(twin(job.build_model().stage(self.bounds[k], self.bounds[k + 1]), chunk), job.loss())
                for _ in range(peaks[k] - 1)
            ]
            for k, chunk in zip(self.stages, chunks, strict=True)
        }
        self.chunk = dict(zip(self.stages, chunks, strict=True))
        B = job.batch_size
        self.rows = [(B * i // M, B * (i + 1) // M) for i in range(M)]  # LocalStep's micro-batch bounds
        self.shape_in = {
            k: shapes[self.bounds[k] - 1] if self.bounds[k] else tuple(job.sample_shape) for k in self.stages
        }
        self.shape_out = {k: shapes[self.bounds[k + 1] - 1] for k in self.stages}
        self._buffers = self._message_buffers()
        self.reducer = GradientReducer(self.column, self.model.flat_grads, self.model.layout)
        self._final_after = self._ready_counts()
        self._last_backward = {
            k: max(i for i, a in enumerate(self.actions) if a.op == BACKWARD and a.stage == k) for k in self.stages
        }
        self.whole_layout = whole.flat_layout()
        self.whole_shapes = {name: p.shape for name, p in whole.named_parameters()}
        self.whole_size = self.whole_layout[-1][2] if self.whole_layout else 0
        self._whole_spans = [
            layer_span(self.whole_layout, a, b) for a, b in itertools.pairwise(self.bounds)
        ]  # each stage's part of the whole model's flat buffers
        self._ranges = self._whole_ranges()
        self.steps = 0
        self.peak_live = dict.fromkeys(self.stages, 0)  # micro-batches held at once, counted while running
        self.peak_live_rank = 0  # the same over all of this rank's chunks together
        self.grad_norm = 0.0  # the last step's gradient norm before clipping (--clip-grad-norm)
        self.compute_s = 0.0  # seconds of forward and backward (the rest of a step is messages and bubble)
        self.activation_bytes = dict.fromkeys(self.stages, 0)  # the layer outputs they held, at the peak
        itemsize = np.dtype(job.dtype).itemsize
        self._bytes_per_sample = {
            k: itemsize * sum(math.prod(shapes[i]) for i in range(self.bounds[k], self.bounds[k + 1]))
            for k in self.stages
        }
        self._eval_buffers: dict[tuple[int, int], Any] = {}

    def _tag(self, kind: str, micro: int, stage: int) -> int:
        return TAG_BASE + ((0 if kind == "act" else 1) * (self.last + 1) + stage) * self.M + micro

    def _message_buffers(self) -> dict[tuple[str, str, int, int], Any]:
        """One contiguous buffer per message this rank sends or receives in a step, keyed by
        (direction "in"/"out", kind "act"/"grad", micro-batch, stage of the message)."""
        xp, dtype, buffers = self.job.xp, self.job.dtype, {}
        for a in self.actions:
            if a.op in (FORWARD, BACKWARD):
                continue
            lo, hi = self.rows[a.micro]
            kind = "act" if a.op in (SEND_ACT, RECV_ACT) else "grad"
            if a.op in (RECV_ACT, RECV_GRAD):
                shape = self.shape_in[a.stage] if kind == "act" else self.shape_out[a.stage]
                buffers["in", kind, a.micro, a.stage] = xp.empty((hi - lo, *shape), dtype)
            else:  # the message's stage is the receiver's: an activation into k + 1 is stage k's output
                source = a.stage - 1 if kind == "act" else a.stage + 1
                shape = self.shape_out[source] if kind == "act" else self.shape_in[source]
                buffers["out", kind, a.micro, a.stage] = xp.empty((hi - lo, *shape), dtype)
        return buffers

    def _ready_counts(self) -> dict[int, int]:
        """Global layer index -> how many leading flat-gradient elements are final once the last
        micro-batch's backward has run that layer (later layers, also of later chunks, come first)."""
        counts: dict[int, int] = {}
        for name, _, stop in self.model.layout:
            layer = int(name.split(".", 1)[0])
            counts[layer] = max(counts.get(layer, 0), stop)
        done, result = 0, {}
        for layer in range(self.bounds[-1] - 1, -1, -1):
            done = max(done, counts.get(layer, 0))
            result[layer] = done
        return result

    def _whole_ranges(self) -> list[tuple[int, int, int, int]]:
        """(start, stop) in this rank's flat buffers and (start, stop) in the whole model's, per chunk with
        parameters: each chunk is contiguous in both (reverse layer order)."""
        ranges = []
        for k in self.stages:
            mine = layer_span(self.model.layout, self.bounds[k], self.bounds[k + 1])
            if mine is not None:
                ranges.append((*mine, *self._whole_spans[k]))
        return ranges

    @property
    def shard(self) -> tuple[int, int] | None:
        """Stage 0 reads the inputs and the last stage the labels of pipeline d's shard."""
        if self.rank == 0 or self.rank == owner(self.last, self.P):
            return self.column.rank, self.column.size
        return None

    def describe(self) -> str:
        stages = ", ".join(f"[{a}, {b})" for a, b in itertools.pairwise(self.bounds))
        chunks = f" x {self.V} chunks per rank" if self.V > 1 else ""
        return (
            f"pipeline: {self.column.size} pipeline(s) x {self.P} stages{chunks}, schedule {self.options.schedule_pp}, "
            f"{self.M} micro-batches per step; stages hold layers {stages}"
        )

    def num_parameters(self) -> int:
        return self.whole_size

    def start(self) -> None:
        """Every replica of a stage starts from its first pipeline's parameters."""
        self.column.broadcast(self.model.flat_params, root=0)

    def step(self, x: Any, y: Any) -> Sums:
        model, xp = self.model, self.job.xp
        for chunk in self.chunk.values():
            if not chunk.training:  # after an evaluation
                chunk.train()
        model.flat_grads.fill(0)
        if x is not None and self.rank == 0 and len(x) != self.job.batch_size:
            raise ValueError(f"a pipeline step takes batches of {self.job.batch_size}, got {len(x)}")
        buffers = self._buffers
        pending = {}
        for a in self.actions:  # every receive posted now, into its own buffer
            if a.op in (RECV_ACT, RECV_GRAD):
                kind = a.op[5:]
                pending[kind, a.micro, a.stage] = self.row.irecv(
                    buffers["in", kind, a.micro, a.stage], a.peer, self._tag(kind, a.micro, a.stage)
                )
        sends, free = [], {k: list(slots) for k, slots in self.slots.items()}
        taken: dict[tuple[int, int], Slot] = {}
        live = dict.fromkeys(self.stages, 0)
        loss, correct, batch, clock = 0.0, 0, self.job.batch_size, time.perf_counter
        self.reducer.begin()
        for index, a in enumerate(self.actions):
            op, m, k = a.op, a.micro, a.stage
            lo, hi = self.rows[m]
            if op in (RECV_ACT, RECV_GRAD):
                began = clock()
                pending[op[5:], m, k].wait()
                SPANS.add("exposed_comm", began, wait=op, micro=m, stage=k)
            elif op == FORWARD:
                began = clock()
                slot = taken[m, k] = free[k].pop()
                out = slot.model.forward(x[lo:hi] if k == 0 else buffers["in", "act", m, k])
                live[k] += 1
                self.peak_live[k] = max(self.peak_live[k], live[k])
                self.peak_live_rank = max(self.peak_live_rank, sum(live.values()))
                if k == self.last:
                    weight = (hi - lo) / batch
                    loss += weight * slot.loss.forward(out, y[lo:hi])
                    correct += int((out.argmax(axis=1) == y[lo:hi]).sum())
                    slot.grad = slot.loss.backward()
                    if self.M > 1:
                        slot.grad *= weight
                else:
                    buffers["out", "act", m, k + 1][...] = out
                backend.synchronize(xp)
                self.compute_s += SPANS.add("forward", began, micro=m, stage=k) - began
            elif op == BACKWARD:
                began = clock()
                slot = taken.pop((m, k))
                grad = slot.grad if k == self.last else buffers["in", "grad", m, k]
                if index == self._last_backward[k] and self.reducer.overlap:  # final layer by layer: overlap
                    first = self.bounds[k]
                    slot.model.after_backward = lambda i, first=first: self.reducer.ready(self._final_after[first + i])
                try:
                    dx = slot.model.backward(grad)
                finally:
                    slot.model.after_backward = None
                if k > 0:
                    buffers["out", "grad", m, k - 1][...] = dx
                live[k] -= 1
                free[k].append(slot)
                backend.synchronize(xp)
                self.compute_s += SPANS.add("backward", began, micro=m, stage=k) - began
            else:
                kind = "act" if op == SEND_ACT else "grad"
                sends.append(self.row.isend(buffers["out", kind, m, k], a.peer, self._tag(kind, m, k)))
        backend.synchronize(xp)
        began = clock()
        for request in sends:
            request.wait()
        SPANS.add("exposed_comm", began, wait="sends")
        finite = self.row.all_true(self.reducer.finish())
        if not finite:
            raise mark_all_ranks(FloatingPointError(f"non-finite gradients in pipeline step {self.steps + 1}"))
        began = clock()
        if self.job.clip_grad_norm:  # the whole model's norm: this stage's squares summed over the pipeline
            total = lambda sq: float(self.row.allreduce(np.array([sq]), algorithm="doubling")[0])  # noqa: E731
            self.grad_norm = clip_grad_norm(self.model.flat_grads, self.job.clip_grad_norm, total=total)
        self.optimizer.step()
        SPANS.add("optimizer", began)
        self.steps += 1
        largest = max(b - a for a, b in self.rows)
        for k in self.stages:
            self.activation_bytes[k] = self.peak_live[k] * self._bytes_per_sample[k] * largest
        if self.rank != owner(self.last, self.P):
            return Sums(0.0, 0, 0)
        return Sums(loss * batch, correct, batch)

    def evaluate(self, x: Any, y: Any) -> Sums:
        """Forward only, stage by stage (a header with the row count, then the activations); the last
        stage returns the sums."""
        xp, row = self.job.xp, self.row
        header = np.zeros(1, np.int64)
        out = None
        for k in range(self.last + 1):
            me, before = owner(k, self.P) == self.rank, owner(k - 1, self.P) if k else -1
            if k > 0 and me:
                row.recv(header, before, EVAL_ROWS_TAG)
                rows = int(header[0])
                inp = self._eval_buffer(k, rows)
                if rows:
                    row.recv(inp, before, EVAL_TAG)
            elif k == 0 and me:
                inp = x
            if me:
                chunk = self.chunk[k]
                chunk.eval()
                out = chunk.forward(inp) if len(inp) else xp.empty((0, *self.shape_out[k]), self.job.dtype)
                if k < self.last:
                    header[0] = len(out)
                    after = owner(k + 1, self.P)
                    row.send(header, after, EVAL_ROWS_TAG)
                    if len(out):
                        row.send(xp.ascontiguousarray(out), after, EVAL_TAG)
        if self.rank != owner(self.last, self.P) or out is None or len(y) == 0:
            return Sums(0.0, 0, 0)
        loss = self.slots[self.last][0].loss.forward(out, y)
        return Sums(loss * len(y), int((out.argmax(axis=1) == y).sum()), len(y))

    def _eval_buffer(self, stage: int, rows: int) -> Any:
        key = (stage, rows)
        if key not in self._eval_buffers:
            self._eval_buffers[key] = self.job.xp.empty((rows, *self.shape_in[stage]), self.job.dtype)
        return self._eval_buffers[key]

    def sync(self) -> None:
        return None  # every step ends consistent: each stage's replicas hold the same bits

    def check(self) -> None:
        check_replicas(self.column, self.model.flat_params, "stage parameters")

    def _gather(self, flats: list[Any]) -> list[np.ndarray] | None:
        """Rank 0 of the world: whole-model host copies of ``flats`` (this rank's flat buffers, the same
        list on every rank), assembled from pipeline 0's stages (collective over pipeline 0)."""
        if self.column.rank != 0:
            return None
        if self.rank != 0:
            for flat in flats:
                for a, b, _, _ in self._ranges:
                    self.row.send(np.ascontiguousarray(backend.to_host(flat[a:b])), 0, GATHER_TAG)
            return None
        wholes = [np.empty(self.whole_size, flat.dtype) for flat in flats]
        for whole, flat in zip(wholes, flats, strict=True):
            for a, b, c, d in self._ranges:
                whole[c:d] = backend.to_host(flat[a:b])
            for k in range(self.P * self.V):  # the other ranks' stages, each rank's in chunk order
                span = self._whole_spans[k]
                if owner(k, self.P) != 0 and span is not None:
                    self.row.recv(whole[span[0] : span[1]], owner(k, self.P), GATHER_TAG)
        return wholes

    def _optimizer_flats(self) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in self.optimizer.state_dict().items() if getattr(v, "ndim", 0)]

    def state_dict(self) -> State:
        """The whole model's parameters and optimizer state in one process's layout (replicated, written
        by rank 0), this rank's random streams (local)."""
        named = self._optimizer_flats()
        wholes = self._gather([self.model.flat_params] + [v for _, v in named])
        replicated = {}
        if wholes is not None:
            replicated = {"params": wholes[0]} | {f"opt/{k}": w for (k, _), w in zip(named, wholes[1:], strict=True)}
        local = {"random_state": json_array(self.model.random_state())}
        meta = {"optimizer_steps": int(self.optimizer.steps), "steps": self.steps}
        return State(replicated, local, meta)

    def load_state_dict(self, state: State, same_world: bool) -> None:
        """Each rank takes its chunks' ranges of the whole model (any P, D and split)."""
        xp = self.job.xp
        self._take(self.model.flat_params, state.replicated["params"])
        arrays = {}
        for key, value in self._optimizer_flats():
            if f"opt/{key}" in state.replicated:
                arrays[f"opt/{key}"] = np.empty(value.shape, value.dtype)
                self._take(arrays[f"opt/{key}"], state.replicated[f"opt/{key}"])
        load_optimizer(self.optimizer, arrays, state.meta["optimizer_steps"], xp)
        self.steps = state.meta["steps"]
        if same_world:
            self.model.set_random_state(from_json_array(state.local["random_state"]))

    def _take(self, flat: Any, whole: np.ndarray) -> None:
        for a, b, c, d in self._ranges:
            flat[a:b] = backend.to_device(np.asarray(whole[c:d]), self.job.xp)

    def load_parameters(self, named: dict[str, np.ndarray]) -> None:
        self.model.load_state_dict(named)

    def export(self) -> dict[str, np.ndarray] | None:
        wholes = self._gather([self.model.flat_params])
        if wholes is None or self.comm.rank != 0:
            return None
        return {n: wholes[0][a:b].reshape(self.whole_shapes[n]).copy() for n, a, b in self.whole_layout}

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "lr": self.optimizer.lr,
            "steps": self.steps,
            "peak_live": [self.peak_live[k] for k in self.stages],
            "peak_live_rank": self.peak_live_rank,
            "compute_s": self.compute_s,
            **({"grad_norm": self.grad_norm} if self.job.clip_grad_norm else {}),
            "activation_bytes": [self.activation_bytes[k] for k in self.stages],
            "sent_bytes": self.sent_bytes,
        }

    def close(self) -> None:
        """End the reducer, move the model out of shared memory, free it and the groups (collective)."""
        self.reducer.close()
        release_model(self.column, self.model, self.optimizer)
        self.column.close()
        self.row.close()
