"""mpitrain: neural-network training over MPI with collectives of its own, and a Horovod-style library.

    import mpitrain as mt
    mt.init()
    total = mt.allreduce(local_sum, op="sum")

The library names (``init``, ``allreduce``, ``DistributedOptimizer``, ... see
``mpitrain.api``) load on first use, so ``import mpitrain.nn`` alone never
starts MPI.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

API = (
    "init",
    "shutdown",
    "is_initialized",
    "communicator",
    "rank",
    "size",
    "local_rank",
    "local_size",
    "cross_rank",
    "cross_size",
    "allreduce",
    "allreduce_async",
    "grouped_allreduce",
    "broadcast",
    "allgather",
    "broadcast_object",
    "allgather_object",
    "barrier",
    "join",
    "broadcast_parameters",
    "broadcast_optimizer_state",
    "DistributedOptimizer",
    "Handle",
)
SUBPACKAGES = ("nn", "optim", "data", "comm", "parallel")


def __getattr__(name: str) -> Any:
    if name in API:
        return getattr(importlib.import_module("mpitrain.api"), name)
    if name in SUBPACKAGES:
        return importlib.import_module(f"mpitrain.{name}")
    raise AttributeError(f"module 'mpitrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API, *SUBPACKAGES])


__all__ = [*API, *SUBPACKAGES, "__version__"]
