"""The replica check: every rank that should hold the same parameters holds the same bytes."""

from __future__ import annotations

import hashlib
from typing import Any

from mpitrain import backend
from mpitrain.comm import Communicator, mark_all_ranks


def digest(values: Any) -> str:
    """sha256 of an array's bytes (host or device)."""
    return hashlib.sha256(backend.to_host(values).tobytes()).hexdigest()


def check_replicas(comm: Communicator, values: Any, what: str = "parameters") -> None:
    """Compare the digests of ``values`` across ``comm`` (collective).

    Raises:
        RuntimeError: on every rank, naming the ranks whose bytes differ from rank 0's.
    """
    if comm.size == 1:  # one replica cannot differ from itself
        return
    digests = comm.allgather_object(digest(values))
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise mark_all_ranks(RuntimeError(f"replicas diverged: ranks {differ} hold {what} different from rank 0's"))
