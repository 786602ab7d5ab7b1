"""The training loop: epochs, evaluation, metrics, progress, checkpoints and the final save.

Strategy-agnostic: it reads batches for the data shard the strategy names,
and calls the strategy's ``start``, ``step``, ``sync``, ``check``,
``evaluate``, ``state_dict``, ``export`` and ``close`` (see ``parallel.base``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from mpitrain import backend, checkpoint, faults, inference, report, resume
from mpitrain.comm import Communicator, raised_on_all_ranks
from mpitrain.data import Dataset, Scaling, ShardedBatches, eval_shard, load_dataset
from mpitrain.nn import SoftmaxCrossEntropy, build_model
from mpitrain.optim import LRSchedule, build_optimizer
from mpitrain.parallel import Job, Strategy, Sums, Totals, options_for, strategy_class
from mpitrain.timeline import SPANS, clock

EVAL_BATCH = 1024
CLIPPED = ("allreduce", "pipeline")  # strategies whose one update per step uses the averaged gradients
# Where the current run stands, for the command line's Ctrl-C message: the last step begun, the newest
# checkpoint written.
STATUS: dict[str, Any] = {"step": 0, "checkpoint": None}
SCALE_LR_WARMUP_EPOCHS = 5  # Goyal et al. 2017: a gradual warm-up over the first 5 epochs


@dataclass
class TrainConfig:
    """Everything a training run depends on (the CLI's ``train`` options); ``options`` holds the
    strategy's own (its ``Options`` dataclass; None: its defaults)."""

    model: str = "mlp"
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    dataset: str = "digits"
    synthetic_samples: int = 4096
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    scale_lr: bool = False
    clip_grad_norm: float = 0.0
    standardize: bool = False
    step_size: int = 0
    gamma: float = 0.1
    seed: int = 0
    dtype: str = "float32"
    backend: str = "numpy"
    strategy: str = "allreduce"
    options: Any = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep: int = 3
    resume: str | None = None
    init_from: str | None = None
    max_steps: int | None = None
    metrics: str | None = None
    save: str | None = None
    timeline: str | None = None
    timeline_steps: str = "0:100"
    breakdown: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.options is None:
            self.options = options_for(self.strategy, {})

    def as_json(self) -> dict[str, Any]:
        """Every field, the strategy's options as a table of their own (checkpoints, --metrics, --save)."""
        return {**asdict(self), "options": asdict(self.options)}

    def scaled_lr(self, shards: int, steps_per_epoch: int) -> tuple[float, int]:
        """(learning rate, warm-up steps) of the run: with ``--scale-lr``, lr x the data-parallel ranks
        (``shards``), warmed up linearly over the first 5 epochs unless ``--warmup-steps`` is given."""
        if not self.scale_lr:
            return self.lr, self.warmup_steps
        warmup = self.warmup_steps or min(SCALE_LR_WARMUP_EPOCHS, max(1, self.epochs - 1)) * steps_per_epoch
        return self.lr * shards, warmup


def train_config(**values: Any) -> TrainConfig:
    """A TrainConfig from flat keyword values: the loop's fields, the rest the strategy's options.

    Raises:
        TypeError: a name that is neither (the message names it).
    """
    own = {f.name for f in dataclasses.fields(TrainConfig)} - {"options"}
    strategy = values.get("strategy", TrainConfig.strategy)
    known = {f.name for f in dataclasses.fields(strategy_class(strategy).Options)}
    unknown = sorted(set(values) - own - known)
    if unknown:
        raise TypeError(f"unknown training options {unknown} (strategy {strategy!r})")
    rest = {k: v for k, v in values.items() if k not in own}
    return TrainConfig(**{k: v for k, v in values.items() if k in own}, options=options_for(strategy, rest))


def evaluate(strategy: Strategy, data: Dataset, comm: Communicator) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole test set, each sample evaluated on exactly one data shard.

    Every rank runs the same number of evaluation calls (ranks without a shard, or with a shorter
    part, pass empty batches), so a strategy may communicate inside ``evaluate``.
    """
    shard, xp = strategy.shard, strategy.job.xp
    n = len(data.x_test)
    shards = type(strategy).data_shards(strategy.options, comm.size)  # the same on every rank
    part = eval_shard(n, shard[0], shard[1]) if shard is not None else slice(0, 0)
    x_all, y_all = data.x_test[part], data.y_test[part]
    longest = -(-n // shards)
    totals = np.zeros(3)  # loss sum, correct, count
    for start in range(0, max(longest, 1), EVAL_BATCH):
        x = backend.to_device(x_all[start : start + EVAL_BATCH].astype(strategy.job.dtype), xp)
        y = backend.to_device(y_all[start : start + EVAL_BATCH], xp)
        totals += strategy.evaluate(x, y)
    comm.allreduce(totals, op="sum")
    return totals[0] / totals[2], totals[1] / totals[2]


@dataclass
class TrainResult:
    """What a run leaves: the strategy (closed; its model is still readable) and one record per epoch."""

    strategy: Strategy
    history: list[dict[str, Any]]

    @property
    def model(self) -> Any:
        """The trained model of a strategy that keeps one per rank (data parallelism: the whole model)."""
        return self.strategy.model


def _job(config: TrainConfig, data: Dataset, comm: Communicator, total_steps: int, shards: int = 1) -> Job:
    xp = backend.get_array_module(config.backend)
    lr, warmup = config.scaled_lr(shards, total_steps // max(1, config.epochs))
    schedule = LRSchedule(
        lr,
        kind=config.schedule,
        warmup_steps=warmup,
        total_steps=total_steps,
        step_size=config.step_size,
        gamma=config.gamma,
    )
    dropout_seed = int(np.random.SeedSequence([config.seed, comm.rank]).generate_state(1)[0])  # its own masks

    def model() -> Any:
        return build_model(
            config.model,
            data.sample_shape,
            data.num_classes,
            config.hidden,
            dropout=config.dropout,
            dropout_seed=dropout_seed,
        )

    def optimizer(params: Any, grads: Any, allocate: Any) -> Any:
        return build_optimizer(
            config.optimizer,
            params,
            grads,
            schedule,
            momentum=config.momentum if config.optimizer == "sgd" else 0.0,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
            allocate=allocate,
        )

    return Job(
        model,
        optimizer,
        SoftmaxCrossEntropy,
        config.seed,
        np.dtype(config.dtype),
        xp,
        sample_shape=tuple(data.sample_shape),
        batch_size=config.batch_size,
        clip_grad_norm=config.clip_grad_norm,
    )


def train(config: TrainConfig, comm: Communicator) -> TrainResult:
    """Train with ``config.strategy`` over ``comm``; every rank returns (its part of) the result.

    Setup errors on any rank (bad data file, bad sizes, an output that
    cannot be written) are raised on every rank, before any training.
    """
    cls = strategy_class(config.strategy)
    with comm.agreement():
        cls.validate(config.options, config.batch_size, comm.size)
        if config.clip_grad_norm and config.strategy not in CLIPPED:
            raise ValueError(
                f"--clip-grad-norm clips the averaged gradients of a synchronous step: --strategy "
                f"{' or '.join(CLIPPED)}, not {config.strategy} (its updates are not one averaged step on every rank)"
            )
        report.check_outputs(config, leader=comm.rank == 0)
        data = load_dataset(config.dataset, seed=config.seed, synthetic_samples=config.synthetic_samples)
        scaling = Scaling.of(data.x_train) if config.standardize else None
        data = scaling.dataset(data) if scaling is not None else data
        shards = cls.data_shards(config.options, comm.size)
        steps_per_epoch = ShardedBatches(len(data.x_train), config.batch_size, 0, shards, config.seed).steps_per_epoch
        job = _job(config, data, comm, config.epochs * steps_per_epoch, shards)
    strategy = cls(job, comm, config.options)
    try:
        history = _run(config, comm, strategy, data, steps_per_epoch, scaling)
    except BaseException as exc:
        if raised_on_all_ranks(exc):  # every rank stopped at the same point: closing is collective
            strategy.close()
        raise  # else other ranks may be inside a collective: leave the cleanup to the abort
    strategy.close()
    return TrainResult(strategy, history)


def _run(
    config: TrainConfig, comm: Communicator, strategy: Strategy, data: Dataset, steps_per_epoch: int,
    scaling: Scaling | None = None,
) -> list:  # fmt: skip
    leader = comm.rank == 0
    STATUS.update(step=0, checkpoint=None)
    if config.init_from and not config.resume:
        with comm.agreement():  # a missing or foreign file is one error, on every rank
            strategy.load_parameters(checkpoint.read_parameters(config.init_from, strategy.job.build_model()))
    strategy.start()
    run_id = comm.bcast_object(uuid.uuid4().hex)
    position = resume.Position()
    if config.resume:
        position, run_id = resume.restore(config, comm, strategy, steps_per_epoch)
    elif config.checkpoint_dir:
        resume.refuse_foreign_checkpoints(config, comm)
    shard = strategy.shard
    if leader:
        report.header(config, comm, strategy, data, steps_per_epoch)
    batches = ShardedBatches(len(data.x_train), config.batch_size, *shard, config.seed) if shard else None
    dtype, xp = strategy.job.dtype, strategy.job.xp
    # The batch buffers are filled in place every step (no allocation per step).
    with comm.agreement():  # a batch too large to allocate is one error, not a traceback per rank
        x_train = data.x_train.astype(dtype, copy=False)
        x_batch = np.empty((config.batch_size, *data.sample_shape), dtype)
        y_batch = np.empty(config.batch_size, data.y_train.dtype)
    with report.output(comm, "--metrics", config.metrics):
        metrics_file = report.open_metrics(config) if leader else None
    window = report.start_timeline(config, comm)
    history: list[dict[str, Any]] = []
    run_began, stopped_at = time.perf_counter(), None  # stopped_at: (step, epoch) where --max-steps cut an epoch
    if position.epoch >= config.epochs and leader:
        print(
            f"# the checkpoint is at epoch {position.epoch}, already at or past --epochs {config.epochs}: "
            "nothing left to train (raise --epochs to go on)",
            flush=True,
        )
    for epoch in range(position.epoch, config.epochs):
        start = time.perf_counter()
        traffic = [0, 0]  # bytes this rank sent inside its steps, its steps (this epoch)
        SPANS.take()  # the phases of this epoch's steps only
        first = position.step_in_epoch if epoch == position.epoch else 0
        totals = Totals(position.totals if epoch == position.epoch else np.zeros(3))  # loss sum, correct, count
        bar = tqdm(
            total=steps_per_epoch,
            initial=first,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not (leader and config.progress and sys.stderr.isatty()),  # a log file gets no bar fragments
            leave=False,
            file=sys.stderr,
        )
        end = steps_per_epoch
        if config.max_steps is not None:
            end = min(end, first + max(0, config.max_steps - position.global_step))
        step_in_epoch = first
        while step_in_epoch < end:  # segments of rounds that end at a checkpoint or the epoch's end
            count = _rounds_to_take(config, position.global_step, end - step_in_epoch)
            for taken, idx in enumerate(strategy.batches(batches, epoch, step_in_epoch, count), start=1):
                STATUS["step"] = step = position.global_step + taken  # this rank's own count when asynchronous
                SPANS.recording = window is not None and window[0] < step <= window[1]
                with comm.watch(lambda: f"training step {step}"):  # noqa: B023 - formatted while the step runs
                    x = y = None
                    if idx is not None:
                        read = clock()
                        np.take(x_train, idx, axis=0, out=x_batch)
                        np.take(data.y_train, idx, out=y_batch)
                        faults.before_step(comm.rank, step, x_batch)
                        x, y = backend.to_device(x_batch, xp), backend.to_device(y_batch, xp)
                        SPANS.add("data", read)
                    else:
                        faults.before_step(comm.rank, step, None)
                    began, sent = time.perf_counter(), comm.sent_bytes
                    sums = strategy.step(x, y)
                    traffic[0] += comm.sent_bytes - sent
                faults.after_step(comm.rank, time.perf_counter() - began, idx is not None)
                totals.add(sums)
                traffic[1] += 1
                bar.update()
            position.global_step += count
            step_in_epoch += count
            bar.n = step_in_epoch
            bar.refresh()
            every = config.checkpoint_every if config.checkpoint_dir else 0
            if every and position.global_step % every == 0 and step_in_epoch < steps_per_epoch:
                at = resume.Position(epoch, step_in_epoch, position.global_step, totals.read())
                STATUS["checkpoint"] = resume.save(config, comm, strategy, at, run_id)
        bar.close()
        if step_in_epoch < steps_per_epoch:
            stopped_at = (position.global_step, epoch + 1)
            break  # stopped by max_steps inside the epoch: no evaluation of a partial epoch
        train_time = time.perf_counter() - start
        phases = SPANS.take()
        totals = totals.read()
        comm.allreduce(totals, op="sum")
        strategy.sync()
        strategy.check()
        began = clock()
        test_loss, test_acc = evaluate(strategy, data, comm)
        SPANS.add("evaluate", began)
        times = comm.allreduce(np.array([train_time, time.perf_counter() - start]), op="max")
        record = {
            "epoch": epoch + 1,
            "loss": totals[0] / totals[2],
            "train_acc": totals[1] / totals[2],
            "test_loss": test_loss,
            "test_acc": test_acc,
            "samples_per_s": totals[2] / times[0],
            "sent_per_step": traffic[0] / max(1, traffic[1]),  # this rank's (rank 0's in the report)
            "time_s": times[1],
            **{f"{name}_s": phases.get(name, 0.0) for name in report.PHASES},  # this rank's (rank 0's in the report)
            **strategy.stats,
        }
        history.append(record)
        with report.output(comm, "--metrics", config.metrics):
            if leader:
                report.epoch_line(record, metrics_file, config.breakdown)
        if config.checkpoint_dir:
            at = resume.Position(epoch + 1, 0, position.global_step, np.zeros(3))
            STATUS["checkpoint"] = resume.save(config, comm, strategy, at, run_id)
        if config.max_steps is not None and position.global_step >= config.max_steps:
            break
    if metrics_file is not None:
        metrics_file.close()
    if window is not None:
        report.write_timeline(config, comm)
    if config.save:
        strategy.sync()
        arrays = strategy.export()
        with report.output(comm, "--save", config.save):
            if leader:  # the architecture too, so evaluate / predict need no model flags
                spec = (config.model, config.hidden, config.dropout, data.sample_shape, data.num_classes, config.dtype)
                entries = inference.architecture_entry(*spec, config.as_json(), scaling)
                checkpoint.atomic_save_npz(config.save, arrays | entries)
    if leader:
        report.summary(config, history, time.perf_counter() - run_began, stopped_at, STATUS["checkpoint"])
    return history


def _rounds_to_take(config: TrainConfig, global_step: int, left: int) -> int:
    """Rounds of the next segment: up to the next checkpoint step, at most the ``left`` of this epoch."""
    every = config.checkpoint_every if config.checkpoint_dir else 0
    return min(left, every - global_step % every) if every else left


__all__ = ["Sums", "TrainConfig", "TrainResult", "evaluate", "train", "train_config"]
