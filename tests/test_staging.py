"""Collectives on private arrays through the staging area, and the quick cross-rank agreement.

References are MPI's native collectives on the same rank-dependent data.
Tiny staging areas force many pieces per call, so the piece bookkeeping and
the alternating halves are exercised by small arrays; random pauses on
some ranks between calls expose a rank that rewrites a slot a peer still reads.
"""

from __future__ import annotations

import time

import ml_dtypes
import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm import Communicator, Tuning, raised_on_all_ranks
from mpitrain.comm.ops import BFLOAT16
from mpitrain.comm.ring import chunk_bounds
from tests.conftest import WORLD, rank_data, same_on_every_rank
from tests.test_comm import max_error, native_reduce, recorder, tolerance

P = WORLD.Get_size()
SIZES = [1, P + 1, 1000, 100_003]
SMALL_AREA = Tuning(segment_bytes=512, staging_bytes=4096)  # 100_003 float64 elements: about 200 pieces


def staged_comm(node_size: int | None = None, tuning: Tuning = SMALL_AREA) -> Communicator:
    """A Communicator with a small staging area, on one node or on fake nodes of ``node_size``."""
    if node_size is not None and P % node_size:
        pytest.skip("the fake nodes need a rank count divisible by their size")
    return Communicator(node_size=node_size, tuning=tuning)


def relative_eps(dtype: type) -> float:
    """How much coarser than float32 a float type rounds (1 for integers and float32 or wider)."""
    if np.dtype(dtype).kind not in "fV" and dtype != BFLOAT16:
        return 1.0
    return max(1.0, float(ml_dtypes.finfo(dtype).eps / np.finfo(np.float32).eps))


def owner(comm: Communicator, n: int, node_size: int | None) -> tuple[int, int]:
    """The chunk a rank owns after a shm reduce-scatter: node rank i owns chunk i of the node."""
    return chunk_bounds(n, node_size)[comm.rank % node_size] if node_size else comm.chunk_bounds(n)[comm.rank]


@pytest.mark.mpi
@pytest.mark.parametrize("node_size", [None, 2])
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32, np.float64, np.int64])
def test_private_allreduce_through_the_staging_area_matches_native(node_size: int | None, dtype: type) -> None:
    comm = staged_comm(node_size)
    ok = []
    for n in SIZES:
        for op in ("sum", "mean", "max") if np.dtype(dtype).kind == "f" or dtype == BFLOAT16 else ("sum", "min"):
            x = rank_data(n, np.float32, comm.rank, seed=3).astype(dtype)
            expected = native_reduce(x.astype(np.float32) if dtype == BFLOAT16 else x, op)
            tol = tolerance(x.astype(np.float32)) * relative_eps(dtype)
            assert not comm.shares(x)
            result = comm.allreduce(x, op=op, algorithm="shm")
            ok.append(result is x and max_error(x.astype(np.float64), expected) <= tol and same_on_every_rank(x))
    comm.free()
    assert all(ok), ok


@pytest.mark.mpi
@pytest.mark.parametrize("node_size", [None, 2])
def test_private_allreduce_inspects_every_final_value_once_per_node(node_size: int | None) -> None:
    comm = staged_comm(node_size)
    ok = []
    for n in SIZES:
        x = rank_data(n, np.float64, comm.rank, seed=5)
        inspect, seen, values = recorder(x)
        comm.allreduce(x, op="mean", algorithm="shm", inspect=inspect)
        total = seen.copy()
        WORLD.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
        ok.append(bool((total == P // (node_size or P)).all()) and np.array_equal(values[seen > 0], x[seen > 0]))
    comm.free()
    assert all(ok), ok


@pytest.mark.mpi
@pytest.mark.parametrize("node_size", [None, 2])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_private_reduce_scatter_then_allgather(node_size: int | None, op: str) -> None:
    comm = staged_comm(node_size)
    ok = []
    for n in [0, *SIZES]:
        x = rank_data(n, np.float64, comm.rank, seed=7)
        mine = x.copy()
        expected, tol = native_reduce(x, op), tolerance(x)
        start, stop = comm.reduce_scatter(x, op=op, algorithm="shm")
        ok.append((start, stop) == owner(comm, n, node_size))
        ok.append(max_error(x[start:stop], expected[start:stop]) <= tol)
        outside = np.ones(n, bool)
        outside[start:stop] = False
        ok.append(np.array_equal(x[outside], mine[outside]))  # other chunks keep this rank's values
        x[start:stop] += 1.0
        comm.allgather(x, algorithm="shm")
        ok.append(max_error(x, expected + 1.0) <= tol and same_on_every_rank(x))
    comm.free()
    assert all(ok), ok


@pytest.mark.mpi
@pytest.mark.parametrize("node_size", [None, 2])
def test_private_broadcast_from_every_root(node_size: int | None) -> None:
    comm = staged_comm(node_size)
    ok = []
    for n in SIZES:
        for root in range(P):
            x = rank_data(n, np.float32, comm.rank, seed=root)
            expected = x.copy()
            WORLD.Bcast(expected, root=root)
            comm.broadcast(x, root=root, algorithm="shm")
            ok.append(np.array_equal(x, expected))
    comm.free()
    assert all(ok), ok


@pytest.mark.mpi(min_size=2)
def test_mixed_staged_calls_with_uneven_pauses_stay_correct() -> None:
    """Back-to-back staged calls of every kind and size, some ranks pausing at random between them: a
    rank that wrote into a slot its peer still reads would corrupt a later result."""
    comm = staged_comm()
    rng = np.random.default_rng(WORLD.Get_rank())
    ok = []
    for step in range(40):
        n = [3, 700, 5003][step % 3]
        kind = ["allreduce", "reduce_scatter", "allgather", "broadcast"][step % 4]
        x = rank_data(n, np.float64, comm.rank, seed=step)
        if rng.random() < 0.3:
            time.sleep(0.002)
        if kind == "allreduce":
            expected = native_reduce(x, "sum")
            comm.allreduce(x, algorithm="shm")
            ok.append(max_error(x, expected) <= tolerance(x))
        elif kind == "reduce_scatter":
            expected = native_reduce(x, "sum")
            a, b = comm.reduce_scatter(x, algorithm="shm")
            ok.append(max_error(x[a:b], expected[a:b]) <= tolerance(x))
        elif kind == "allgather":
            expected = x.copy()
            for r, (a, b) in enumerate(comm.chunk_bounds(n)):
                expected[a:b] = rank_data(n, np.float64, r, seed=step)[a:b]
            comm.allgather(x, algorithm="shm")
            ok.append(np.array_equal(x, expected))
        else:
            expected = x.copy()
            WORLD.Bcast(expected, root=step % P)
            comm.broadcast(x, root=step % P, algorithm="shm")
            ok.append(np.array_equal(x, expected))
    comm.free()
    assert WORLD.allreduce(all(ok), op=MPI.LAND), [i for i, good in enumerate(ok) if not good]


@pytest.mark.mpi
def test_auto_on_a_private_array_uses_the_staging_area_where_measured_faster() -> None:
    comm = Communicator()
    tuning = comm.tuning
    staged = tuning.staged_bytes
    low, high = tuning.staged_native_bytes
    x = rank_data(staged // 4, np.float32, comm.rank)
    expected = native_reduce(x, "sum")
    comm.allreduce(x)  # auto: staged on one node
    ok = max_error(x, expected) <= tolerance(x) and same_on_every_rank(x)
    comm.free()
    assert ok
    choose = tuning.allreduce_algorithm
    assert choose(staged - 4, half=False, memory="staged") == "native"
    assert choose(staged, half=False, memory="staged") == "shm"
    assert choose(low, half=False, memory="staged") == "native" and choose(high, half=False, memory="staged") == "shm"
    assert choose(staged, half=True, memory="staged") == "shm"
    broadcast = tuning.broadcast_algorithm
    assert broadcast(tuning.broadcast_staged_bytes, 3, memory="staged") == "shm"
    assert broadcast(tuning.broadcast_staged_bytes, 2, memory="staged") == "native"
    gather = tuning.scatter_gather_algorithm
    assert gather("reduce_scatter", tuning.reduce_scatter_shm_bytes, False, "staged") == "shm"
    assert gather("allgather", tuning.allgather_shm_bytes - 8, False, "staged") == "native"
    assert gather("reduce_scatter", 64, True, "staged") == "ring"  # MPI cannot reduce bfloat16
    assert gather("allgather", tuning.allgather_shm_bytes, False, "none") == "ring"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("node_size", [None, 2])
def test_quick_agreement_still_names_the_rank_that_differs(node_size: int | None) -> None:
    comm = staged_comm(node_size, Tuning())
    assert comm._quick is not None
    n = 10 if comm.rank != P - 1 else 11
    with pytest.raises(ValueError, match=f"rank {P - 1} has .*length=11") as caught:
        comm.allreduce(np.ones(n))
    assert raised_on_all_ranks(caught.value)
    x = np.ones(10)
    comm.allreduce(x)  # the next call agrees again
    ok = bool((x == P).all())
    comm.free()
    assert ok
