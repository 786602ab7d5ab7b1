"""Fault injection for the reliability tests: ``MPITRAIN_FAULT=ACTION:RANK:STEP``.

ACTION is ``raise`` (an exception), ``kill`` (SIGKILL to itself), ``hang``
(sleep forever) or ``nan`` (NaN in the batch, so the gradients are
non-finite); it happens on rank RANK just before global step STEP (1-based).
Unset, it costs one comparison per step.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any

import numpy as np

VARIABLE = "MPITRAIN_FAULT"
ACTIONS = ("raise", "kill", "hang", "nan")


@functools.cache
def planned() -> tuple[str, int, int] | None:
    """The fault from the environment as (action, rank, step), or None.

    Raises:
        ValueError: a malformed value.
    """
    text = os.environ.get(VARIABLE)
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in ACTIONS or not (parts[1].isdigit() and parts[2].isdigit()):
        raise ValueError(f"{VARIABLE}={text!r}: expected ACTION:RANK:STEP with ACTION one of {', '.join(ACTIONS)}")
    return parts[0], int(parts[1]), int(parts[2])


def before_step(rank: int, step: int, batch: Any) -> None:
    """Inject the planned fault if it is for this rank and step."""
    fault = planned()
    if fault is None or fault[1:] != (rank, step):
        return
    action = fault[0]
    if action == "raise":
        raise RuntimeError(f"injected fault: exception on rank {rank} before step {step}")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "hang":
        while True:
            time.sleep(3600)
    batch.reshape(-1)[0] = np.nan
