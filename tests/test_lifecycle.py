"""Long-lived programs: many runs on one Communicator hold no windows, threads or memory; strategy flags."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.cli import UsageError, parse
from mpitrain.comm import Communicator
from mpitrain.comm.watchdog import EXIT_TIMEOUT, Watchdog
from mpitrain.parallel import STRATEGIES, AllReduce
from mpitrain.train import train, train_config
from tests.conftest import WORLD


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.mpi
def test_twenty_runs_on_one_communicator_leave_nothing_behind() -> None:
    comm = Communicator(timeout=300)
    config = train_config(epochs=1, progress=False, hidden=(64,), batch_size=32, max_steps=4, dropout=0.1)

    def snapshot() -> tuple[float, int, int]:
        windows = len(comm.shared.windows) if comm.shared is not None else 0
        return rss_mb(), threading.active_count(), windows

    for _ in range(3):  # warm-up: imports, caches, the allocator's first arenas
        train(config, comm)
    before = snapshot()
    for _ in range(20):
        result = train(config, comm)
    after = snapshot()
    params = result.model.flat_params.copy()  # readable after the run closed its shared memory
    comm.close()
    grown = WORLD.allreduce(after[0] - before[0], op=MPI.MAX)
    assert after[1:] == before[1:], (before, after)
    assert grown < 8, f"resident memory grew {grown:.1f} MiB over 20 runs"
    assert np.isfinite(params).all()


def test_a_flag_of_another_strategy_is_one_usage_error() -> None:
    class Other(AllReduce):
        """A stand-in sibling strategy with a flag of its own."""

        name = "other-test"

        @classmethod
        def add_arguments(cls, group) -> None:
            group.add_argument("--other-knob", type=int, default=1)

    STRATEGIES[Other.name] = Other
    try:
        with pytest.raises(
            UsageError, match=r"--other-knob belong.* to --strategy other-test; this run uses --strategy allreduce"
        ):
            parse(["--other-knob", "3"])
        with pytest.raises(UsageError, match=r"--compression belong.* to --strategy allreduce"):
            parse(["--strategy", "other-test", "--compression", "fp16"])
    finally:
        del STRATEGIES[Other.name]


def test_conflicting_flags_are_a_usage_error_before_any_setup() -> None:
    with pytest.raises(UsageError, match="--shard-optimizer works with uncompressed gradients, not --compression fp16"):
        parse(["--shard-optimizer", "--compression", "fp16"])
    with pytest.raises(UsageError, match="--accumulate 8 exceeds the per-rank batch size 4"):
        parse(["--accumulate", "8", "--batch-size", "4"])


def test_an_abort_announced_during_the_grace_period_still_happens() -> None:
    # Defect: a timeout that fired while the job was finishing printed "aborting the job" and the job
    # exited 0. stop() (called at exit) now waits for the announced abort.
    codes: list[int] = []
    dog = Watchdog(0, 0.2, abort=codes.append, grace=0.5)
    with dog.watch("the last step"):
        deadline = time.monotonic() + 5
        while dog.fired is None and time.monotonic() < deadline:
            time.sleep(0.01)
    assert dog.fired is not None and codes == []  # announced, still in its grace period
    dog.stop()
    assert codes == [EXIT_TIMEOUT]
