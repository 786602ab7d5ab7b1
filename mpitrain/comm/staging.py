"""Collectives on a user's own (private) arrays through a persistent node-shared staging area.

A private array cannot be read by a peer, so the shared-memory algorithms
of ``shm`` cannot run on it in place. Horovod's answer is a fusion buffer
the tensors are copied into; here every rank keeps a staging area in a
node-shared window, allocated once and grown on demand, and only the parts
a peer must read pass through it. All-reduce, for node rank ``me`` owning
chunk ``me`` of ``p``:

    1. copy in: every chunk but ``me`` into this rank's area (p-1)/p of the array;
    2. sync; reduce chunk ``me`` straight into the private array, reading the
       peers' areas a segment at a time (this rank's own part is never copied
       in), finish it and copy it into this rank's area while in cache;
       across nodes, the ring all-reduces the chunk between nodes first;
    3. sync; copy out: every other chunk from its owner's area.

So the copy in is fused into the reduction's first pass and the copy out
into its last: each rank copies (p-1)/p of the array in and out, against the
in-place shared-memory algorithm's none, and MPI's shared-memory transport
copies every message into and out of its cells. Each chunk is reduced once
and copied, so results are bit-identical on every rank. Reduce-scatter is
steps 1-2, all-gather copies this rank's chunk in and the others out,
broadcast copies the root's array in and every reader copies it out.

The area has two halves used in turn, and in each half chunk q always
has the same slot, so one sync per piece suffices: a rank writes a slot
again only after a sync that every reader of its last contents passes after
reading it. Arrays larger than a half run in pieces, each a slice of every
rank's chunk (chunk ownership stays the whole array's, as in ``shm``), and
all-reduce overlaps them: the sync that publishes piece k's inputs also
publishes piece k-1's results, so K pieces take K + 1 syncs. Pieces that
fit in cache beat one pass over a large array (2 ranks, 16 MiB: 1.4x
native with 2 MiB halves, 0.85x with 16 MiB ones, which spill out of L3).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from mpitrain.comm import ring, tree
from mpitrain.comm.shm import Reduction, SharedBuffers


class Staging:
    """The staging area of one Communicator's node and the collectives that go through it.

    Args:
        shared: the node's shared memory (its node and cross communicators, its sync).
        limit_bytes: the most one half of the area holds (larger arrays run in pieces).

    Every method is collective on the whole communicator, with the same count
    and dtype on every rank; chunk i of ``ring.chunk_bounds(count, node size)``
    belongs to node rank i, the same chunk on every node.
    """

    def __init__(self, shared: SharedBuffers, limit_bytes: int) -> None:
        self.shared = shared
        ranks = shared.node.Get_size()
        self.slot = max(64, limit_bytes // ranks // 64 * 64)  # bytes of one chunk's slice, a cache line multiple
        self.half = self.slot * ranks
        self.win: MPI.Win | None = None
        self.areas: list[np.ndarray] = []  # every node rank's area (uint8), in node rank order
        self.turn = 0

    def allreduce(self, flat: np.ndarray, how: Reduction) -> None:
        """All-reduce ``flat`` in place (module doc, steps 1-3)."""
        published = None  # the piece whose results the next sync publishes
        for ranges, areas in self._pieces(flat):
            self._copy_in(flat, ranges, areas)
            self.shared.sync(self.win)
            if published is not None:
                self._copy_out(flat, *published)
            self._reduce_own(flat, ranges, areas, how, share=True)
            published = ranges, areas
        self.shared.sync(self.win)
        self._copy_out(flat, *published)

    def reduce_scatter(self, flat: np.ndarray, how: Reduction) -> tuple[int, int]:
        """Reduce so that this rank's chunk of ``flat`` holds the finished result; return its (start, stop).
        Other chunks keep this rank's values."""
        for ranges, areas in self._pieces(flat):
            self._copy_in(flat, ranges, areas)
            self.shared.sync(self.win)
            self._reduce_own(flat, ranges, areas, how, share=False)
        return ring.chunk_bounds(flat.size, self.shared.node.Get_size())[self.shared.node.Get_rank()]

    def allgather(self, flat: np.ndarray) -> None:
        """Fill ``flat``'s chunk i from node rank i's chunk (every node holds the same chunks)."""
        me = self.shared.node.Get_rank()
        for ranges, areas in self._pieces(flat):
            (a, b), start = ranges[me]
            np.copyto(areas[me][start : start + b - a], flat[a:b])
            self.shared.sync(self.win)
            self._copy_out(flat, ranges, areas)

    def broadcast(self, flat: np.ndarray, root: int) -> None:
        """Copy ``flat`` from rank ``root`` of the whole communicator to every rank."""
        me = self.shared.node.Get_rank()
        source, root_cross = self.shared.placement[root]
        piece = self.half // flat.dtype.itemsize
        for start in range(0, flat.size, piece):
            part = flat[start : start + piece]
            areas = self._areas(flat.dtype)
            if me == source:
                if self.shared.cross is not None:
                    tree.broadcast(self.shared.cross, part, root_cross)
                np.copyto(areas[me][: part.size], part)
            self.shared.sync(self.win)
            if me != source:
                np.copyto(part, areas[source][: part.size])

    def free(self) -> None:
        """Free the area (collective on the node); a later call allocates a new one."""
        if self.win is not None:
            self.shared.sync(self.win)  # no peer still reads it
            self.win.Unlock_all()
            self.win.Free()
            self.win, self.areas = None, []

    def _pieces(self, flat: np.ndarray):
        """Per piece: every node rank's ((start, stop) in ``flat``, offset of its slot), and the areas.

        Piece k holds the k-th slice of every chunk, so each rank reduces and
        finishes its own chunk whatever the number of pieces.
        """
        chunks = ring.chunk_bounds(flat.size, self.shared.node.Get_size())
        per_chunk = self.slot // flat.dtype.itemsize
        longest = max(b - a for a, b in chunks)
        for k in range(0, longest, per_chunk):
            ranges = [((min(a + k, b), min(a + k + per_chunk, b)), q * per_chunk) for q, (a, b) in enumerate(chunks)]
            yield ranges, self._areas(flat.dtype)

    def _areas(self, dtype: np.dtype) -> list[np.ndarray]:
        """Every node rank's next half, as elements of ``dtype`` (the area is allocated on first use)."""
        if self.win is None:
            self.win, self.areas = self.shared.shared_arrays(2 * self.half, np.uint8)
        start = self.turn * self.half
        self.turn ^= 1
        return [area[start : start + self.half].view(dtype) for area in self.areas]

    def _copy_in(self, flat: np.ndarray, ranges: list, areas: list[np.ndarray]) -> None:
        """Every chunk but this rank's own into its area: what its peers reduce."""
        me = self.shared.node.Get_rank()
        for q, ((a, b), start) in enumerate(ranges):
            if q != me:
                np.copyto(areas[me][start : start + b - a], flat[a:b])

    def _copy_out(self, flat: np.ndarray, ranges: list, areas: list[np.ndarray]) -> None:
        me = self.shared.node.Get_rank()
        for q, ((a, b), start) in enumerate(ranges):
            if q != me:
                np.copyto(flat[a:b], areas[q][start : start + b - a])

    def _reduce_own(self, flat: np.ndarray, ranges: list, areas: list[np.ndarray], how: Reduction, share: bool) -> None:
        """Reduce this rank's range of ``flat`` over the node's areas, across nodes by the ring, finish it,
        and (``share``) copy it into this rank's area for the peers."""
        me = self.shared.node.Get_rank()
        (a, b), base = ranges[me]
        single = self.shared.cross is None
        for start in range(a, b, how.segment):  # a segment at a time: the finish reads from cache
            stop = min(start + how.segment, b)
            mine = flat[start:stop]
            for q, area in enumerate(areas):
                if q != me:
                    how.reduce(mine, area[base + start - a : base + stop - a], out=mine)
            if single:
                self._finish(mine, areas[me][base + start - a : base + stop - a], how, share)
        if not single:
            ring.allreduce(self.shared.cross, flat[a:b], how.reduce, how.segment, how.scratch)
            self._finish(flat[a:b], areas[me][base : base + b - a], how, share)

    @staticmethod
    def _finish(mine: np.ndarray, area: Any, how: Reduction, share: bool) -> None:
        if how.finish is not None:
            how.finish(mine)
        if share:
            np.copyto(area, mine)
