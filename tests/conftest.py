"""Test helpers for running the same pytest session on every rank.

Every test marked ``mpi`` ends with a cross-rank agreement on its outcome: a
failure on one rank fails the test on every rank (naming the ranks), so no
rank moves on to the next test's collectives while another is stuck. Tests
do their collectives first and assert afterwards.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm import Communicator
from mpitrain.jobs import child_environment, mpiexec_command
from mpitrain.nn import Linear, Module

WORLD = MPI.COMM_WORLD


_QUIET: dict[str, object] = {}  # rank > 0: the real stdout and the file its report went to


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # One temporary folder per rank and job: ranks of one job must not prune each other's folders.
    job = WORLD.bcast(os.getpid(), root=0)
    folder = os.path.join(tempfile.gettempdir(), f"mpitrain-tests-{job}")
    if config.option.basetemp is None:
        os.makedirs(folder, exist_ok=True)
        config.option.basetemp = os.path.join(folder, f"rank{WORLD.Get_rank()}")
    # One report per job, rank 0's: the other ranks' go to a file (before the terminal reporter, made after
    # this hook, takes sys.stdout), shown only when that rank's session fails. Every mpi test already
    # fails on every rank when it fails on one.
    if WORLD.Get_rank() > 0 and WORLD.Get_size() > 1:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"report-rank{WORLD.Get_rank()}.txt")
        _QUIET.update(stdout=sys.stdout, path=path)
        sys.stdout = open(path, "w", buffering=1)  # noqa: SIM115 - pytest keeps writing to it until exit


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _QUIET["status"] = exitstatus


def pytest_unconfigure(config: pytest.Config) -> None:
    if "path" in _QUIET and _QUIET.get("status") not in (0, 5):  # this rank failed: its whole report is the evidence
        sys.stdout.flush()
        with open(_QUIET["path"]) as f:
            report = f.read()
        sys.__stderr__.write(f"[rank {WORLD.Get_rank()}] its pytest report:\n{report}\n")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if item.get_closest_marker("mpi") is None:
        return (yield)
    error: BaseException | None = None
    try:
        result = yield
    except BaseException as exc:  # noqa: BLE001 - reported across ranks below
        error = exc
        result = None
    skipped = isinstance(error, pytest.skip.Exception)
    failed = None if error is None or skipped else f"{type(error).__name__}: {str(error)[:300]}"
    reports = WORLD.allgather(failed)
    if error is not None:
        raise error
    others = [(rank, r) for rank, r in enumerate(reports) if r is not None]
    if others:
        rank, text = others[0]
        pytest.fail(f"failed on ranks {[r for r, _ in others]}; rank {rank}: {text}", pytrace=False)
    return result


@pytest.fixture
def comm():
    """A checked Communicator over COMM_WORLD, closed after the test."""
    communicator = Communicator()
    yield communicator
    communicator.close()


def run_mpitrain(
    ranks: int, *args: str, timeout: float = 240, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m mpitrain`` under a fresh mpiexec, with ``extra_env`` added; returns the finished process."""
    command = mpiexec_command(ranks, sys.executable, "-m", "mpitrain", *args)
    environment = child_environment(timeout) | (extra_env or {})
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout + 10, check=False)


def shared_folder(tmp_path) -> str:
    """Rank 0's tmp folder, the same path on every rank."""
    return WORLD.bcast(str(tmp_path), root=0)


def same_on_every_rank(x: np.ndarray) -> bool:
    """Whether ``x`` holds the same bytes on every rank of the world (collective)."""
    digests = WORLD.allgather(hashlib.sha256(x.tobytes()).hexdigest())
    return len(set(digests)) == 1


def rank_data(n: int, dtype: np.dtype, rank: int, seed: int = 0) -> np.ndarray:
    """Rank-dependent random data of a dtype (integers small enough not to overflow a sum)."""
    rng = np.random.default_rng([seed, rank, n])
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(n) * (rank + 1)).astype(dtype)
    return rng.integers(-1000, 1000, n).astype(dtype)


class OneBranch(Module):
    """A model (not a Sequential) of two layers whose forward and backward use only the first."""

    def __init__(self, features: int, outputs: int) -> None:
        self.used, self.unused = Linear(features, outputs), Linear(features, outputs)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.used.forward(x)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        return self.used.backward(grad)
