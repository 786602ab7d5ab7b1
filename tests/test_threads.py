"""BLAS threads per rank: the ranks that share a rank's cores are counted from the machine and the CPU
affinity, not from MPI's node, so bound ranks get their own cores and ranks that MPI calls separate
nodes of one machine still split it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mpitrain import threads
from mpitrain.comm import Communicator
from mpitrain.jobs import child_environment, mpiexec_command

A, B = "machine-a", "machine-b"


def test_sharers_count_ranks_of_the_same_machine_whose_cores_overlap() -> None:
    every = 0b1111
    assert threads.sharers([(A, every)] * 4, 2) == 4  # unbound ranks on one machine
    bound = [(A, 0b0011 << 2 * r) for r in range(4)]  # srun --cpus-per-task=2: two cores of its own each
    assert [threads.sharers(bound, r) for r in range(4)] == [1, 1, 1, 1]
    two_machines = [(A, every), (A, every), (B, every), (B, every), (B, every)]
    assert [threads.sharers(two_machines, r) for r in range(5)] == [2, 2, 3, 3, 3]
    overlapping = [(A, 0b0111), (A, 0b1100), (A, 0b1000)]
    assert [threads.sharers(overlapping, r) for r in range(3)] == [2, 3, 2]


@pytest.mark.mpi
def test_every_rank_of_this_machine_shares_its_cores() -> None:
    comm = Communicator()
    try:
        assert threads.ranks_sharing_cores(comm) == comm.size  # one machine, no binding (as CI runs)
    finally:
        comm.free()


def test_ranks_that_mpi_puts_on_separate_nodes_of_one_machine_still_split_its_cores() -> None:
    cores = threads.cores_available()
    if cores < 2:
        pytest.skip("one core: every count of sharers gives one thread")
    script = (
        "from mpitrain import threads\nfrom mpitrain.comm import Communicator\n"
        "comm = Communicator()\nsharing = threads.ranks_sharing_cores(comm)\n"
        "print(comm.local_size, sharing, threads.limit_threads(sharing), flush=True)\n"
    )
    command = mpiexec_command(2, sys.executable, "-c", script)
    environment = child_environment(120) | {"MPIR_CVAR_NOLOCAL": "1"}  # MPICH: every rank a node of its own
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=130, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    assert len(rows) == 2 and all(row[1:] == ["2", str(max(1, cores // 2))] for row in rows), done.stdout
