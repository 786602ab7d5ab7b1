"""Node-shared buffers (MPI-3 shared-memory windows) and the all-reduce that reads peers' memory.

``SharedBuffers.allocate`` gives each rank an array that every rank on its
node can read directly. All-reduce on such buffers needs no messages inside
a node:

    1. sync; rank i sums chunk i of every node-local buffer into its own chunk i
       (reading its peers' memory: no copies into messages, no scratch), a
       segment at a time, finishes each segment (the division of a mean, a
       caller's inspection) and writes it into every peer's chunk i while it
       is still in cache (nobody else reads chunk i of a peer's buffer);
    2. across nodes, ranks with the same node-local index all-reduce chunk i
       with the ring (hierarchical all-reduce, as Horovod and NCCL do), then
       finish it and write it into the peers' buffers;
    3. sync: every chunk has reached every buffer.

Writing the result into the peers' buffers, instead of each rank copying
the other chunks out of their owners' buffers after another sync, saves a
barrier and a pass over the buffer (README, "Collectives"). ``reduce_scatter`` and
``allgather`` are steps 1-2 without the writes, and the copies.

Broadcast is the same idea: the root's buffer reaches the rank with the
root's node-local index on every node (binomial tree between nodes), then
every other rank of a node copies it from that rank's memory: one copy per
reader instead of a message's copy-in and copy-out.

Each chunk is reduced by one rank and copied to the others, so results are
bit-identical. Cost per rank: read n bytes (its chunk from every buffer of
the node) and write n (its chunk into every buffer), 2 node barriers; no
extra memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

from mpitrain.comm import ring, tree
from mpitrain.comm.watchdog import Peer, process_start

SLOTS = 4  # int64 slots per rank beside the barrier's counter (two turns of (digest, flag))
YIELDS = 1000  # barrier checks that yield the core before it naps (about 1 ms when nothing else runs)
NAP = 20e-6  # seconds between later checks (the kernel's timer slack makes it about 70 us)


@dataclass
class Reduction:
    """How an all-reduce combines and finishes values: ``reduce(a, b, out=...)``, ``finish(chunk)``
    (or None) on each fully reduced part, and the ring's segment (elements) and scratch for the
    part across nodes."""

    reduce: Callable[..., Any]
    finish: Callable[[Any], None] | None
    segment: int
    scratch: Any


@dataclass
class _Window:
    win: MPI.Win
    peers: list[np.ndarray]  # every node-local rank's array, in node rank order
    base: int  # address of this rank's array
    nbytes: int


class SharedBuffers:
    """Arrays in shared memory, one per rank, readable by all ranks of a node.

    Args:
        node: the node-local communicator (``Split_type(COMM_TYPE_SHARED)``).
        cross: communicator of the ranks with the same node-local rank on
            every node, or None on a single node.
        placement: for every rank of the whole communicator, its (node rank, cross rank).
    """

    def __init__(self, node: MPI.Comm, cross: MPI.Comm | None, placement: list[tuple[int, int]]) -> None:
        self.node, self.cross, self.placement = node, cross, placement
        self.windows: list[_Window] = []
        # The barrier's counters: a window of their own, created with the first buffer (windows are
        # made on first use, so a communicator that never allocates holds none).
        self._arrival_win: MPI.Win | None = None
        self._arrived: list[np.ndarray] = []
        self._slots: list[np.ndarray] = []
        self._rounds = 0

    @classmethod
    def over(cls, comm: MPI.Comm, node: MPI.Comm, watched: bool) -> tuple[SharedBuffers | None, bool]:
        """The node-shared memory of ``comm`` given its node communicator ``node`` (None, with ``node``
        freed, when nodes hold different numbers of ranks), and whether any rank passed ``watched``
        (collective)."""
        reports = comm.allgather((node.Get_size(), watched))
        watched = any(w for _, w in reports)
        if len({size for size, _ in reports}) != 1:  # uneven nodes: no hierarchical path, plain ring instead
            node.Free()
            return None, watched
        cross = comm.Split(node.Get_rank(), key=comm.Get_rank()) if node.Get_size() < comm.Get_size() else None
        placement = comm.allgather((node.Get_rank(), 0 if cross is None else cross.Get_rank()))
        return cls(node, cross, placement), watched

    def progress(self, rank: int) -> tuple[np.ndarray, list[Peer]]:
        """A node-shared progress array for this rank's watchdog, and every node-local rank as a ``Peer``
        (collective on the node)."""
        array = self.allocate(2, np.int64)
        members = self.node.allgather((rank, os.getpid(), process_start()))
        peers = self.windows[-1].peers
        return array, [Peer(r, peer, pid, start) for (r, pid, start), peer in zip(members, peers, strict=True)]

    def shared_arrays(self, count: int, dtype: Any) -> tuple[MPI.Win, list[np.ndarray]]:
        """A new shared window and every node-local rank's zeroed array in it (collective on the node).

        The first one also creates the barrier's arrival counters, so ``sync`` works from then on."""
        self.slots()
        return self._window(count, np.dtype(dtype))

    @property
    def counters_window(self) -> MPI.Win:
        """The window of the barrier's counters and the slots (after ``slots``)."""
        return self._arrival_win

    def slots(self) -> list[np.ndarray]:
        """Every node rank's ``SLOTS`` int64 slots for small agreements (``checks.QuickAgreement``), in the
        window of the barrier's counters: created with it, on first use (collective on the node then)."""
        if self._arrival_win is None:
            self._arrival_win, counters = self._window(1 + SLOTS, np.dtype(np.int64))
            self._arrived = [c[:1] for c in counters]
            self._slots = [c[1:] for c in counters]
        return self._slots

    def _window(self, count: int, dtype: np.dtype) -> tuple[MPI.Win, list[np.ndarray]]:
        win = MPI.Win.Allocate_shared(count * dtype.itemsize, dtype.itemsize, comm=self.node)
        win.Lock_all(MPI.MODE_NOCHECK)
        peers = []
        for q in range(self.node.Get_size()):
            memory, _ = win.Shared_query(q)
            peers.append(np.frombuffer(memory, dtype=dtype, count=count))
        peers[self.node.Get_rank()].fill(0)
        return win, peers

    def allocate(self, count: int, dtype: Any) -> np.ndarray:
        """A zeroed array of ``count`` elements in a new shared window (collective on the node)."""
        win, peers = self.shared_arrays(count, dtype)
        own = peers[self.node.Get_rank()]
        self.windows.append(_Window(win, peers, own.__array_interface__["data"][0], own.nbytes))
        self.sync(win)
        return own

    def find(self, buf: np.ndarray) -> tuple[_Window, int] | None:
        """(window, element offset) when ``buf`` lies inside one of this rank's shared arrays."""
        if not isinstance(buf, np.ndarray) or buf.size == 0 or not self.windows:
            return None
        address = buf.__array_interface__["data"][0]
        for window in self.windows:
            if window.base <= address and address + buf.nbytes <= window.base + window.nbytes:
                if window.peers[0].dtype != buf.dtype:
                    return None
                return window, (address - window.base) // buf.dtype.itemsize
        return None

    def allreduce(self, window: _Window, offset: int, count: int, how: Reduction) -> None:
        """All-reduce ``count`` elements at ``offset`` of every rank's array in ``window`` (see module doc).

        Contract: the same window, offset and count on every rank.
        """
        self._reduce_own(window, offset, count, how, share=True)
        self.sync(window.win)

    def reduce_scatter(self, window: _Window, offset: int, count: int, how: Reduction) -> tuple[int, int]:
        """Steps 1 and 2 of the all-reduce without the writes into peers: this rank's chunk (node rank i:
        chunk i of ``node size``) ends reduced over all ranks and finished; returns its (start, stop)
        relative to ``offset``.

        The ranks of one node rank on different nodes own the same chunk (with
        bit-identical values). Contract: as ``allreduce``.
        """
        bounds = self._reduce_own(window, offset, count, how, share=False)
        self.sync(window.win)  # peers have read this rank's buffer before the caller changes it
        return bounds

    def allgather(self, window: _Window, offset: int, count: int) -> None:
        """The other half of ``reduce_scatter``: every rank copies chunk i from the node rank i that owns it.

        Contract: as ``allreduce``; chunks as ``reduce_scatter`` returns them.
        """
        self.sync(window.win)
        self._copy_peers(window, offset, count)
        self.sync(window.win)

    def _reduce_own(self, window: _Window, offset: int, count: int, how: Reduction, share: bool) -> tuple[int, int]:
        """Steps 1 and 2; with ``share`` each finished part is also written into the peers' buffers."""
        me, p = self.node.Get_rank(), self.node.Get_size()
        a, b = ring.chunk_bounds(count, p)[me]
        self.sync(window.win)
        # A segment at a time, so a finish on one node reads what the reduction just wrote from cache
        # (2 ranks, 3.6 MiB chunks: sum, mean and finiteness check 12% faster than whole-chunk passes).
        for start in range(offset + a, offset + b, how.segment):
            stop = min(start + how.segment, offset + b)
            mine = window.peers[me][start:stop]
            for q in range(p):
                if q != me:
                    how.reduce(mine, window.peers[q][start:stop], out=mine)
            if self.cross is None:
                self._finish(window, start, stop, how, share)
        if self.cross is not None:
            ring.allreduce(self.cross, window.peers[me][offset + a : offset + b], how.reduce, how.segment, how.scratch)
            self._finish(window, offset + a, offset + b, how, share)
        return a, b

    def _finish(self, window: _Window, start: int, stop: int, how: Reduction, share: bool) -> None:
        me = self.node.Get_rank()
        mine = window.peers[me][start:stop]
        if how.finish is not None:
            how.finish(mine)
        if share:
            for q, peer in enumerate(window.peers):
                if q != me:
                    np.copyto(peer[start:stop], mine)

    def _copy_peers(self, window: _Window, offset: int, count: int) -> None:
        me = self.node.Get_rank()
        for q, (a, b) in enumerate(ring.chunk_bounds(count, self.node.Get_size())):
            if q != me:
                np.copyto(window.peers[me][offset + a : offset + b], window.peers[q][offset + a : offset + b])

    def broadcast(self, window: _Window, offset: int, count: int, root: int) -> None:
        """Copy ``count`` elements at ``offset`` from rank ``root`` (of the whole communicator) to every rank.

        Contract: the same window, offset, count and root on every rank.
        """
        me = self.node.Get_rank()
        source, root_cross = self.placement[root]
        views = [peer[offset : offset + count] for peer in window.peers]
        if self.cross is not None and me == source:
            tree.broadcast(self.cross, views[me], root_cross)
        self.sync(window.win)
        if me != source:
            np.copyto(views[me], views[source])
        self.sync(window.win)

    def sync(self, win: MPI.Win) -> None:
        """Node barrier that also orders memory: writes before it are seen by every peer after it
        (collective on the node)."""
        win.Sync()  # this rank's writes are visible before its arrival is
        self._barrier()
        win.Sync()  # and peers' writes before anything after it reads them

    def _barrier(self) -> None:
        """Node barrier on shared arrival counters that gives the core away while it waits.

        MPI's barrier busy-polls, so a rank's gradient thread waiting in it for
        a slower peer takes the core from its own main thread (and slows
        its backward when ranks share cores). Here a waiting
        rank yields the core, and after ``YIELDS`` tries naps ``NAP`` seconds
        between checks. Round n ends when every rank has arrived n times.
        """
        self._rounds += 1
        self._arrived[self.node.Get_rank()][0] = self._rounds
        tries = 0
        while any(int(arrived[0]) < self._rounds for arrived in self._arrived):
            tries += 1
            if tries < YIELDS:
                os.sched_yield()
            else:
                time.sleep(NAP)

    def release(self, window: _Window) -> None:
        """Free one window and the arrays in it (collective on the node)."""
        self.sync(window.win)  # no peer still reads it
        self.windows.remove(window)
        window.win.Unlock_all()
        window.win.Free()

    def free(self) -> None:
        """Release every window and the node communicators (collective on the node)."""
        self.node.Barrier()
        wins = [w.win for w in self.windows] + ([self._arrival_win] if self._arrival_win is not None else [])
        for win in wins:
            win.Unlock_all()
            win.Free()
        self.windows.clear()
        self._arrival_win, self._arrived, self._slots = None, [], []
        for comm in (self.node, self.cross):
            if comm is not None:
                comm.Free()
