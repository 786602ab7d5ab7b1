"""Ring reduce-scatter, all-gather and all-reduce over point-to-point messages.

The flat buffer of n elements is cut into p chunks (p = ranks), chunk i being
``[i*n//p, (i+1)*n//p)`` on every rank. Rank r sends to r+1 and receives from
r-1. With p = 4 the chunk each rank SENDS at each step is:

    reduce-scatter (receiver adds the chunk into its own copy)
                 rank0  rank1  rank2  rank3
      step 0       c3     c0     c1     c2
      step 1       c2     c3     c0     c1
      step 2       c1     c2     c3     c0
      -> rank r now holds the fully reduced chunk r

    all-gather (receiver overwrites its copy of the chunk)
      step 0       c0     c1     c2     c3
      step 1       c3     c0     c1     c2
      step 2       c2     c3     c0     c1
      -> every rank holds every reduced chunk

2(p-1) steps; each rank sends and receives 2(p-1)/p of the buffer, which is
bandwidth-optimal. Each chunk is summed once, on one rank, along the ring and
then copied, so every rank ends with bit-identical results.

Every step is cut into messages: up to WINDOW sends are in flight at once.
The all-gather's messages are a segment long and land straight in the
buffer. The reduce-scatter's are half a segment: while piece k is being
added, piece k+1 is already arriving into the other half of a one-segment
scratch buffer. That scratch is the only extra memory, owned and reused by
the caller; the Python state is a few objects whatever the buffer's size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from mpi4py import MPI

TAG = 0x52  # messages of this module on the communicator's private duplicate
WINDOW = 4  # segment messages in flight per direction

Combine = Callable[..., Any]  # f(a, b, out=...): the element-wise reduction of two buffers


def chunk_bounds(n: int, p: int) -> list[tuple[int, int]]:
    """(start, stop) of the p chunks of an n-element buffer; the same on every rank."""
    return [(i * n // p, (i + 1) * n // p) for i in range(p)]


def _segments(length: int, segment: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each segment of a ``length``-element view, generated lazily (no per-segment list)."""
    return ((a, min(a + segment, length)) for a in range(0, length, segment))


class _Sends:
    """Segment sends of one view, at most ``WINDOW`` in flight: bounded Python state however large the buffer."""

    def __init__(self, comm: MPI.Comm, view: Any, dest: int, segment: int) -> None:
        self.comm, self.view, self.dest = comm, view, dest
        self.todo = _segments(len(view), segment)
        self.left = -(-len(view) // segment)  # sends not yet posted
        self.flying: deque[MPI.Request] = deque()
        self.pump()

    def pump(self) -> None:
        """Retire finished sends from the front and post more, up to the window."""
        while self.flying and self.flying[0].Test():
            self.flying.popleft()
        while len(self.flying) < WINDOW and self.left:
            a, b = next(self.todo)
            self.flying.append(self.comm.Isend(self.view[a:b], dest=self.dest, tag=TAG))
            self.left -= 1

    def finish(self) -> None:
        """Post what is left and wait for every send."""
        while self.left or self.flying:
            if self.flying:
                self.flying.popleft().Wait()
            self.pump()


def _piece(segment: int) -> int:
    """Length of a reduce-scatter message: half a segment, so two in flight fit one segment of scratch."""
    return max(1, segment // 2)


def _recv_reduce(comm: MPI.Comm, view: Any, source: int, piece: int, scratch: Any, reduce: Combine, sends: _Sends):
    """Receive ``view`` in pieces and reduce each into ``view``, the next piece arriving meanwhile."""
    slots = (scratch[:piece], scratch[piece : 2 * piece])
    pieces = _segments(len(view), piece)
    upcoming = next(pieces, None)
    pending = None if upcoming is None else comm.Irecv(slots[0][: upcoming[1] - upcoming[0]], source=source, tag=TAG)
    k = 0
    while upcoming is not None:
        (a, b), current = upcoming, pending
        upcoming = next(pieces, None)
        if upcoming is not None:
            pending = comm.Irecv(slots[(k + 1) % 2][: upcoming[1] - upcoming[0]], source=source, tag=TAG)
        current.Wait()
        reduce(view[a:b], slots[k % 2][: b - a], out=view[a:b])
        sends.pump()
        k += 1


def reduce_scatter(comm: MPI.Comm, buf: Any, reduce: Combine, segment: int, scratch: Any) -> tuple[int, int]:
    """Ring reduce-scatter in place; returns the (start, stop) of chunk ``rank``, which this rank now owns.

    Contract: same length and dtype on every rank; ``scratch`` holds at least
    two half-segments. Afterwards chunk ``rank`` of ``buf`` holds the
    reduction over all ranks; other chunks hold partial results. Cost: p-1
    steps, (p-1)/p of the buffer sent.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    bounds = chunk_bounds(len(buf), p)
    right, left = (r + 1) % p, (r - 1) % p
    piece = _piece(segment)
    for step in range(p - 1):
        s0, s1 = bounds[(r - step - 1) % p]
        r0, r1 = bounds[(r - step - 2) % p]
        sends = _Sends(comm, buf[s0:s1], right, piece)
        _recv_reduce(comm, buf[r0:r1], left, piece, scratch, reduce, sends)
        sends.finish()
    return bounds[r]


def allgather(comm: MPI.Comm, buf: Any, segment: int) -> None:
    """Ring all-gather in place: chunk ``rank`` of ``buf`` is this rank's contribution.

    Contract: same length and dtype on every rank. Messages land directly in ``buf``
    (no scratch). Cost: p-1 steps, (p-1)/p of the buffer sent.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    bounds = chunk_bounds(len(buf), p)
    right, left = (r + 1) % p, (r - 1) % p
    for step in range(p - 1):
        s0, s1 = bounds[(r - step) % p]
        r0, r1 = bounds[(r - step - 1) % p]
        recvs: deque[MPI.Request] = deque()
        sends = _Sends(comm, buf[s0:s1], right, segment)
        for a, b in _segments(r1 - r0, segment):  # receives straight into buf, WINDOW in flight
            if len(recvs) == WINDOW:
                recvs.popleft().Wait()
            recvs.append(comm.Irecv(buf[r0 + a : r0 + b], source=left, tag=TAG))
            sends.pump()
        while recvs:
            recvs.popleft().Wait()
            sends.pump()
        sends.finish()


def allreduce(
    comm: MPI.Comm,
    buf: Any,
    reduce: Combine,
    segment: int,
    scratch: Any,
    finish: Callable[[Any], None] | None = None,
) -> None:
    """Ring all-reduce in place: reduce-scatter, ``finish`` on the owned chunk, all-gather.

    Contract: same length and dtype on every rank. ``finish`` (for example
    the division of a mean) runs once per element, on the owning rank, before
    the chunk is copied to the others. Cost: 2(p-1) steps, 2(p-1)/p of the
    buffer sent and received per rank, one segment of scratch.
    """
    start, stop = reduce_scatter(comm, buf, reduce, segment, scratch)
    if finish is not None:
        finish(buf[start:stop])
    allgather(comm, buf, segment)
