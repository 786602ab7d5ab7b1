"""A watchdog thread that ends the whole job when a collective or a step stops making progress.

A rank that is stuck (a peer died, hangs, or skipped a collective) would
otherwise wait forever. Every watched region records what it is and when it
began; when one has run longer than ``timeout`` seconds the watchdog prints,
on this rank, what it was waiting in and which ranks of its node have not
yet entered that collective (from counters in node-shared memory), then
calls ``MPI_Abort`` so ``mpiexec`` ends every rank with a non-zero status.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
from mpi4py import MPI

EXIT_TIMEOUT = 3


class Watchdog:
    """Watches regions of this rank and aborts the job when one outlives ``timeout`` seconds.

    Args:
        rank: this rank (for the message).
        timeout: seconds a watched region may take.
        entered: this rank's node-shared counter of the collectives it has entered,
            and ``peers``: every node-local rank's counter with its global rank.
        abort: what ends the job (default ``MPI.COMM_WORLD.Abort``); tests replace it.
        grace: seconds between printing the message and aborting.
    """

    def __init__(
        self,
        rank: int,
        timeout: float,
        entered: np.ndarray | None = None,
        peers: list[tuple[int, np.ndarray]] | None = None,
        abort: Callable[[int], None] | None = None,
        grace: float = 1.0,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.rank, self.timeout = rank, float(timeout)
        self.entered, self.peers = entered, peers or []
        self.abort, self.grace = abort or MPI.COMM_WORLD.Abort, grace
        self._active: dict[int, tuple[str, int | None, float]] = {}
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self.fired: str | None = None
        threading.Thread(target=self._run, name="mpitrain-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def watch(self, what: str, sequence: int | None = None) -> Iterator[None]:
        """Watch the enclosed block; ``sequence`` marks it as collective number ``sequence``."""
        if sequence is not None and self.entered is not None:
            self.entered[0] = sequence
        token = next(self._tokens)
        with self._lock:
            self._active[token] = (what, sequence, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                del self._active[token]

    def _run(self) -> None:
        poll = min(0.5, self.timeout / 4)
        while self.fired is None:
            time.sleep(poll)
            now = time.monotonic()
            with self._lock:
                late = [entry for entry in self._active.values() if now - entry[2] > self.timeout]
            if late:
                self._fire(max(late, key=lambda entry: entry[2]))  # the innermost late region

    def _fire(self, entry: tuple[str, int | None, float]) -> None:
        what, sequence, started = entry
        message = f"[rank {self.rank}] watchdog: {what} has not completed in {time.monotonic() - started:.1f} s"
        if sequence is not None and self.peers:
            behind = [rank for rank, counter in self.peers if rank != self.rank and int(counter[0]) < sequence]
            message += f"; ranks on this node that have not entered it: {behind if behind else 'none'}"
        self.fired = message
        print(message + f" (timeout {self.timeout:g} s); aborting the job", file=sys.stderr, flush=True)
        # The launcher forwards output asynchronously; an immediate abort can lose the message.
        time.sleep(self.grace)
        self.abort(EXIT_TIMEOUT)
