"""Binomial-tree broadcast over point-to-point messages.

Ranks are renumbered relative to the root (v = (rank - root) mod p). Rank v
receives from v minus its lowest set bit, then sends to v + m for each power
of two m below that bit, largest first (the root: every power below p).
With p = 6 and root 0:

    round 0:  0 -> 4
    round 1:  0 -> 2, 4 -> 5
    round 2:  0 -> 1, 2 -> 3

ceil(log2 p) rounds; every rank receives the whole buffer once, directly
into its own buffer (no scratch).
"""

from __future__ import annotations

from typing import Any

from mpi4py import MPI

from mpitrain.comm import ring

TAG = 0x54


def broadcast(comm: MPI.Comm, buf: Any, root: int) -> None:
    """Binomial-tree broadcast of ``buf`` from ``root``, in place.

    Contract: same length and dtype on every rank, same root. Cost:
    ceil(log2 p) rounds of the whole buffer.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or len(buf) == 0:
        return
    v = (r - root) % p
    mask = 1
    while mask < p:
        if v & mask:
            comm.Recv(buf, source=(v - mask + root) % p, tag=TAG)
            break
        mask <<= 1
    mask >>= 1
    while mask > 0:
        if v + mask < p:
            comm.Send(buf, dest=(v + mask + root) % p, tag=TAG)
        mask >>= 1


def scatter_allgather(comm: MPI.Comm, buf: Any, root: int, segment: int) -> None:
    """Broadcast for large buffers (van de Geijn): scatter the chunks, then ring all-gather.

    The root sends chunk q (``ring.chunk_bounds``) to rank q; then every rank
    holds its own chunk and the ring all-gather completes the buffer. Cost:
    about 2(p-1)/p of the buffer through each link instead of log2(p) whole
    buffers. Contract: same length, dtype and root on every rank.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or len(buf) == 0:
        return
    bounds = ring.chunk_bounds(len(buf), p)
    if r == root:
        sends = [comm.Isend(buf[a:b], dest=q, tag=TAG) for q, (a, b) in enumerate(bounds) if q != root and b > a]
        MPI.Request.Waitall(sends)
    else:
        a, b = bounds[r]
        if b > a:
            comm.Recv(buf[a:b], source=root, tag=TAG)
    ring.allgather(comm, buf, segment)
