"""Groups of ranks: a Communicator over some of another's ranks, and the 2-D grid a hybrid needs.

A pipeline x data-parallel hybrid talks along rows (one pipeline's stages)
and columns (one stage's replicas). Sub-communicators made here share their
parent's checked mode, tuning and watchdog, so one process has one watchdog
and one exit hook however many groups it uses.
"""

from __future__ import annotations

import contextlib
from typing import Any

from mpi4py import MPI


class Groups:
    """A mixin of ``Communicator`` (uses its ``comm``, ``rank``, ``size``, ``checked``, ``tuning``,
    ``watchdog``, ``_wait`` and ``_guard``)."""

    comm: MPI.Comm
    rank: int
    size: int
    checked: bool
    tuning: Any
    watchdog: Any

    def _guard(self) -> None:
        raise NotImplementedError

    def _wait(self, what: Any, sequence: int | None = None) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def split(self, color: int, key: int | None = None) -> Any:
        """The Communicator of the ranks that pass the same ``color``, ordered by ``key`` (default: rank)
        (collective). It shares this one's checked mode, tuning and watchdog; close it before this one."""
        self._guard()
        with self._wait("split"):
            raw = self.comm.Split(color, self.rank if key is None else key)
        try:
            return type(self)(raw, checked=self.checked, tuning=self.tuning, watchdog=self.watchdog)
        finally:
            raw.Free()

    def grid(self, rows: int, columns: int) -> tuple[Any, Any]:
        """Cut the ranks into a rows x columns grid, rank r at (r // columns, r % columns) (collective).

        Returns (row, column): the Communicator of this rank's row (``columns``
        ranks) and of its column (``rows`` ranks), as a pipeline x data grid
        needs. Raises ValueError unless rows * columns == size.
        """
        if rows < 1 or columns < 1 or rows * columns != self.size:
            raise ValueError(f"a {rows} x {columns} grid does not cover {self.size} ranks")
        return self.split(self.rank // columns), self.split(self.rank % columns)
