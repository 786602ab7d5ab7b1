"""The training loop: epochs, evaluation, metrics, progress and the final save."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI
from tqdm import tqdm

from mpitrain import backend, checkpoint, faults
from mpitrain.checkpoint import atomic_save_npz
from mpitrain.comm import Communicator
from mpitrain.data import Dataset, ShardedBatches, eval_shard, load_dataset
from mpitrain.nn import Dropout, Module, SoftmaxCrossEntropy, build_model
from mpitrain.optim import LRSchedule, build_optimizer
from mpitrain.parallel import DataParallel
from mpitrain.parallel.data_parallel import DEFAULT_BUCKET_BYTES

EVAL_BATCH = 1024


@dataclass
class TrainConfig:
    """Everything a training run depends on (the CLI's ``train`` options)."""

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
    step_size: int = 0
    gamma: float = 0.1
    seed: int = 0
    dtype: str = "float32"
    backend: str = "numpy"
    algorithm: str = "auto"
    bucket_mb: float = DEFAULT_BUCKET_BYTES / 2**20
    overlap: bool = True
    compression: str = "none"
    accumulate: int = 1
    micro_batch: int = 0
    shard_optimizer: bool = False
    nonfinite: str = "abort"
    check_replicas_every: int = 100
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep: int = 3
    resume: str | None = None
    max_steps: int | None = None
    metrics: str | None = None
    save: str | None = None
    progress: bool = True


def evaluate(model: Module, data: Dataset, comm: Communicator) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole test set; each sample is evaluated on exactly one rank."""
    part = eval_shard(len(data.x_test), comm.rank, comm.size)
    x_all, y_all = data.x_test[part], data.y_test[part]
    totals = np.zeros(3)  # loss sum, correct, count
    model.eval()
    loss_fn = SoftmaxCrossEntropy()
    for start in range(0, len(x_all), EVAL_BATCH):
        x = backend.to_device(x_all[start : start + EVAL_BATCH].astype(model.flat_params.dtype), model.xp)
        y = backend.to_device(y_all[start : start + EVAL_BATCH], model.xp)
        logits = model.forward(x)
        totals += (loss_fn.forward(logits, y) * len(y), int((logits.argmax(axis=1) == y).sum()), len(y))
    comm.allreduce(totals, op="sum")
    return totals[0] / totals[2], totals[1] / totals[2]


@dataclass
class TrainResult:
    """What a run leaves: the trained model (identical on every rank) and one record per epoch."""

    model: Module
    history: list[dict[str, Any]]


def train(config: TrainConfig, comm: Communicator) -> TrainResult:
    """Train data-parallel over ``comm``; every rank returns the same result.

    Setup errors on any rank (bad data file, bad sizes) are raised on every rank.
    """
    xp = backend.get_array_module(config.backend)
    dtype = np.dtype(config.dtype)
    with comm.agreement():
        data = load_dataset(config.dataset, seed=config.seed, synthetic_samples=config.synthetic_samples)
        model = build_model(
            config.model,
            data.sample_shape,
            data.num_classes,
            config.hidden,
            dropout=config.dropout,
            dropout_seed=int(np.random.SeedSequence([config.seed, comm.rank]).generate_state(1)[0]),
        )
        batches = ShardedBatches(len(data.x_train), config.batch_size, comm.rank, comm.size, config.seed)
        schedule = LRSchedule(
            config.lr,
            kind=config.schedule,
            warmup_steps=config.warmup_steps,
            total_steps=config.epochs * batches.steps_per_epoch,
            step_size=config.step_size,
            gamma=config.gamma,
        )
        metrics_file = _open_outputs(config) if comm.rank == 0 else None
    # Host gradients live in node-shared memory, where the all-reduce reads peers directly
    # (allocating is collective, so it happens only once every rank's setup has succeeded).
    model.init_params(seed=config.seed, xp=xp, dtype=dtype, allocate=comm.allocate if xp is np else None)
    optimizer = build_optimizer(
        config.optimizer,
        model.flat_params,
        model.flat_grads,
        schedule,
        momentum=config.momentum if config.optimizer == "sgd" else 0.0,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        allocate=comm.allocate if xp is np else None,
    )
    with comm.agreement():
        if config.accumulate > config.batch_size:
            raise ValueError(f"--accumulate {config.accumulate} exceeds the per-rank batch size {config.batch_size}")
        dp = DataParallel(
            model,
            optimizer,
            comm,
            algorithm=config.algorithm,
            bucket_bytes=max(1, int(config.bucket_mb * 2**20)),
            overlap=config.overlap,
            compression=config.compression,
            accumulate=config.accumulate,
            nonfinite=config.nonfinite,
            micro_batch=config.micro_batch,
            shard_optimizer=config.shard_optimizer,
        )
    dp.broadcast_parameters()
    leader = comm.rank == 0
    position = _restore(config, comm, dp, batches) if config.resume else Position()
    if leader:
        print(
            f"# {config.model} on {data.name}: {model.num_parameters()} parameters, {len(data.x_train)} train / "
            f"{len(data.x_test)} test samples, {comm.size} rank(s) x batch {config.batch_size}, "
            f"{batches.steps_per_epoch} steps/epoch",
            flush=True,
        )
        if config.compression != "none" and comm.size > 1 and comm.single_node:
            print(
                f"# note: every rank is on this node, so no gradient crosses a network: --compression "
                f"{config.compression} only adds work here (it pays between nodes)",
                flush=True,
            )
    # The batch buffers are filled in place every step (no allocation per step).
    x_train = data.x_train.astype(dtype, copy=False)
    x_batch = np.empty((config.batch_size, *data.sample_shape), dtype)
    y_batch = np.empty(config.batch_size, data.y_train.dtype)
    history = []
    for epoch in range(position.epoch, config.epochs):
        start = MPI.Wtime()
        first = position.step_in_epoch if epoch == position.epoch else 0
        totals = position.totals if epoch == position.epoch else np.zeros(3)  # loss sum, correct, count
        bar = tqdm(
            total=batches.steps_per_epoch,
            initial=first,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not (leader and config.progress),
            leave=False,
            file=sys.stderr,
        )
        step_in_epoch = first - 1
        for step_in_epoch, idx in enumerate(batches.batches(epoch, first), start=first):
            position.global_step += 1
            with comm.watch(f"training step {position.global_step}"):
                np.take(x_train, idx, axis=0, out=x_batch)
                np.take(data.y_train, idx, out=y_batch)
                faults.before_step(comm.rank, position.global_step, x_batch)
                loss, correct = dp.train_step(backend.to_device(x_batch, xp), backend.to_device(y_batch, xp))
            totals += (loss * len(idx), correct, len(idx))
            bar.update()
            if config.check_replicas_every and position.global_step % config.check_replicas_every == 0:
                dp.check_replicas()
            if (
                config.checkpoint_dir
                and config.checkpoint_every
                and position.global_step % config.checkpoint_every == 0
            ):
                _save(config, comm, dp, Position(epoch, step_in_epoch + 1, position.global_step, totals))
            if config.max_steps is not None and position.global_step >= config.max_steps:
                break
        bar.close()
        if step_in_epoch + 1 < batches.steps_per_epoch:
            break  # stopped by max_steps inside the epoch: no evaluation of a partial epoch
        train_time = MPI.Wtime() - start
        comm.allreduce(totals, op="sum")
        dp.check_replicas()
        test_loss, test_acc = evaluate(model, data, comm)
        record = {
            "epoch": epoch + 1,
            "loss": totals[0] / totals[2],
            "train_acc": totals[1] / totals[2],
            "test_loss": test_loss,
            "test_acc": test_acc,
            "samples_per_s": totals[2] / comm.comm.allreduce(train_time, op=MPI.MAX),
            "time_s": comm.comm.allreduce(MPI.Wtime() - start, op=MPI.MAX),
            "lr": optimizer.lr,
            "skipped_steps": dp.skipped_steps,
        }
        history.append(record)
        if leader:
            _report(record, metrics_file)
        if config.checkpoint_dir:
            _save(config, comm, dp, Position(epoch + 1, 0, position.global_step, np.zeros(3)))
        if config.max_steps is not None and position.global_step >= config.max_steps:
            break
    if metrics_file is not None:
        metrics_file.close()
    if leader and config.save:
        arrays = {name: backend.to_host(p.data) for name, p in model.named_parameters()}
        atomic_save_npz(config.save, arrays)
    return TrainResult(model, history)


@dataclass
class Position:
    """Where a run is: the epoch, the next step inside it, steps done in all, this rank's epoch totals."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    totals: np.ndarray = field(default_factory=lambda: np.zeros(3))


def _dropouts(model: Module) -> list[Dropout]:
    return [m for m in model.modules() if isinstance(m, Dropout)]


def _identity(config: TrainConfig, model: Module) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run."""
    return {
        "model": config.model,
        "hidden": list(config.hidden),
        "dropout": config.dropout,
        "dataset": config.dataset,
        "dtype": config.dtype,
        "optimizer": config.optimizer,
        "compression": config.compression,
        "parameters": model.num_parameters(),
    }


def _save(config: TrainConfig, comm: Communicator, dp: DataParallel, position: Position) -> None:
    """Rank 0 writes a checkpoint of the whole training state (collective: gathers every rank's totals)."""
    dp.consolidate_optimizer_state()
    totals = np.array(comm.allgather_object(position.totals.tolist()))
    rng_states = comm.comm.gather([m.rng.bit_generator.state for m in _dropouts(dp.model)], root=0)
    residual = getattr(dp.compressor, "residual", None)  # top-k error feedback: different on every rank
    residuals = None if residual is None else comm.comm.gather(residual, root=0)
    with comm.agreement():
        if comm.rank != 0:
            return
        arrays = {"params": backend.to_host(dp.model.flat_params), "totals": totals}
        state = dp.optimizer.state_dict()
        arrays.update({f"opt/{k}": backend.to_host(v) for k, v in state.items() if k != "steps"})
        if residuals is not None:
            arrays["residual"] = np.stack(residuals)
        meta = {
            "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch,
            "global_step": position.global_step,
            "world_size": comm.size,
            "batch_size": config.batch_size,
            "optimizer_steps": int(state["steps"]),
            "skipped_steps": dp.skipped_steps,
            "identity": _identity(config, dp.model),
            "config": asdict(config),
            "dropout_rng": rng_states,
        }
        checkpoint.save(config.checkpoint_dir, position.global_step, arrays, meta, config.keep)


def _restore(config: TrainConfig, comm: Communicator, dp: DataParallel, batches: ShardedBatches) -> Position:
    """Load the newest valid checkpoint on rank 0, check it fits this run, and give every rank its state."""
    found = None
    with comm.agreement():
        if comm.rank == 0:
            arrays, meta, path, skipped = checkpoint.load_newest(config.resume)
            wanted = _identity(config, dp.model)
            for key, value in wanted.items():
                if meta["identity"].get(key) != value:
                    raise ValueError(
                        f"{path} was written by a run with {key}={meta['identity'].get(key)!r}; "
                        f"this run has {key}={value!r}"
                    )
            found = (arrays, meta, path, skipped)
    arrays, meta, path, skipped = comm.comm.bcast(found, root=0)
    dp.model.flat_params[...] = backend.to_device(arrays["params"], dp.model.xp)
    state = {k[4:]: v for k, v in arrays.items() if k.startswith("opt/")}
    dp.optimizer.load_state_dict({**state, "steps": meta["optimizer_steps"]})
    dp.skipped_steps = meta["skipped_steps"]
    position = Position(meta["epoch"], meta["step_in_epoch"], meta["global_step"])
    if meta["world_size"] == comm.size and meta["batch_size"] == config.batch_size:
        position.totals = arrays["totals"][comm.rank].copy()
        if "residual" in arrays:
            dp.compressor.residual[...] = arrays["residual"][comm.rank]
        for layer, state in zip(_dropouts(dp.model), meta["dropout_rng"][comm.rank], strict=True):
            layer.rng.bit_generator.state = state
    else:  # another world: the data order changes; go on from the same share of the epoch
        consumed = meta["step_in_epoch"] * meta["batch_size"] * meta["world_size"]
        position.step_in_epoch = min(consumed // (config.batch_size * comm.size), batches.steps_per_epoch)
    if comm.rank == 0:
        for problem in skipped:
            print(f"# skipped a damaged checkpoint: {problem}", file=sys.stderr, flush=True)
        print(f"# resuming from {path}: epoch {position.epoch + 1}, step {position.global_step}", flush=True)
    return position


def _open_outputs(config: TrainConfig) -> Any:
    """Check the save folder exists and open the metrics file (rank 0), before any training."""
    if config.save and not os.path.isdir(os.path.dirname(os.path.abspath(config.save))):
        raise FileNotFoundError(f"--save {config.save}: the folder does not exist")
    return open(config.metrics, "a" if config.resume else "w") if config.metrics else None


def _report(record: dict[str, Any], metrics_file: Any) -> None:
    print(
        f"epoch {record['epoch']:3d}  loss {record['loss']:.4f}  train_acc {record['train_acc']:.4f}  "
        f"test_acc {record['test_acc']:.4f}  {record['samples_per_s']:,.0f} samples/s  {record['time_s']:.2f} s",
        flush=True,
    )
    if metrics_file is not None:
        metrics_file.write(json.dumps({k: v if isinstance(v, int) else float(v) for k, v in record.items()}) + "\n")
        metrics_file.flush()
