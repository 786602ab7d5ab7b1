"""The training loop: epochs, evaluation, metrics, progress, checkpoints and the final save.

Strategy-agnostic: it reads batches for the data shard the strategy names,
and calls the strategy's ``start``, ``step``, ``sync``, ``check``,
``evaluate``, ``state_dict``, ``export`` and ``close`` (see ``parallel.base``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from mpitrain import backend, checkpoint, faults, inference, log
from mpitrain.comm import Communicator, mark_all_ranks, raised_on_all_ranks
from mpitrain.data import Dataset, Scaling, ShardedBatches, eval_shard, load_dataset, scale_spread
from mpitrain.nn import SoftmaxCrossEntropy, build_model
from mpitrain.optim import LRSchedule, build_optimizer
from mpitrain.parallel import Job, State, Strategy, Sums, Totals, options_for, strategy_class
from mpitrain.timeline import MAX_EVENTS, SPANS, clock, parse_window, trace_document, trace_events

EVAL_BATCH = 1024
SPREAD_WARNING = 1e3  # feature deviations this many times apart: the header suggests --standardize
CLIPPED = ("allreduce", "pipeline")  # strategies whose one update per step uses the averaged gradients
# The per-phase breakdown of each metrics record (seconds of this rank's steps in the epoch).
PHASES = ("data", "forward", "backward", "exposed_comm", "optimizer", "allreduce")
# Where the current run stands, for the command line's Ctrl-C message: the last step begun, the newest
# checkpoint written.
STATUS: dict[str, Any] = {"step": 0, "checkpoint": None}


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


@dataclass
class Position:
    """Where a run is: the epoch, the next step inside it, steps done in all, this rank's epoch totals."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    totals: np.ndarray = field(default_factory=lambda: np.zeros(3))


SCALE_LR_WARMUP_EPOCHS = 5  # Goyal et al. 2017: a gradual warm-up over the first 5 epochs


def scaled_lr(config: TrainConfig, shards: int, steps_per_epoch: int) -> tuple[float, int]:
    """(learning rate, warm-up steps) of the run: with ``--scale-lr``, lr x the data-parallel ranks
    (``shards``), warmed up linearly over the first 5 epochs unless ``--warmup-steps`` is given."""
    if not config.scale_lr:
        return config.lr, config.warmup_steps
    warmup = config.warmup_steps or min(SCALE_LR_WARMUP_EPOCHS, max(1, config.epochs - 1)) * steps_per_epoch
    return config.lr * shards, warmup


def _job(config: TrainConfig, data: Dataset, comm: Communicator, total_steps: int, shards: int = 1) -> Job:
    xp = backend.get_array_module(config.backend)
    lr, warmup = scaled_lr(config, shards, total_steps // max(1, config.epochs))
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
        check_outputs(config, leader=comm.rank == 0)
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
    position = Position()
    if config.resume:
        position, run_id = _restore(config, comm, strategy, steps_per_epoch)
    elif config.checkpoint_dir:
        _refuse_foreign_checkpoints(config, comm)
    shard = strategy.shard
    if leader:
        _header(config, comm, strategy, data, steps_per_epoch)
    batches = ShardedBatches(len(data.x_train), config.batch_size, *shard, config.seed) if shard else None
    dtype, xp = strategy.job.dtype, strategy.job.xp
    # The batch buffers are filled in place every step (no allocation per step).
    with comm.agreement():  # a batch too large to allocate is one error, not a traceback per rank
        x_train = data.x_train.astype(dtype, copy=False)
        x_batch = np.empty((config.batch_size, *data.sample_shape), dtype)
        y_batch = np.empty(config.batch_size, data.y_train.dtype)
    metrics_file = _open_metrics(config) if leader else None
    window = _start_timeline(config, comm)
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
                at = Position(epoch, step_in_epoch, position.global_step, totals.read())
                _save(config, comm, strategy, at, run_id)
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
            **{f"{name}_s": phases.get(name, 0.0) for name in PHASES},  # this rank's (rank 0's in the report)
            **strategy.stats,
        }
        history.append(record)
        if leader:
            _report(record, metrics_file, config.breakdown)
        if config.checkpoint_dir:
            _save(config, comm, strategy, Position(epoch + 1, 0, position.global_step, np.zeros(3)), run_id)
        if config.max_steps is not None and position.global_step >= config.max_steps:
            break
    if metrics_file is not None:
        metrics_file.close()
    if window is not None:
        _write_timeline(config, comm)
    if config.save:
        strategy.sync()
        arrays = strategy.export()
        if leader:  # the architecture too, so evaluate / predict need no model flags
            spec = (config.model, config.hidden, config.dropout, data.sample_shape, data.num_classes, config.dtype)
            entries = inference.architecture_entry(*spec, _json(config), scaling)
            checkpoint.atomic_save_npz(config.save, arrays | entries)
    if leader:
        _summary(config, history, time.perf_counter() - run_began, stopped_at)
    return history


def _summary(config: TrainConfig, history: list[dict[str, Any]], seconds: float, stopped_at: Any) -> None:
    """The run's last line: where it ended, the final accuracy, its time and speed, and what it wrote."""
    parts = [f"# done in {seconds:.2f} s"]
    if history:
        last = history[-1]
        speed = float(np.median([r["samples_per_s"] for r in history]))
        parts[0] += f": epoch {last['epoch']}, test_acc {last['test_acc']:.4f}, {speed:,.0f} samples/s (median epoch)"
    if stopped_at is not None:
        parts.append(f"stopped by --max-steps {config.max_steps} at step {stopped_at[0]}, inside epoch {stopped_at[1]}")
    written = [("metrics", config.metrics), ("model", config.save), ("newest checkpoint", STATUS.get("checkpoint"))]
    written.append(("timeline", config.timeline))
    parts += [f"{what} {path}" for what, path in written if path]
    print("; ".join(parts), flush=True)


def _start_timeline(config: TrainConfig, comm: Communicator) -> tuple[int, int] | None:
    """Forget earlier spans; with --timeline, the window of steps to record, and every rank's clock zero
    taken right after one collective, so the ranks' tracks line up (to that collective's skew)."""
    SPANS.reset()
    if not config.timeline:
        return None
    comm.allreduce(np.zeros(1))
    SPANS.zero = clock()
    return parse_window(config.timeline_steps)


def _write_timeline(config: TrainConfig, comm: Communicator) -> None:
    """Gather every rank's recorded spans to rank 0 and write the --timeline file (collective)."""
    SPANS.recording = False
    mine = trace_events(comm.rank, SPANS.zero, SPANS.events, threading.main_thread().ident)
    gathered = comm.gather_object((mine, SPANS.dropped))
    if gathered is not None:
        dropped = sum(d for _, d in gathered)
        meta = {"steps": config.timeline_steps, "ranks": comm.size, "dropped_events": dropped}
        checkpoint.atomic_write(config.timeline, lambda f: f.write(trace_document([e for e, _ in gathered], meta)))
        if dropped:
            print(f"# timeline: {dropped} span(s) past {MAX_EVENTS} per rank not recorded: narrow --timeline-steps",
                  flush=True)  # fmt: skip


def _rounds_to_take(config: TrainConfig, global_step: int, left: int) -> int:
    """Rounds of the next segment: up to the next checkpoint step, at most the ``left`` of this epoch."""
    every = config.checkpoint_every if config.checkpoint_dir else 0
    return min(left, every - global_step % every) if every else left


def _changed(config: TrainConfig) -> dict[str, Any]:
    """The effective options that differ from the defaults (the loop's and the strategy's), by name."""
    mine, defaults = _json(config), _json(TrainConfig(strategy=config.strategy))
    changed = {k: v for k, v in mine.items() if k != "options" and v != defaults[k] and k != "progress"}
    changed.update({k: v for k, v in mine["options"].items() if v != defaults["options"][k]})
    return changed


def _open_metrics(config: TrainConfig) -> Any:
    """The --metrics file (appended to on a resume), or None; rank 0 writes it, and beside it
    ``FILE.config.json``: the run's whole effective configuration."""
    if not config.metrics:
        return None
    checkpoint.atomic_write_json(os.path.splitext(config.metrics)[0] + ".config.json", _json(config))
    return open(config.metrics, "a" if config.resume else "w")  # closed at the end of _run


def _header(config: TrainConfig, comm: Communicator, strategy: Strategy, data: Dataset, steps: int) -> None:
    shards = type(strategy).data_shards(config.options, comm.size)
    readers = f"{comm.size} rank(s)" if shards == comm.size else f"{comm.size} rank(s), {shards} data shard(s)"
    print(
        f"# {config.model} on {data.name}: {strategy.num_parameters()} parameters, {len(data.x_train)} train / "
        f"{len(data.x_test)} test samples, {readers} x batch {config.batch_size}, {steps} steps/epoch, "
        f"strategy {config.strategy}",
        flush=True,
    )
    if config.scale_lr:
        lr, warmup = scaled_lr(config, shards, steps)
        print(f"# --scale-lr: lr {config.lr:g} x {shards} data shard(s) = {lr:g}, warmed up over {warmup} steps",
              flush=True)  # fmt: skip
    changed = _changed(config)
    if changed:
        shown = (f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in changed.items())
        print("# options: " + " ".join(shown), flush=True)
    layout = strategy.describe()
    if layout:
        print(f"# {layout}", flush=True)
    compression = getattr(config.options, "compression", "none")
    if compression != "none" and comm.size > 1 and comm.single_node:
        print(
            f"# note: every rank is on this node, so no gradient crosses a network: --compression "
            f"{compression} only adds work here (it pays between nodes)",
            flush=True,
        )
    spread = scale_spread(data.x_train) if not config.standardize else 1.0
    if spread >= SPREAD_WARNING:
        log.job_warning(
            f"the features' scales differ {spread:.0e}-fold (standard deviations); --standardize "
            "trains on them centred and scaled, and the saved model applies the same to evaluate / predict"
        )
    global_batch = config.batch_size * shards
    if global_batch > len(data.x_train):
        log.job_warning(
            f"{readers} x batch {config.batch_size} = {global_batch} exceeds the "
            f"{len(data.x_train)} training samples: each epoch repeats samples to fill one step"
        )


def check_outputs(config: TrainConfig, leader: bool = True) -> None:
    """Check every output destination before any training: a folder that exists for --save and
    --metrics (and not a folder as the file; rank 0, the ``leader``, writes them), a writable
    checkpoint folder (every rank writes its shard).

    Raises:
        ValueError / FileNotFoundError: naming the option and what is wrong.
    """
    for option, path in (("--save", config.save), ("--metrics", config.metrics), ("--timeline", config.timeline)):
        if not path or not leader:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise ValueError(f"{option} {path}: is a directory; give a file name")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{option} {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise ValueError(f"{option} {path}: not writable")
    if config.checkpoint_dir:
        folder = config.checkpoint_dir
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"--checkpoint-dir {folder}: exists and is not a directory")
        parent = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ValueError(f"--checkpoint-dir {folder}: cannot be created or written")


def _identity(config: TrainConfig, strategy: Strategy) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run."""
    return {
        "model": config.model,
        "hidden": list(config.hidden),
        "dropout": config.dropout,
        "dataset": config.dataset,
        "dtype": config.dtype,
        "optimizer": config.optimizer,
        "strategy": config.strategy,
        "compression": getattr(config.options, "compression", "none"),
        "standardize": config.standardize,
        "parameters": strategy.num_parameters(),
    }


def _save(config: TrainConfig, comm: Communicator, strategy: Strategy, position: Position, run_id: str) -> None:
    """Write a checkpoint of the whole training state (collective)."""
    began = clock()
    strategy.sync()
    state = strategy.state_dict()
    meta = {
        "epoch": position.epoch,
        "step_in_epoch": position.step_in_epoch,
        "global_step": position.global_step,
        "batch_size": config.batch_size,
        "identity": _identity(config, strategy),
        "config": _json(config),
        "strategy": state.meta,
    }
    local = {**state.local, "loop/totals": position.totals}
    STATUS["checkpoint"] = checkpoint.save(
        comm, config.checkpoint_dir, position.global_step, State(state.replicated, local, meta), run_id, config.keep
    )
    SPANS.add("checkpoint", began)
    if comm.rank == 0:
        log.LOGGER.info(
            "checkpoint at step %d: %s (%.3f s)", position.global_step, STATUS["checkpoint"], clock() - began
        )


def _json(config: TrainConfig) -> dict[str, Any]:
    return {**asdict(config), "options": asdict(config.options)}


def _refuse_foreign_checkpoints(config: TrainConfig, comm: Communicator) -> None:
    """A fresh run must not mix its checkpoints with another run's (a later --resume would pick theirs)."""
    with comm.agreement():
        if comm.rank == 0 and os.path.isdir(config.checkpoint_dir):
            others = checkpoint.runs(config.checkpoint_dir)
            if others:
                newest = max(others.values())
                raise ValueError(
                    f"--checkpoint-dir {config.checkpoint_dir} holds checkpoints of another run (newest at step "
                    f"{newest}); pass --resume to continue it, or choose an empty folder"
                )


def _restore(config: TrainConfig, comm: Communicator, strategy: Strategy, steps_per_epoch: int) -> tuple[Position, str]:
    """Load the newest valid checkpoint, check it fits this run, and give every rank its state."""
    found = checkpoint.load_newest(comm, config.resume)
    meta = found.meta
    for key, value in _identity(config, strategy).items():
        if meta["identity"].get(key) != value:
            raise mark_all_ranks(
                ValueError(
                    f"{found.path} was written by a run with {key}={meta['identity'].get(key)!r}; "
                    f"this run has {key}={value!r}"
                )
            )
    same_world = found.world_size == comm.size and meta["batch_size"] == config.batch_size
    strategy_state = State(found.state.replicated, found.state.local, meta["strategy"])
    strategy.load_state_dict(strategy_state, same_world)
    position = Position(meta["epoch"], meta["step_in_epoch"], meta["global_step"])
    if same_world:
        position.totals = found.state.local["loop/totals"].copy()
    else:  # another world: the data order changes; go on from the same share of the epoch
        consumed = meta["step_in_epoch"] * meta["batch_size"] * found.world_size
        position.step_in_epoch = min(consumed // (config.batch_size * comm.size), steps_per_epoch)
    if comm.rank == 0:
        for problem in found.skipped:
            print(f"# skipped a damaged checkpoint: {problem}", file=sys.stderr, flush=True)
        print(f"# resuming from {found.path}: epoch {position.epoch + 1}, step {position.global_step}", flush=True)
    return position, found.run_id


def _plain(value: Any) -> Any:
    """A record's value as JSON takes it: ints stay ints, lists (per-stage counts) stay lists, the rest floats."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, int) else float(value)


def _report(record: dict[str, Any], metrics_file: Any, breakdown: bool = False) -> None:
    line = (
        f"epoch {record['epoch']:3d}  loss {record['loss']:.4f}  train_acc {record['train_acc']:.4f}  "
        f"test_acc {record['test_acc']:.4f}  {record['samples_per_s']:,.0f} samples/s  {record['time_s']:.2f} s"
    )
    if breakdown:  # what the main thread spent its steps on (allreduce: the overlapped worker's time)
        line += "  |" + "".join(f" {name} {record[name + '_s']:.3f}s" for name in PHASES)
    print(line, flush=True)
    if metrics_file is not None:
        metrics_file.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        metrics_file.flush()


__all__ = ["Position", "Sums", "TrainConfig", "TrainResult", "evaluate", "train", "train_config"]
