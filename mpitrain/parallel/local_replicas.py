"""Strategies whose ranks train replicas that differ between averagings (gossip, local SGD): the shared
part.

Each rank holds its own replica and optimizer and steps on its own shard;
the subclass's ``communicate`` mixes the replicas after each local update.
``sync`` (an epoch end, a checkpoint, the final save) computes the
consensus model, the ranks' average, into a model of its own without
changing any replica, so evaluating or checkpointing a run does not change
its course. The consensus is what is evaluated, exported and checked
(bit-identical on every rank); how far the replicas are from it is reported
as the consensus distance.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from mpitrain import backend
from mpitrain.comm import Communicator
from mpitrain.parallel.base import (
    Job,
    State,
    Strategy,
    Sums,
    exported,
    from_json_array,
    json_array,
    load_optimizer,
    optimizer_arrays,
)
from mpitrain.parallel.local_step import LocalStep
from mpitrain.parallel.replicas import check_replicas


class LocalReplicas(Strategy):
    """Base of strategies with one replica per rank (see the module docstring)."""

    def __init__(self, job: Job, comm: Communicator, options: Any) -> None:
        super().__init__(job, comm, options)
        self.model = job.build_model().init_params(seed=job.seed, xp=job.xp, dtype=job.dtype)
        self.optimizer = job.build_optimizer(self.model.flat_params, self.model.flat_grads, None)
        self.local = LocalStep(self.model, job.loss())
        self.consensus_model = job.build_model().init_params(seed=job.seed, xp=job.xp, dtype=job.dtype)
        self._evaluation = LocalStep(self.consensus_model, job.loss())
        self.steps = 0  # steps taken in all (also across a resume)
        self.wait_s = 0.0  # seconds spent exchanging with other ranks
        self.distance = {"max": 0.0, "mean": 0.0}

    @property
    def shard(self) -> tuple[int, int]:
        return self.comm.rank, self.comm.size

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def start(self) -> None:
        self.comm.broadcast(self.model.flat_params, root=0)

    def step(self, x: Any, y: Any) -> Sums:
        sums = self.local.gradients(x, y)
        self.steps += 1
        self.communicate()
        return sums

    def communicate(self) -> None:
        """Update this rank's replica from its gradients and mix it with other replicas (the exchanges
        inside ``waiting()``)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Count the enclosed exchange's seconds in ``wait_s``."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.wait_s += time.perf_counter() - began

    def evaluate(self, x: Any, y: Any) -> Sums:
        return self._evaluation.evaluate(x, y)

    def sync(self) -> None:
        """The consensus model (the mean of the replicas) and the replicas' distances from it (collective)."""
        consensus = self.consensus_model.flat_params
        consensus[...] = self.model.flat_params
        self.comm.allreduce(consensus, op="mean")
        xp = self.job.xp
        mine = float(xp.linalg.norm((self.model.flat_params - consensus).astype(np.float64)))
        distances = self.comm.allgather_object(mine)
        self.distance = {"max": max(distances), "mean": sum(distances) / len(distances)}

    def check(self) -> None:
        check_replicas(self.comm, self.consensus_model.flat_params, "consensus parameters")
        if not math.isfinite(self.distance["max"]):
            raise FloatingPointError("a replica holds non-finite parameters")

    def state_dict(self) -> State:
        """This rank's replica and optimizer state (local), the consensus (replicated)."""
        state = self.optimizer.state_dict()
        local = {"replica": backend.to_host(self.model.flat_params)}
        local.update(optimizer_arrays(self.optimizer))
        local["random_state"] = json_array(self.model.random_state())
        replicated = {"params": backend.to_host(self.consensus_model.flat_params)}
        return State(replicated, local, {"optimizer_steps": int(state["steps"]), "steps": self.steps})

    def load_state_dict(self, state: State, same_world: bool) -> None:
        """The same world takes up every replica where it was; another starts each from the consensus
        (with fresh optimizer state: the old world's per-rank state does not map onto the new one)."""
        xp = self.job.xp
        self.steps = state.meta["steps"]
        self.consensus_model.flat_params[...] = backend.to_device(state.replicated["params"], xp)
        if not same_world:
            self.model.flat_params[...] = self.consensus_model.flat_params
            self.optimizer.steps = state.meta["optimizer_steps"]
            return
        self.model.flat_params[...] = backend.to_device(state.local["replica"], xp)
        load_optimizer(self.optimizer, state.local, state.meta["optimizer_steps"], xp)
        self.model.set_random_state(from_json_array(state.local["random_state"]))

    def load_parameters(self, named: dict[str, np.ndarray]) -> None:
        self.model.load_state_dict(named)
        self.consensus_model.load_state_dict(named)

    def export(self) -> dict[str, np.ndarray] | None:
        return exported(self.comm, self.consensus_model)

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "lr": self.optimizer.lr,
            "consensus_distance": self.distance["max"],
            "consensus_distance_mean": self.distance["mean"],
            "steps": self.steps,
            "wait_s": self.wait_s,
            "sent_bytes": self.sent_bytes,
        }
