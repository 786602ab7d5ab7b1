"""Recursive-doubling all-reduce, for small (latency-bound) messages.

With p' the largest power of two <= p and e = p - p' extra ranks, the first
2e ranks pair up: each even rank hands its buffer to the odd rank beside it
and waits. The p' remaining ranks then run log2(p') exchange rounds: in round
k, renumbered rank v swaps its whole buffer with v XOR 2^k and adds. Finally
each odd rank of the first 2e returns the result to its even neighbour.

    p = 4:  round 0: 0<->1, 2<->3     round 1: 0<->2, 1<->3

Both partners of a round add the same two operands (a+b and b+a are the same
in IEEE arithmetic), so every rank ends bit-identical. Cost: log2(p') + 2
rounds of the whole buffer; one buffer-sized scratch.
"""

from __future__ import annotations

from typing import Any

from mpi4py import MPI

from mpitrain.comm.ring import Combine

TAG = 0x44


def allreduce(comm: MPI.Comm, buf: Any, reduce: Combine, scratch: Any) -> None:
    """Recursive-doubling all-reduce of ``buf`` in place; ``scratch`` holds at least len(buf) elements.

    Contract: same length and dtype on every rank.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    incoming = scratch[: len(buf)]
    p2 = 1 << (p.bit_length() - 1)
    extra = p - p2
    if r < 2 * extra:
        if r % 2 == 0:
            comm.Send(buf, dest=r + 1, tag=TAG)
            comm.Recv(buf, source=r + 1, tag=TAG)
            return
        comm.Recv(incoming, source=r - 1, tag=TAG)
        reduce(buf, incoming, out=buf)
        v = r // 2
    else:
        v = r - extra
    mask = 1
    while mask < p2:
        w = v ^ mask
        partner = 2 * w + 1 if w < extra else w + extra
        comm.Sendrecv(buf, dest=partner, sendtag=TAG, recvbuf=incoming, source=partner, recvtag=TAG)
        reduce(buf, incoming, out=buf)
        mask <<= 1
    if r < 2 * extra:
        comm.Send(buf, dest=r - 1, tag=TAG)
