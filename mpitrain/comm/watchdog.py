"""A watchdog that ends the whole job when a collective or a step stops making progress, or a peer dies.

A rank that is stuck (a peer died, hangs, or skipped a collective) would
otherwise wait forever. Every watched region records what it is and when it
began; when one has run longer than ``timeout`` seconds the watchdog prints,
on this rank, what it was waiting in and which ranks of its node have not
yet entered that collective (from counters in node-shared memory), then
calls ``MPI_Abort`` so ``mpiexec`` ends every rank with a non-zero status.

A second thread waits on the node peers' process ids (Linux pidfds): when a
peer exits without having marked itself finished (a SIGKILL, a crash), this
rank names it and aborts at once. It races the launcher: MPICH's Hydra
(5.0.2) SIGKILLs the survivors about a millisecond after a rank dies, with
``-disable-auto-cleanup`` too (strace on its proxy), so the name gets out
when this thread wins the GIL first: most times, not every time.

``MPI_Abort`` has the launcher end every rank. Where the launcher is gone
(its mpiexec ended while this rank lived on, as when a wrapper script that
did not exec was its child), MPICH's abort can print its line, fail to
reach the launcher and not end the process, which stays blocked where its
other threads were. So the abort is backed by a timer that ends this
process itself ``ABORT_WAIT`` seconds later.
"""

from __future__ import annotations

import atexit
import itertools
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from mpi4py import MPI

EXIT_TIMEOUT = 3  # a watched region outlived the timeout
EXIT_PEER_EXITED = 4  # a node peer exited before finishing
ENTERED, FINISHED = 0, 1  # the slots of a rank's node-shared progress array
GRACE = 1.0  # seconds between a rank's last message and its abort
ABORT_WAIT = 10.0  # seconds MPI_Abort gets to end this process before the process ends itself


def abort_job(code: int, grace: float = GRACE, abort: Callable[[int], None] | None = None) -> None:
    """End the whole job with ``code`` after ``grace`` seconds: the launcher forwards output
    asynchronously, and an immediate MPI_Abort can lose what this rank just printed.

    ``abort`` replaces MPI's (tests). MPI's is backed by a timer that exits
    this process with ``code`` if it is still alive ``ABORT_WAIT`` seconds
    later (an abort with no launcher left to carry it out).
    """
    time.sleep(grace)
    if abort is not None:
        abort(code)
        return
    backstop = threading.Timer(ABORT_WAIT, os._exit, (code,))
    backstop.daemon = True
    backstop.start()
    MPI.COMM_WORLD.Abort(code)


def process_start(pid: int | str = "self") -> int | None:
    """A process's start time (clock ticks after boot, from /proc), or None where it cannot be read.

    With the pid it tells one process from another that got the same pid,
    or from the pid's meaning in another pid namespace (ranks in separate
    containers that share memory).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        return int(text[text.rindex(")") + 2 :].split()[19])  # field 22; the name before it may hold spaces
    except (OSError, ValueError, IndexError):
        return None


class Peer(NamedTuple):
    """A rank of this node as the watchdog sees it."""

    rank: int
    progress: np.ndarray  # node-shared: [last collective entered, 1 once the rank finished cleanly]
    pid: int | None = None
    start: int | None = None  # ``process_start`` as the rank itself read it


class _Region:
    """One watched block (see ``Watchdog.watch``): a plain context manager, as it wraps every collective."""

    __slots__ = ("dog", "sequence", "token", "waiting", "what")

    def __init__(self, dog: Watchdog, what: str | Callable[[], str], sequence: int | None, waiting: bool) -> None:
        self.dog, self.what, self.sequence, self.waiting = dog, what, sequence, waiting

    def __enter__(self) -> None:
        dog = self.dog
        progress = dog.progress
        if self.sequence is not None and progress is not None:
            progress[ENTERED] = self.sequence
        self.token = next(dog._tokens)
        dog._active[self.token] = (self.what, self.sequence, time.monotonic(), self.waiting)

    def __exit__(self, *exc: object) -> None:
        del self.dog._active[self.token]


class Watchdog:
    """Watches regions of this rank and aborts the job when one outlives ``timeout`` seconds or a peer dies.

    Args:
        rank: this rank (for the message).
        timeout: seconds a watched region may take.
        progress: this rank's node-shared progress array (see ``Peer``), and
            ``peers``: every rank of this node, this one included.
        abort: what ends the job (default: ``abort_job``'s ``MPI_Abort``); tests replace it.
        grace: seconds between printing the message and aborting.

    ``stop`` (called at interpreter exit, before MPI finalizes, or by the
    owning Communicator's ``close``) marks this rank finished so that its
    peers take its exit for a clean one. An abort already announced is
    carried out first: stop waits for it, so the job cannot end with 0.
    """

    def __init__(
        self,
        rank: int,
        timeout: float,
        progress: np.ndarray | None = None,
        peers: list[Peer] | None = None,
        abort: Callable[[int], None] | None = None,
        grace: float = GRACE,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.rank, self.timeout = rank, float(timeout)
        self.progress, self.peers = progress, peers or []
        self.abort, self.grace = abort, grace
        self._active: dict[int, tuple[str | Callable[[], str], int | None, float, bool]] = {}
        self._poll = min(0.5, self.timeout / 4)
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self.fired: str | None = None
        self.stopped = False
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = os.pipe()  # stop() ends the peer thread's poll through it
        self._threads = [threading.Thread(target=self._run, name="mpitrain-watchdog", daemon=True)]
        watched = self._open_peers()  # here, not in the thread: a death right after this is not missed
        if watched:
            self._threads.append(
                threading.Thread(target=self._watch_exits, args=(watched,), name="mpitrain-peers", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop watching, end the threads and mark this rank finished, so that its exit alarms no peer.

        Idempotent. Afterwards nothing here touches the node-shared progress
        arrays, so their window may be freed.
        """
        if self.stopped:
            return
        self.stopped = True
        self._stopping.set()
        os.write(self._wake_write, b"x")
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        os.close(self._wake_read)
        os.close(self._wake_write)
        atexit.unregister(self.stop)
        if self.progress is not None:
            self.progress[FINISHED] = 1
        self.progress, self.peers = None, []

    def watch(self, what: str | Callable[[], str], sequence: int | None = None, waiting: bool = False) -> _Region:
        """A context that watches the enclosed block; ``what`` describes it (a callable is only called when
        the block is reported); ``sequence`` marks it as collective number ``sequence``.

        ``waiting``: the block waits on other ranks (a message, a collective).
        Such a block is reported two polls after the timeout, so that when one
        rank is stuck in its own work and the others wait on it, the stuck
        rank's report comes first and names it. While a block runs inside
        another, only the inner one is judged (a rank waiting in a collective
        is reported for that wait, not for the step around it) unless the
        outer one has run for twice the timeout.
        """
        return _Region(self, what, sequence, waiting)

    def _run(self) -> None:
        while not self._stopping.wait(self._poll) and self.fired is None:
            now = time.monotonic()
            # list() of a dict's values runs in C under the GIL: a snapshot while regions come and go
            entries = list(self._active.values())
            if not entries:
                continue
            inner = max(entries, key=lambda entry: entry[2])
            if now - inner[2] > self.timeout + (2 * self._poll if inner[3] else 0.0):
                self._late(inner)
            else:
                overdue = [entry for entry in entries if now - entry[2] > 2 * self.timeout]
                if overdue:
                    self._late(min(overdue, key=lambda entry: entry[2]))

    def _open_peers(self) -> dict[int, Peer]:
        """A pidfd for every other rank of this node whose process this rank can see (Linux), by fd."""
        by_fd: dict[int, Peer] = {}
        if not hasattr(os, "pidfd_open"):
            return by_fd
        for peer in self.peers:
            if peer.rank == self.rank or peer.pid is None:
                continue
            try:
                fd = os.pidfd_open(peer.pid)
            except OSError:  # gone already, or pidfds unsupported: the timeout still covers it
                continue
            if peer.start is None or process_start(peer.pid) != peer.start:
                os.close(fd)  # not the peer's process as this rank sees pids: leave it to the timeout
                continue
            by_fd[fd] = peer
        return by_fd

    def _watch_exits(self, by_fd: dict[int, Peer]) -> None:
        """Wait until a peer's process exits; unless it had finished cleanly, name it and abort."""
        poll = select.poll()
        poll.register(self._wake_read, select.POLLIN)
        for fd in by_fd:
            poll.register(fd, select.POLLIN)
        while by_fd and not self.stopped and self.fired is None:
            for fd, _ in poll.poll():
                if fd == self._wake_read or self.stopped:
                    break
                peer = by_fd.pop(fd)
                poll.unregister(fd)
                os.close(fd)
                if not (self.fired or peer.progress[FINISHED]):
                    where = f"pid {peer.pid} on this node"
                    self._fire(f"rank {peer.rank} ({where}) exited before the job finished", EXIT_PEER_EXITED)
        for fd in by_fd:
            os.close(fd)

    def _late(self, entry: tuple[str | Callable[[], str], int | None, float, bool]) -> None:
        what, sequence, started, _ = entry
        what = what() if callable(what) else what
        message = f"{what} has not completed in {time.monotonic() - started:.1f} s"
        if sequence is not None and self.peers:
            behind = [p.rank for p in self.peers if p.rank != self.rank and int(p.progress[ENTERED]) < sequence]
            message += f"; ranks on this node that have not entered it: {behind if behind else 'none'}"
        self._fire(message + f" (timeout {self.timeout:g} s)", EXIT_TIMEOUT)

    def _fire(self, message: str, code: int) -> None:
        with self._lock:  # one message and one abort, whichever thread comes first
            if self.fired is not None:
                return
            self.fired = f"[rank {self.rank}] watchdog: {message}"
        progress = self.progress
        if progress is not None:
            progress[FINISHED] = 1  # this rank's own exit is the abort, not news for its peers
        sys.stderr.write(self.fired + "; aborting the job\n")  # one write: lines of ranks do not interleave
        sys.stderr.flush()
        abort_job(code, self.grace, self.abort)
