"""Collectives of small picklable objects, for control messages: the Communicator's other half.

Setup, checkpoints and the training loop exchange a few small Python objects
(a digest per rank, a checkpoint's metadata, an error). Here they go through
the Communicator like every buffer, so they are guarded and watched; no
module above ``comm`` needs raw mpi4py for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from mpi4py import MPI

from mpitrain.comm.checks import agree_on_error


class ObjectCollectives:
    """A mixin of ``Communicator`` (uses its ``comm``, ``_wait`` and ``_guard``)."""

    comm: MPI.Comm

    def _guard(self) -> None:
        raise NotImplementedError

    def _wait(self, what: str, sequence: int | None = None) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def allgather_object(self, obj: Any) -> list[Any]:
        """Gather a small picklable object from every rank, on every rank (control messages only)."""
        self._guard()
        with self._wait("allgather_object"):
            return self.comm.allgather(obj)

    def gather_object(self, obj: Any, root: int = 0) -> list[Any] | None:
        """Gather a small picklable object from every rank on ``root`` (others get None)."""
        self._guard()
        with self._wait("gather_object"):
            return self.comm.gather(obj, root=root)

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        """``root``'s picklable object, on every rank (what other ranks pass is ignored)."""
        self._guard()
        with self._wait("bcast_object"):
            return self.comm.bcast(obj, root=root)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` is true on every rank (collective): one 8-byte all-reduce with none of a
        buffer collective's checks, for the verdicts a step combines (e.g. "my gradients are finite")."""
        self._guard()
        value = np.array([1 if flag else 0], np.int64)
        with self._wait("all_true"):
            self.comm.Allreduce(MPI.IN_PLACE, value, op=MPI.MIN)
        return bool(value[0])

    def count_true(self, *flags: bool) -> list[int]:
        """For each flag, how many ranks pass it true (collective): one small integer all-reduce, exact and
        the same on every rank, for verdicts that need a count ("my gradients are not finite", "I had a
        batch")."""
        self._guard()
        values = np.array([1 if flag else 0 for flag in flags], np.int64)
        with self._wait("count_true"):
            self.comm.Allreduce(MPI.IN_PLACE, values, op=MPI.SUM)
        return [int(v) for v in values]

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank passes an error (see ``checks.agree_on_error``)."""
        self._guard()
        with self._wait("agreement on errors"):
            agree_on_error(self.comm, error)

    @contextlib.contextmanager
    def agreement(self) -> Iterator[None]:
        """Run a block on every rank; if it raises on any rank, raise on all (see ``agree``)."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every error must reach the other ranks
            self.agree(exc)
        else:
            self.agree(None)
