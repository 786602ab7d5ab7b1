"""The server side of the parameter-server strategies: when a pushed gradient is applied, when a worker
is answered.

A server owns one contiguous range of the parameters (views of the full
model's flat buffers) and updates only that range with the job's
optimizer. Messages per push: a header (int64 ``[clock, version read]``)
and the gradient range; per answer: a header (``[version, next ticket]``)
and the parameter range. Workers post their receives before pushing, so
the servers' blocking sends of an answer find them at once.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mpitrain.optim import LRSchedule
from mpitrain.parallel.reducer import finite

PUSH, PUSH_DATA, PULL, PULL_DATA = 11, 12, 13, 14


class PushSchedule:
    """The learning rate of one asynchronous push: ``schedule``'s rate for the round it falls in, where
    a round is ``workers`` pushes, divided by ``workers``. So W pushes move the parameters as far as one
    synchronous step of the averaged gradient: the per-sample learning rate of ps-sync and allreduce
    (as the linear scaling rule keeps it), and ``--lr`` means the same in every strategy."""

    def __init__(self, schedule: LRSchedule, workers: int) -> None:
        self.schedule, self.workers = schedule, workers

    def __call__(self, step: int) -> float:
        return self.schedule(step // self.workers) / self.workers


class Server:
    """Base: the owned range, the update and the answer; subclasses decide the order (``serve``)."""

    def __init__(self, strategy: Any, index: int) -> None:
        self.index, self.comm, self.workers = index, strategy.comm, strategy.workers
        lo, hi = strategy.ranges[index]
        self.owned = [(lo, hi)]
        self.params, self.grads = strategy.model.flat_params[lo:hi], strategy.model.flat_grads[lo:hi]
        self.optimizer = strategy.optimizer
        self.version = 0  # updates applied to this range
        self.answer = np.zeros(2, np.int64)
        self.heads = np.zeros((self.workers, 2), np.int64)  # each worker's push header
        self.last_push = [time.monotonic()] * self.workers
        # Standing receives of each worker's next push (header, gradient): a push lands where it belongs
        # at once instead of queueing as an unexpected message, and whichever comes first is served.
        self._posted: dict[int, tuple[Any, Any]] = {}

    def serve(self, pushes: int) -> None:
        """Serve ``pushes`` pushes (one loop step: one per worker on average)."""
        raise NotImplementedError

    def counters(self) -> dict[str, Any]:
        """What a checkpoint and the epoch report need from this server (JSON-able)."""
        return {"version": self.version, "optimizer_steps": self.optimizer.steps}

    def restore(self, counters: dict[str, Any]) -> None:
        """Take up ``counters()``'s result after a resume."""
        self.version = int(counters["version"])

    def _update(self, culprits: Any) -> None:
        """One optimizer step on the owned range from ``self.grads``; a non-finite gradient is an error
        naming the workers ``culprits()`` returns."""
        if not finite(self.grads):
            raise FloatingPointError(
                f"server rank {self.comm.rank}: update {self.version + 1}: non-finite gradients from worker(s) "
                f"{culprits()}"
            )
        self.optimizer.step(self.owned)
        self.version += 1

    def _answer(self, worker: int, ticket: int = -1) -> None:
        self.answer[:] = self.version, ticket
        self.comm.send(self.answer, worker, PULL)
        self.comm.send(self.params, worker, PULL_DATA)

    def _pushed(self, worker: int) -> None:
        self.last_push[worker] = time.monotonic()

    def post(self, worker: int, into: np.ndarray) -> None:
        """Post the receive of ``worker``'s next push, its gradient into ``into``."""
        comm = self.comm
        self._posted[worker] = (comm.irecv(self.heads[worker], worker, PUSH), comm.irecv(into, worker, PUSH_DATA))

    def next_push(self) -> int:
        """Wait for the next push of a worker with a posted receive; that worker (its receive is done)."""
        workers = list(self._posted)
        index = self.comm.wait_any([self._posted[w][0] for w in workers], note=self._note)
        worker = workers[index]
        self._posted.pop(worker)[1].wait()
        self._pushed(worker)
        return worker

    def close(self) -> None:
        """Cancel the receives still posted (no worker pushes any more)."""
        for requests in self._posted.values():
            for request in requests:
                request.cancel()
        self._posted.clear()

    def _note(self) -> str:
        """Which workers a server waits for, for the watchdog's report."""
        now = time.monotonic()
        since = ", ".join(f"rank {w}: {now - t:.1f} s" for w, t in enumerate(self.last_push))
        return f"server rank {self.comm.rank} awaits pushes; since each worker's last push: {since}"


class RoundServer(Server):
    """Rounds: the W gradients of a clock are summed in worker order, averaged, applied once.

    ``depth`` rounds may be in flight at once (buffers are made on first use).
    """

    def __init__(self, strategy: Any, index: int, depth: int) -> None:
        super().__init__(strategy, index)
        self.depth = depth
        self._slots: dict[int, np.ndarray] = {}

    def slots(self, clock: int) -> np.ndarray:
        """The (workers, range) gradient buffers of round ``clock``."""
        key = clock % self.depth
        if key not in self._slots:
            self._slots[key] = np.empty((self.workers, self.grads.size), self.grads.dtype)
        return self._slots[key]

    def apply_round(self, slots: np.ndarray) -> None:
        grads = self.grads
        np.copyto(grads, slots[0])
        for gradient in slots[1:]:
            grads += gradient
        grads /= self.workers
        self._update(lambda: [w for w in range(self.workers) if not finite(slots[w])])


class SyncServer(RoundServer):
    """ps-sync: every step, receive one gradient from each worker, update (summed in worker order), and
    answer them all, the last to arrive first: it is the slowest, on the critical path."""

    def __init__(self, strategy: Any, index: int) -> None:
        super().__init__(strategy, index, depth=1)

    def serve(self, pushes: int) -> None:
        for _ in range(pushes // self.workers):
            slots = self.slots(0)
            for w in range(self.workers):
                self.post(w, slots[w])
            arrived = [self.next_push() for _ in range(self.workers)]  # an overdue wait names who is missing
            self.apply_round(slots)
            for w in reversed(arrived):
                self._answer(w)


class SSPServer(RoundServer):
    """ps-ssp: pushes in arrival order; round c is applied once every worker has pushed clock c; a
    worker that pushed clock c is answered once round c - K is applied, so it never computes more than
    K clocks ahead of the slowest. ``max_spread`` logs the largest lead granted."""

    def __init__(self, strategy: Any, index: int) -> None:
        self.staleness = strategy.options.staleness
        super().__init__(strategy, index, depth=self.staleness + 1)
        self.clocks = np.zeros(self.workers, np.int64)
        self.waiting: list[tuple[int, int]] = []  # (worker, clock it pushed) not yet answered
        self.max_spread = 0
        self._started = False

    def serve(self, pushes: int) -> None:
        if not self._started:  # here, not at construction: a resume sets the clocks first
            self._started = True
            for worker in range(self.workers):
                self.post(worker, self.slots(int(self.clocks[worker]) + 1)[worker])
        for _ in range(pushes):
            worker = self.next_push()
            clock = int(self.heads[worker][0])
            if clock != self.clocks[worker] + 1:
                raise RuntimeError(
                    f"server rank {self.comm.rank}: worker {worker} pushed clock {clock}, "
                    f"expected {self.clocks[worker] + 1}"
                )
            self.clocks[worker] = clock
            while self.clocks.min() > self.version:
                self.apply_round(self.slots(self.version + 1))
            self.waiting.append((worker, clock))
            self._flush()

    def _flush(self) -> None:
        """Answer every waiting worker whose bound is met, the latest pusher first: it is the slowest (its
        push completed the round), so the critical path waits for no other answer."""
        waiting, self.waiting = self.waiting, []
        for worker, clock in reversed(waiting):
            if self.version >= clock - self.staleness:
                self.max_spread = max(self.max_spread, clock - int(self.clocks.min()))
                self._answer(worker)
                # The slot of its next clock held round clock - K, which is applied: free to receive into.
                self.post(worker, self.slots(clock + 1)[worker])
            else:
                self.waiting.insert(0, (worker, clock))

    def counters(self) -> dict[str, Any]:
        return {**super().counters(), "max_spread": self.max_spread}

    def restore(self, counters: dict[str, Any]) -> None:
        super().restore(counters)
        self.clocks[:] = self.version
        self.max_spread = int(counters.get("max_spread", 0))


class AsyncServer(Server):
    """ps-async: each push is applied on arrival (scaled by 1/(1 + staleness) with --staleness-lr, where
    staleness counts the updates since the worker's copy) and answered at once; server 0 also hands the
    worker its next ticket."""

    def __init__(self, strategy: Any, index: int) -> None:
        super().__init__(strategy, index)
        self.scale = strategy.options.staleness_lr
        self.inbox = np.empty((self.workers, self.grads.size), self.grads.dtype)  # each worker's next push
        self.next_ticket = self.end_ticket = 0
        self.staleness_total = self.max_staleness = 0

    def tickets(self, first: int, end: int) -> None:
        """Hand out tickets ``first .. end - 1`` (server 0 only; the others answer -1)."""
        self.next_ticket, self.end_ticket = first, end

    def serve(self, pushes: int) -> None:
        if not self._posted:
            for worker in range(self.workers):
                self.post(worker, self.inbox[worker])
        for _ in range(pushes):
            worker = self.next_push()
            np.copyto(self.grads, self.inbox[worker])
            self.post(worker, self.inbox[worker])  # its next push may come while this one is applied
            staleness = self.version - int(self.heads[worker][1])
            if self.scale and staleness:
                self.grads *= 1.0 / (1 + staleness)
            self.staleness_total += staleness
            self.max_staleness = max(self.max_staleness, staleness)
            self._update(lambda: [worker])  # noqa: B023 - called at once
            ticket = -1
            if self.index == 0 and self.next_ticket < self.end_ticket:
                ticket, self.next_ticket = self.next_ticket, self.next_ticket + 1
            self._answer(worker, ticket)

    def counters(self) -> dict[str, Any]:
        mean = self.staleness_total / self.version if self.version else 0.0
        return {**super().counters(), "mean_staleness": mean, "max_staleness": self.max_staleness}


SERVERS = {"sync": SyncServer, "ssp": SSPServer, "async": AsyncServer}


def server_for(strategy: Any, index: int) -> Server:
    """The server of ``strategy.mode`` for range ``index``."""
    return SERVERS[strategy.mode](strategy, index)
