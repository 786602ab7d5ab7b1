"""Point-to-point messages, object collectives, groups (split, grid) and the Communicator's lifecycle."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm import Communicator
from mpitrain.comm.ops import BFLOAT16
from mpitrain.comm.p2p import ANY_SOURCE
from mpitrain.jobs import child_environment, mpiexec_command
from tests.conftest import WORLD, rank_data, same_on_every_rank


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [np.float32, np.int64, BFLOAT16])
def test_ring_of_sendrecv_and_nonblocking_messages(comm: Communicator, dtype) -> None:
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    mine = rank_data(1001, np.float32, comm.rank).astype(dtype)
    got = np.empty_like(mine)
    message = comm.sendrecv(mine, right, got, source=left, sendtag=3)
    expected = rank_data(1001, np.float32, left).astype(dtype)
    ok = message == (left, 3, 1001) and np.array_equal(got.view(np.uint8), expected.view(np.uint8))
    # non-blocking, the other way round
    out, back = mine * 2, np.empty_like(mine)
    receive = comm.irecv(back, source=right, tag=4)
    send = comm.isend(out, left, tag=4)
    ok &= send.wait() == (left, 4, 1001) and receive.wait() == (right, 4, 1001) and receive.test()
    from_right = rank_data(1001, np.float32, right).astype(dtype) * 2
    ok &= np.array_equal(back.view(np.uint8), from_right.view(np.uint8))
    assert WORLD.allreduce(bool(ok), op=MPI.LAND)


@pytest.mark.mpi(min_size=2)
def test_receive_from_any_source_reports_the_sender(comm: Communicator) -> None:
    ok = True
    if comm.rank == 0:
        senders = set()
        buf = np.empty(3, np.float64)
        for _ in range(comm.size - 1):
            message = comm.recv(buf, source=ANY_SOURCE, tag=7)
            senders.add(message.source)
            ok &= bool(np.all(buf == message.source))
        ok &= senders == set(range(1, comm.size))
    else:
        comm.send(np.full(3, float(comm.rank)), 0, tag=7)
    assert WORLD.allreduce(ok, op=MPI.LAND)


@pytest.mark.mpi(min_size=2)
def test_wait_any_serves_standing_receives_in_completion_order_and_cancel_ends_the_rest(comm: Communicator) -> None:
    ok = True
    if comm.rank == 0:
        boxes = {r: np.empty(2, np.int64) for r in range(1, comm.size)}
        pending = {r: comm.irecv(boxes[r], r, tag=5) for r in boxes}
        spare = comm.irecv(np.empty(2, np.int64), 1, tag=6)  # nobody sends this one
        served = []
        while pending:
            ranks = list(pending)
            index = comm.wait_any([pending[r] for r in ranks])
            served.append(ranks[index])
            ok &= pending.pop(ranks[index]).wait().source == ranks[index]
        ok &= sorted(served) == list(boxes) and all(int(boxes[r][0]) == r for r in boxes)
        spare.cancel()
        ok &= spare.test()
    else:
        time.sleep(0.01 * (comm.size - comm.rank))  # the last rank first
        comm.send(np.array([comm.rank, 0], np.int64), 0, tag=5)
    assert WORLD.allreduce(ok, op=MPI.LAND)


@pytest.mark.mpi(min_size=2)
def test_a_message_of_the_wrong_length_is_an_error_naming_the_sender(comm: Communicator) -> None:
    error = None
    if comm.rank == 1:
        comm.send(np.zeros(5, np.float32), 0, tag=9)
    elif comm.rank == 0:
        try:
            comm.recv(np.empty(8, np.float32), source=1, tag=9)
        except ValueError as exc:
            error = str(exc)
    reports = WORLD.allgather(error)
    assert reports[0] == "recv: rank 1 sent 5 elements with tag 9; the buffer holds 8 x float32"


def test_bad_point_to_point_arguments_are_clear_errors() -> None:
    comm = Communicator(MPI.COMM_SELF)
    with pytest.raises(ValueError, match=r"dest 1 is outside \[0, 1\)"):
        comm.send(np.zeros(2), 1)
    with pytest.raises(ValueError, match="tag -2 is outside"):
        comm.send(np.zeros(2), 0, tag=-2)
    with pytest.raises(TypeError, match="expected a numpy array"):
        comm.send([1.0], 0)
    readonly = np.zeros(2)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        comm.recv(readonly, 0)
    comm.close()


@pytest.mark.mpi
def test_object_collectives(comm: Communicator) -> None:
    gathered = comm.gather_object({"rank": comm.rank}, root=comm.size - 1)
    value = comm.bcast_object("from root" if comm.rank == 0 else None)
    everyone = comm.allgather_object(comm.rank * 10)
    assert value == "from root" and everyone == [r * 10 for r in range(comm.size)]
    if comm.rank == comm.size - 1:
        assert gathered == [{"rank": r} for r in range(comm.size)]
    else:
        assert gathered is None


@pytest.mark.mpi
def test_split_and_grid_give_groups_that_share_the_watchdog() -> None:
    world = Communicator(timeout=120)
    halves = world.split(world.rank % 2)
    x = np.full(4, float(world.rank))
    halves.allreduce(x, algorithm="ring")
    expected = sum(r for r in range(world.size) if r % 2 == world.rank % 2)
    ok = (
        bool(np.all(x == expected))
        and halves.watchdog is world.watchdog
        and halves.size == len(range(world.rank % 2, world.size, 2))
    )
    if world.size % 2 == 0:
        rows, columns = world.grid(2, world.size // 2)
        ok &= rows.size == world.size // 2 and columns.size == 2
        ok &= rows.rank == world.rank % (world.size // 2) and columns.rank == world.rank // (world.size // 2)
        rows.close()
        columns.close()
    with pytest.raises(ValueError, match="does not cover"):
        world.grid(3, world.size)
    halves.close()
    threads = {t.name for t in threading.enumerate()}
    world.close()
    after = {t.name for t in threading.enumerate()}
    assert WORLD.allreduce(ok, op=MPI.LAND)
    assert "mpitrain-watchdog" in threads and "mpitrain-watchdog" not in after


@pytest.mark.mpi
def test_a_closed_communicator_refuses_use_and_a_with_block_closes() -> None:
    with Communicator() as comm:
        buf = comm.allocate(10)
        comm.allreduce(buf)
        windows = len(comm.shared.windows) if comm.shared else 0
        comm.release(buf)
        assert not comm.shared or len(comm.shared.windows) == windows - 1
    assert comm.closed
    calls = (lambda: comm.allreduce(np.zeros(3)), lambda: comm.send(np.zeros(1), 0), lambda: comm.allgather_object(0))
    for call in calls:
        with pytest.raises(RuntimeError, match="Communicator is closed"):
            call()
    comm.close()  # idempotent


def test_no_windows_until_the_first_allocation() -> None:
    comm = Communicator(MPI.COMM_SELF)
    assert comm.shared is None or (comm.shared.windows == [] and comm.shared._arrival_win is None)
    comm.close()


@pytest.mark.parametrize("ranks", [1, 2])
def test_free_after_a_watchdog_exits_cleanly(ranks: int) -> None:
    # Defect: Communicator(timeout=60) then free() segfaulted at exit (the watchdog's exit hook wrote
    # into the freed window).
    script = "from mpitrain.comm import Communicator\nc = Communicator(timeout=60)\nc.free()\nprint('done')\n"
    command = mpiexec_command(ranks, sys.executable, "-c", script)
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment(60), timeout=70, check=False)
    assert done.returncode == 0 and done.stdout.count("done") == ranks, done.stderr[-2000:]


@pytest.mark.mpi
def test_sharing_a_result_stays_bit_identical_across_split_groups() -> None:
    world = Communicator()
    group = world.split(0)
    x = rank_data(10_001, np.float64, world.rank)
    group.allreduce(x, algorithm="ring")
    assert same_on_every_rank(x)
    group.close()
    world.close()
