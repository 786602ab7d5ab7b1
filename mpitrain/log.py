"""Logging for a job of many ranks: the rank in every record, one level for the job, job-wide warnings once.

Every record of the ``mpitrain`` logger, and every Python warning (numpy's
overflow warnings included), reaches stderr as ``[rank R/N] LEVEL name:
message``, so a line in a merged job log says where it came from. A fact
that holds for the whole job (a batch larger than the data, feature scales
far apart) goes through ``job_warning``: rank 0 logs it, so a job of 64 ranks
prints it once, not 64 times.
"""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("mpitrain")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "[rank %(rank)d/%(size)d] %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    """Adds this process's rank and the job's size to every record it passes."""

    def __init__(self, rank: int, size: int) -> None:
        super().__init__()
        self.rank, self.size = rank, size

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank, record.size = self.rank, self.size
        return True


def setup(rank: int, size: int, level: str = "WARNING") -> None:
    """Send the ``mpitrain`` logger's records and Python's warnings to stderr with this rank in each, at
    ``level`` and above (one of ``LEVELS``). Idempotent: a second call replaces the first's handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_RankFilter(rank, size))
    for logger in (LOGGER, logging.getLogger("py.warnings")):
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    logging.captureWarnings(True)
    LOGGER.rank = rank  # type: ignore[attr-defined]


def job_warning(message: str) -> None:
    """Log a warning that is the same on every rank once for the job (rank 0 logs it; before ``setup``, or
    outside a job, this process does)."""
    if getattr(LOGGER, "rank", 0) == 0:
        LOGGER.warning(message)
