"""Fault injection for the reliability tests and the straggler benchmarks: ``MPITRAIN_FAULT``.

One or more faults, separated by commas:

- ``ACTION:RANK:STEP`` with ACTION ``raise`` (an exception), ``kill`` (SIGKILL
  to itself), ``hang`` (sleep forever) or ``nan`` (NaN in the batch, so the
  gradients are non-finite): it happens on rank RANK just before its step
  STEP (1-based);
- ``slow:RANK:FACTOR``: rank RANK is a persistent straggler, each of its
  steps taking FACTOR (>= 1) times as long: after each step it sleeps
  FACTOR - 1 times its own step time;
- ``pause:PROBABILITY:LENGTH[:SEED]``: after each step every rank that reads
  data pauses with that probability for LENGTH of its own step times (the
  draws are seeded by SEED, default 0, and the rank, so runs repeat).

A rank's own step time is the lower quartile of its last ``WINDOW`` steps
(without the injected sleeps): steps in which it also waited for a paused or
slow peer are longer, and must not make its own pauses longer (a rank that
waits for a peer in most steps would otherwise pause ever longer). Unset,
the checks cost one comparison per step.
"""

from __future__ import annotations

import collections
import functools
import os
import signal
import time
from typing import Any, NamedTuple

import numpy as np

VARIABLE = "MPITRAIN_FAULT"
ACTIONS = ("raise", "kill", "hang", "nan")
STRAGGLERS = ("slow", "pause")
WINDOW = 21  # recent steps whose lower quartile is a straggler's own step time


class Fault(NamedTuple):
    """One planned fault: ``action`` and its two or three numbers (see the module docstring)."""

    action: str
    first: float
    second: float
    seed: int = 0


def _parse(text: str) -> Fault:
    parts = text.split(":")
    action = parts[0]
    if action in ACTIONS and len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return Fault(action, int(parts[1]), int(parts[2]))
    try:
        if action == "slow" and len(parts) == 3 and parts[1].isdigit() and float(parts[2]) >= 1:
            return Fault(action, int(parts[1]), float(parts[2]))
        if action == "pause" and len(parts) in (3, 4) and 0 <= float(parts[1]) <= 1 and float(parts[2]) >= 0:
            return Fault(action, float(parts[1]), float(parts[2]), int(parts[3]) if len(parts) == 4 else 0)
    except ValueError:
        pass
    raise ValueError(
        f"{VARIABLE}={text!r}: expected ACTION:RANK:STEP with ACTION one of {', '.join(ACTIONS)}, "
        "slow:RANK:FACTOR (FACTOR >= 1) or pause:PROBABILITY:LENGTH[:SEED] (PROBABILITY in [0, 1], LENGTH >= 0)"
    )


@functools.cache
def planned() -> tuple[Fault, ...]:
    """The faults from the environment (empty when unset).

    Raises:
        ValueError: a malformed value (the message shows the accepted forms).
    """
    text = os.environ.get(VARIABLE)
    return tuple(_parse(part) for part in text.split(",")) if text else ()


def before_step(rank: int, step: int, batch: Any) -> None:
    """Inject a planned raise / kill / hang / nan if it is for this rank and step (``batch``: the host
    batch about to be trained on, None on a rank without data, where ``nan`` does nothing)."""
    for fault in planned():
        if fault.action not in ACTIONS or (fault.first, fault.second) != (rank, step):
            continue
        if fault.action == "raise":
            raise RuntimeError(f"injected fault: exception on rank {rank} before step {step}")
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.action == "hang":
            while True:
                time.sleep(3600)
        if batch is not None:
            batch.reshape(-1)[0] = np.nan


@functools.cache
def _straggler(rank: int) -> tuple[collections.deque, np.random.Generator | None]:
    """This rank's recent step times, and its pause draws when a pause is planned."""
    pauses = [f for f in planned() if f.action == "pause"]
    rng = np.random.default_rng([pauses[0].seed, rank]) if pauses else None
    return collections.deque(maxlen=WINDOW), rng


def after_step(rank: int, seconds: float, reads_data: bool) -> None:
    """Sleep as a planned ``slow`` or ``pause`` straggler would, given this step's ``seconds``."""
    faults = [f for f in planned() if f.action in STRAGGLERS]
    if not faults:
        return
    times, rng = _straggler(rank)
    times.append(seconds)
    own = sorted(times)[(len(times) - 1) // 4]
    sleep = 0.0
    for fault in faults:
        if fault.action == "slow" and fault.first == rank:
            sleep += (fault.second - 1) * own
        elif fault.action == "pause" and reads_data and rng.random() < fault.first:
            sleep += fault.second * own
    if sleep:
        time.sleep(sleep)
