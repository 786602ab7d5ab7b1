"""Ring all-reduce and tree broadcast against MPI's native collectives, and bad input."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm import Communicator, raised_on_all_ranks
from tests.conftest import WORLD, rank_data

P = WORLD.Get_size()
SIZES = sorted({0, 1, max(P - 1, 1), P + 1, 2 * P + 3, 1000, 262_147, 5_000_011})
DTYPES = [np.float32, np.float64, np.int32, np.int64]
NATIVE = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}


def native_reduce(x: np.ndarray, op: str) -> np.ndarray:
    out = x.copy()
    WORLD.Allreduce(MPI.IN_PLACE, out, op=NATIVE["sum" if op == "mean" else op])
    return out / P if op == "mean" else out


def tolerance(x: np.ndarray) -> float:
    """Round-off bound for a float sum over ranks: p * eps * sum of |terms|."""
    if x.dtype.kind != "f":
        return 0.0
    total = np.abs(x).astype(np.float64)
    WORLD.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
    return float(P * np.finfo(x.dtype).eps * total.max(initial=0.0))


@pytest.mark.mpi
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ring_allreduce_sum_matches_native(comm: Communicator, n: int, dtype: type) -> None:
    x = rank_data(n, dtype, comm.rank)
    expected, tol = native_reduce(x, "sum"), tolerance(x)
    result = comm.allreduce(x, op="sum", algorithm="ring")
    digests = WORLD.allgather(hashlib.sha256(x.tobytes()).hexdigest())
    assert result is x
    assert np.abs(x.astype(np.float64) - expected).max(initial=0.0) <= tol
    assert len(set(digests)) == 1, "ring results differ between ranks"


@pytest.mark.mpi
@pytest.mark.parametrize("op", ["mean", "max", "min"])
@pytest.mark.parametrize("n", [0, 1, P + 1, 100_003])
def test_ring_allreduce_ops(comm: Communicator, op: str, n: int) -> None:
    for dtype in (np.float64, np.int32) if op != "mean" else (np.float32, np.float64):
        x = rank_data(n, dtype, comm.rank, seed=7)
        expected, tol = native_reduce(x, op), tolerance(x)
        comm.allreduce(x, op=op)
        assert np.abs(x.astype(np.float64) - expected).max(initial=0.0) <= tol, dtype


@pytest.mark.mpi
def test_native_algorithm_and_multidimensional_buffer(comm: Communicator) -> None:
    x = rank_data(60, np.float64, comm.rank).reshape(3, 4, 5)
    expected = native_reduce(x, "mean")
    comm.allreduce(x, op="mean", algorithm="native")
    assert np.array_equal(x, expected)


@pytest.mark.mpi
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("algorithm", ["tree", "native"])
def test_broadcast_every_root(comm: Communicator, n: int, algorithm: str) -> None:
    ok = True
    for root in range(comm.size):
        x = rank_data(n, np.float32, comm.rank, seed=root)
        expected = x.copy()
        WORLD.Bcast(expected, root=root)
        comm.broadcast(x, root=root, algorithm=algorithm)
        ok &= np.array_equal(x, expected)
    assert ok


@pytest.mark.mpi
def test_segment_pipelining_with_tiny_segments() -> None:
    comm = Communicator(segment_bytes=64)
    for n in (0, 3, 17 * P + 5, 10_001):
        x = rank_data(n, np.float64, comm.rank, seed=3)
        expected, tol = native_reduce(x, "sum"), tolerance(x)
        comm.allreduce(x)
        assert np.abs(x - expected).max(initial=0.0) <= tol


@pytest.mark.mpi(min_size=2)
def test_scratch_is_reused_between_calls(comm: Communicator) -> None:
    comm.allreduce(np.ones(100_000, np.float32))
    first = comm._scratch[np.dtype(np.float32)]
    comm.allreduce(np.ones(300_000, np.float32))
    assert comm._scratch[np.dtype(np.float32)] is first
    assert first.nbytes == 2 * comm.segment_bytes


def _raises_everywhere(call, exc_type: type, fragment: str) -> None:
    with pytest.raises(exc_type) as info:
        call()
    assert fragment in str(info.value), str(info.value)
    assert raised_on_all_ranks(info.value)


@pytest.mark.mpi
def test_bad_buffer_on_one_rank_raises_on_every_rank(comm: Communicator) -> None:
    odd = comm.size - 1  # the last rank is the bad one
    good = np.zeros(6)

    def noncontig():
        comm.allreduce(np.zeros(12)[::2] if comm.rank == odd else good.copy())

    _raises_everywhere(noncontig, ValueError, f"rank {odd}: buffer is not C-contiguous")

    readonly = np.zeros(6)
    readonly.flags.writeable = False
    _raises_everywhere(lambda: comm.broadcast(readonly if comm.rank == odd else good.copy()), ValueError, "read-only")
    _raises_everywhere(
        lambda: comm.allreduce(np.zeros(6, np.complex128) if comm.rank == odd else good.copy()),
        TypeError,
        "unsupported dtype complex128",
    )
    _raises_everywhere(
        lambda: comm.allreduce([1.0, 2.0] if comm.rank == odd else good.copy()), TypeError, "expected a numpy array"
    )
    _raises_everywhere(lambda: comm.allreduce(np.zeros(4, np.int64), op="mean"), TypeError, "floating dtype")
    _raises_everywhere(lambda: comm.allreduce(good.copy(), op="prod"), ValueError, "unknown op 'prod'")
    _raises_everywhere(lambda: comm.allreduce(good.copy(), algorithm="magic"), ValueError, "unknown algorithm")
    _raises_everywhere(lambda: comm.broadcast(good.copy(), root=comm.size), ValueError, "outside [0,")


@pytest.mark.mpi(min_size=2)
def test_ranks_that_disagree_get_the_same_error(comm: Communicator) -> None:
    _raises_everywhere(lambda: comm.allreduce(np.zeros(5 + comm.rank)), ValueError, "ranks disagree")
    _raises_everywhere(
        lambda: comm.allreduce(np.zeros(5, np.float32 if comm.rank else np.float64)), ValueError, "dtype=float32"
    )
    _raises_everywhere(lambda: comm.broadcast(np.zeros(5), root=comm.rank % 2), ValueError, "root=")
    _raises_everywhere(
        lambda: comm.allreduce(np.zeros(5), op="sum" if comm.rank else "max"), ValueError, "ranks disagree"
    )
    # The communicator is still usable afterwards.
    x = np.ones(5)
    comm.allreduce(x)
    assert np.array_equal(x, np.full(5, comm.size))


@pytest.mark.mpi
def test_unchecked_mode_raises_local_errors_locally() -> None:
    comm = Communicator(checked=False)
    with pytest.raises(ValueError, match="unknown op"):
        comm.allreduce(np.zeros(3), op="prod")
    x = rank_data(1001, np.float64, comm.rank)
    expected, tol = native_reduce(x, "sum"), tolerance(x)
    comm.allreduce(x)
    assert np.abs(x - expected).max() <= tol


@pytest.mark.mpi
def test_agreement_raises_one_ranks_error_everywhere(comm: Communicator) -> None:
    def body():
        with comm.agreement():
            if comm.rank == comm.size - 1:
                raise FileNotFoundError("data.npz: no such file")

    _raises_everywhere(body, FileNotFoundError, f"rank {comm.size - 1}: data.npz: no such file")
    with comm.agreement():
        pass


def test_segment_bytes_is_validated() -> None:
    with pytest.raises(ValueError, match="segment_bytes"):
        Communicator(MPI.COMM_SELF, segment_bytes=8)
