"""Collectives layer: ring all-reduce, tree broadcast, and the Communicator that checks and dispatches."""

from mpitrain.comm.communicator import Communicator, mark_all_ranks, raised_on_all_ranks

__all__ = ["Communicator", "mark_all_ranks", "raised_on_all_ranks"]
