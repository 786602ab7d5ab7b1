"""The loop's checkpoints: where a run stands, what a checkpoint must match to be resumed, writing one,
refusing another run's folder, and resuming from the newest valid one (``checkpoint`` is the format)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mpitrain import checkpoint, log
from mpitrain.comm import Communicator, mark_all_ranks
from mpitrain.parallel import State, Strategy
from mpitrain.timeline import SPANS, clock

if TYPE_CHECKING:
    from mpitrain.train import TrainConfig


@dataclass
class Position:
    """Where a run is: the epoch, the next step inside it, steps done in all, this rank's epoch totals."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    totals: np.ndarray = field(default_factory=lambda: np.zeros(3))


def identity(config: TrainConfig, strategy: Strategy) -> dict[str, Any]:
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


def save(config: TrainConfig, comm: Communicator, strategy: Strategy, position: Position, run_id: str) -> str:
    """Write a checkpoint of the whole training state (collective); returns its folder."""
    began = clock()
    strategy.sync()
    state = strategy.state_dict()
    meta = {
        "epoch": position.epoch,
        "step_in_epoch": position.step_in_epoch,
        "global_step": position.global_step,
        "batch_size": config.batch_size,
        "identity": identity(config, strategy),
        "config": config.as_json(),
        "strategy": state.meta,
    }
    local = {**state.local, "loop/totals": position.totals}
    path = checkpoint.save(
        comm, config.checkpoint_dir, position.global_step, State(state.replicated, local, meta), run_id, config.keep
    )
    SPANS.add("checkpoint", began)
    if comm.rank == 0:
        log.LOGGER.info("checkpoint at step %d: %s (%.3f s)", position.global_step, path, clock() - began)
    return path


def refuse_foreign_checkpoints(config: TrainConfig, comm: Communicator) -> None:
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


def restore(config: TrainConfig, comm: Communicator, strategy: Strategy, steps_per_epoch: int) -> tuple[Position, str]:
    """Load the newest valid checkpoint, check it fits this run, and give every rank its state."""
    found = checkpoint.load_newest(comm, config.resume)
    meta = found.meta
    for key, value in identity(config, strategy).items():
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
