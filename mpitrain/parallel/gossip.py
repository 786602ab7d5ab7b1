"""Decentralized parallel SGD (``--strategy gossip``; D-PSGD, Lian et al. 2017): after each local step
every rank averages its parameters with its neighbours only, with no server and no global collective.

Topologies (``--topology``):

- ``ring``: each rank mixes with the ranks before and after it, weight
  1/(1 + neighbours) each (1/3, or 1/2 in a world of two);
- ``exp``: one peer per step at distance 2^i, i rotating with the step
  (peers 1, 2, 4, ... away, as stochastic gradient push's exponential graph),
  weight 1/2: x_r <- (x_r + x_{r - 2^i}) / 2.

Both mixings are doubly stochastic, so a gossip round keeps the global mean
of the replicas: exactly when the additions are exact (weights of 1/2 and
dyadic values), else up to round-off. The replicas differ between rounds;
the consensus model (their mean, ``LocalReplicas.sync``) is what an epoch
evaluates. Deterministic: same seed and world, same replicas.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from mpitrain.comm import Communicator
from mpitrain.parallel.base import Job, register
from mpitrain.parallel.local_replicas import LocalReplicas

TOPOLOGIES = ("ring", "exp")
TAG = 21


@dataclass
class GossipOptions:
    """Options of ``--strategy gossip``."""

    topology: str = "ring"


def peers(topology: str, rank: int, size: int, step: int) -> list[tuple[int, int]]:
    """(send to, receive from) pairs of ``rank`` at ``step`` (0-based); empty in a world of one."""
    if size == 1:
        return []
    if topology == "exp":
        distance = 2 ** (step % max(1, (size - 1).bit_length()))
        return [((rank + distance) % size, (rank - distance) % size)]
    right, left = (rank + 1) % size, (rank - 1) % size
    return [(right, left)] if right == left else [(right, left), (left, right)]


def mix(comm: Communicator, params: np.ndarray, received: list[np.ndarray], pairs: list[tuple[int, int]]) -> None:
    """One gossip round in place: exchange ``params`` with each (dest, source) pair, then take the mean
    of this replica and the received ones (the ``received`` buffers are scratch, one per pair)."""
    for (dest, source), into in zip(pairs, received, strict=False):
        comm.sendrecv(params, dest, into, source, sendtag=TAG, recvtag=TAG)
    for into in received[: len(pairs)]:
        params += into
    if pairs:
        params *= 1.0 / (1 + len(pairs))


@register
class Gossip(LocalReplicas):
    """Decentralized gossip SGD: a local step, then an average with the neighbours (--topology)."""

    name = "gossip"
    Options = GossipOptions

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--topology", choices=TOPOLOGIES, default=GossipOptions.topology, help="neighbours (ring, exp)"
        )

    @classmethod
    def validate(cls, options: GossipOptions, batch_size: int, world_size: int) -> None:
        if options.topology not in TOPOLOGIES:
            raise ValueError(f"unknown --topology {options.topology!r}; expected one of {', '.join(TOPOLOGIES)}")

    def __init__(self, job: Job, comm: Communicator, options: GossipOptions) -> None:
        super().__init__(job, comm, options)
        self._received = [job.xp.empty_like(self.model.flat_params) for _ in range(2)]

    def communicate(self) -> None:
        self.optimizer.step()
        pairs = peers(self.options.topology, self.comm.rank, self.comm.size, self.steps - 1)
        with self.waiting():
            mix(self.comm, self.model.flat_params, self._received, pairs)
