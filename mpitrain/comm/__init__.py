"""Collectives layer: ring, recursive doubling, tree, shared memory, and the Communicator that checks and dispatches."""

from mpitrain.comm.checks import mark_all_ranks, raised_on_all_ranks
from mpitrain.comm.communicator import Communicator
from mpitrain.comm.tuning import Tuning

__all__ = ["Communicator", "Tuning", "mark_all_ranks", "raised_on_all_ranks"]
