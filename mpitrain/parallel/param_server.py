"""Parameter servers (``--strategy ps-sync``, ``ps-async``, ``ps-ssp``): workers push gradients, servers
own ranges of the parameters, run the optimizer on them and send them back.

Ranks ``0 .. W-1`` are workers (each reads its own data shard and keeps a
full copy of the parameters); the last ``--servers S`` ranks are servers,
server ``j`` owning the contiguous range ``ranges[j]`` of the flat
parameter vector (range sharding, as ps-lite does). Each worker step is:
forward and backward on its batch, then for every server a push (a small
header and the gradient of that server's range) and a pull (a header and
the updated range). Everything travels through the Communicator's checked,
watched point-to-point calls, so a dead or stalled peer ends the job with
the watchdog's message. A server serves exactly W pushes per loop step
(``step(None, None)``), so when the workers have taken their steps every
server has served them: no rank is left waiting at the end.

The three modes differ only in when a server applies a gradient and when it
answers (``ps_server``): ``ps-sync`` sums the W gradients of a round in worker
order and answers everyone after one update; ``ps-ssp`` (stale-synchronous
parallel, Ho et al. 2013) lets a worker run up to ``--staleness K`` clocks
ahead of the slowest; ``ps-async`` applies every gradient on arrival and
answers at once, handing out the epoch's batches as tickets so a fast worker
does more of them than a slow one.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mpitrain import backend
from mpitrain.cli_types import nonneg_int, positive_int
from mpitrain.comm import Communicator
from mpitrain.data import ShardedBatches
from mpitrain.parallel.base import (
    Job,
    State,
    Strategy,
    Sums,
    exported,
    load_optimizer,
    optimizer_arrays,
    register,
)
from mpitrain.parallel.local_step import LocalStep
from mpitrain.parallel.ps_server import PULL, PULL_DATA, PUSH, PUSH_DATA, PushSchedule, Server, server_for
from mpitrain.parallel.replicas import check_replicas


@dataclass
class SyncOptions:
    """Options of ``--strategy ps-sync``."""

    servers: int = 1


@dataclass
class SSPOptions:
    """Options of ``--strategy ps-ssp``."""

    servers: int = 1
    staleness: int = 2


@dataclass
class AsyncOptions:
    """Options of ``--strategy ps-async``."""

    servers: int = 1
    staleness_lr: bool = False


def server_ranges(count: int, servers: int) -> list[tuple[int, int]]:
    """(start, stop) of each server's contiguous part of a ``count``-element parameter vector."""
    return [(count * j // servers, count * (j + 1) // servers) for j in range(servers)]


class ParameterServer(Strategy):
    """Workers push gradients to range-owning servers and pull the parameters back (see the module
    docstring); "consistent" after ``sync`` means every rank holds the servers' current parameters."""

    mode: ClassVar[str]

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--servers", type=positive_int, default=1, help="server ranks, the last S (default 1)")
        group.add_argument(
            "--staleness", type=nonneg_int, default=SSPOptions.staleness, help="ps-ssp: clocks a worker may lead by"
        )
        group.add_argument(
            "--staleness-lr",
            action="store_true",
            help="ps-async: scale each gradient by 1/(1 + updates it missed)",
        )

    @classmethod
    def validate(cls, options: Any, batch_size: int, world_size: int) -> None:
        if not 1 <= options.servers < world_size:
            raise ValueError(
                f"--servers {options.servers} needs at least one worker besides: a world of {world_size} rank(s) "
                f"takes 1 to {world_size - 1} server(s)"
                if world_size > 1
                else f"--strategy {cls.name} needs at least 2 ranks (a worker and a server); this world has 1"
            )

    @classmethod
    def data_shards(cls, options: Any, world_size: int) -> int:
        return world_size - options.servers

    def __init__(self, job: Job, comm: Communicator, options: Any) -> None:
        super().__init__(job, comm, options)
        if job.xp is not np:
            raise ValueError(f"--strategy {self.name} runs on host (numpy) arrays only for now")
        self.workers = comm.size - options.servers
        self.model = job.build_model().init_params(seed=job.seed, xp=job.xp, dtype=job.dtype)
        self.optimizer = job.build_optimizer(self.model.flat_params, self.model.flat_grads, None)
        if self.mode == "async":  # one push is 1/W of a round
            self.optimizer.schedule = PushSchedule(self.optimizer.schedule, self.workers)
        self.ranges = server_ranges(self.model.num_parameters(), options.servers)
        self.local = LocalStep(self.model, job.loss())
        self.server: Server | None = None
        if comm.rank >= self.workers:
            self.server = server_for(self, comm.rank - self.workers)
        self.steps = 0  # this rank's own steps
        self.wait_s = 0.0  # seconds a worker waited for the servers' answers
        self.versions = np.zeros(options.servers, np.int64)  # each server's updates in the parameters held
        self.ticket = -1  # ps-async: the global batch this worker takes next (-1: none left)
        self.clock = 0  # this worker's pushes so far (ps-ssp checks it)
        self._out = [np.zeros(2, np.int64) for _ in self.ranges]  # push headers: clock, versions read
        self._in = [np.zeros(2, np.int64) for _ in self.ranges]  # pull headers: version, next ticket
        self._counters: list[dict[str, Any]] = []

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.comm.rank, self.workers) if self.server is None else None

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def start(self) -> None:
        self.comm.broadcast(self.model.flat_params, root=0)

    def step(self, x: Any, y: Any) -> Sums:
        self.steps += 1
        if self.server is not None:
            self.server.serve(self.workers)
            return Sums(0.0, 0, 0)
        sums = self.local.gradients(x, y)
        began = time.perf_counter()
        self._exchange()
        self.wait_s += time.perf_counter() - began
        return sums

    def _exchange(self) -> None:
        """Push this worker's gradient ranges and pull the servers' parameter ranges."""
        comm, params, grads = self.comm, self.model.flat_params, self.model.flat_grads
        self.clock += 1
        pending = []
        for j, (lo, hi) in enumerate(self.ranges):  # the answers' buffers first: a server's send finds them
            pending += [
                comm.irecv(self._in[j], self.workers + j, PULL),
                comm.irecv(params[lo:hi], self.workers + j, PULL_DATA),
            ]
        for j, (lo, hi) in enumerate(self.ranges):
            self._out[j][:] = self.clock, self.versions[j]
            pending += [
                comm.isend(self._out[j], self.workers + j, PUSH),
                comm.isend(grads[lo:hi], self.workers + j, PUSH_DATA),
            ]
        for request in pending:
            request.wait()
        for j in range(len(self.ranges)):
            self.versions[j] = self._in[j][0]
        self.ticket = int(self._in[0][1])

    def evaluate(self, x: Any, y: Any) -> Sums:
        return self.local.evaluate(x, y)

    def sync(self) -> None:
        """Every rank gets each server's current range (a broadcast per server) and the servers' counters."""
        for j, (lo, hi) in enumerate(self.ranges):
            self.comm.broadcast(self.model.flat_params[lo:hi], root=self.workers + j)
        counters = self.comm.allgather_object(self.server.counters() if self.server is not None else None)
        self._counters = counters[self.workers :]
        self.versions[:] = [c["version"] for c in self._counters]
        self.optimizer.steps = self._counters[0]["optimizer_steps"]  # so every rank reports the lr in use
        self.clock = int(self.versions[0]) if self.mode != "async" else self.clock

    def check(self) -> None:
        check_replicas(self.comm, self.model.flat_params)

    def state_dict(self) -> State:
        """The whole parameters and optimizer state (each range broadcast from its server), replicated;
        the servers' counters in ``meta``."""
        state = self.optimizer.state_dict()
        for value in state.values():
            if getattr(value, "ndim", 0):
                for j, (lo, hi) in enumerate(self.ranges):
                    self.comm.broadcast(value[lo:hi], root=self.workers + j)
        replicated = {"params": backend.to_host(self.model.flat_params)}
        replicated.update(optimizer_arrays(self.optimizer))
        meta = {"optimizer_steps": self._counters[0]["optimizer_steps"], "servers": self._counters, "steps": self.steps}
        return State(replicated, {}, meta)

    def load_state_dict(self, state: State, same_world: bool) -> None:
        self.model.flat_params[...] = state.replicated["params"]
        load_optimizer(self.optimizer, state.replicated, state.meta["optimizer_steps"], self.job.xp)
        counters = state.meta["servers"]
        if len(counters) != len(self.ranges):  # other servers: each starts from the first one's counters
            counters = [counters[0]] * len(self.ranges)
        self._counters = counters
        self.versions[:] = [c["version"] for c in counters]
        self.clock = int(self.versions[0])
        if same_world:
            self.steps = state.meta["steps"]
        if self.server is not None:
            self.server.restore(counters[self.server.index])

    def load_parameters(self, named: dict[str, np.ndarray]) -> None:
        self.model.load_state_dict(named)  # a server's range is a view of these parameters

    def export(self) -> dict[str, np.ndarray] | None:
        return exported(self.comm, self.model)

    def close(self) -> None:
        """Cancel a server's standing receives."""
        if self.server is not None:
            self.server.close()

    @property
    def stats(self) -> dict[str, Any]:
        return {"lr": self.optimizer.lr, "steps": self.steps, "wait_s": self.wait_s, "sent_bytes": self.sent_bytes}


@register
class SyncParameterServer(ParameterServer):
    """Synchronous parameter server: every step, the servers sum all workers' gradients (in worker order)
    and answer after one update, so it equals allreduce over the workers up to round-off."""

    name, mode, Options = "ps-sync", "sync", SyncOptions


@register
class StaleSynchronousParameterServer(ParameterServer):
    """Stale-synchronous parameter server: a worker may run up to --staleness K steps ahead of the slowest
    (K=0 is ps-sync, bit for bit); the servers apply each round once all its gradients are in. Which
    rounds a worker's parameters hold depends on timing when K > 0, so runs are not bit-reproducible."""

    name, mode, Options = "ps-ssp", "ssp", SSPOptions

    @property
    def stats(self) -> dict[str, Any]:
        spread = max((c["max_spread"] for c in self._counters), default=0)
        return {**super().stats, "max_clock_spread": spread}


@register
class AsynchronousParameterServer(ParameterServer):
    """Asynchronous parameter server: each gradient is applied on arrival and answered at once, the
    epoch's batches handed out as tickets (fast workers take more). Not deterministic: what a gradient
    was computed on depends on arrival order; what holds is that every pushed gradient is applied once."""

    name, mode, Options = "ps-async", "async", AsyncOptions

    @property
    def stats(self) -> dict[str, Any]:
        staleness = max((c["max_staleness"] for c in self._counters), default=0)
        mean = self._counters[0]["mean_staleness"] if self._counters else 0.0
        lr = self.optimizer.lr * self.workers  # a round's rate, as --lr means it (see PushSchedule)
        return {**super().stats, "lr": lr, "mean_staleness": mean, "max_staleness": staleness}

    def batches(self, sampler: ShardedBatches | None, epoch: int, first: int, count: int) -> Any:
        """Tickets: global batches ``first*W .. (first+count)*W - 1``; worker w starts with the w-th, then
        takes the one server 0 hands it with each answer until none is left."""
        if self.server is not None:
            self.server.tickets(first * self.workers + self.workers, (first + count) * self.workers)
            return super().batches(sampler, epoch, first, count)
        self.ticket = first * self.workers + self.comm.rank
        return self._ticketed(sampler.epoch_order(epoch), sampler.batch_size)

    def _ticketed(self, order: np.ndarray, batch: int) -> Any:
        while self.ticket >= 0:
            yield order[self.ticket * batch : (self.ticket + 1) * batch]
