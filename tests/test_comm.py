"""Every collective and algorithm against MPI's native collective, on rank-dependent data, and bad input."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm import Communicator, Tuning, raised_on_all_ranks
from mpitrain.comm.ops import BFLOAT16
from mpitrain.comm.ops import DTYPES as ALL_DTYPES
from mpitrain.comm.ring import chunk_bounds
from tests.conftest import WORLD, rank_data, same_on_every_rank

P = WORLD.Get_size()
SIZES = sorted({0, 1, max(P - 1, 1), P + 1, 2 * P + 3, 1000, 262_147, 5_000_011})
DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64]
NATIVE = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
TINY = Tuning(segment_bytes=64)  # many segments per chunk even for small buffers


def native_reduce(x: np.ndarray, op: str) -> np.ndarray:
    """MPI's in-place Allreduce on a float64/int64 copy (float16 is reduced in float32 by us)."""
    out = x.astype(np.float64 if x.dtype.kind == "f" else np.int64)
    WORLD.Allreduce(MPI.IN_PLACE, out, op=NATIVE["sum" if op == "mean" else op])
    return out / P if op == "mean" else out


def tolerance(x: np.ndarray) -> float:
    """Round-off bound for a float reduction over ranks: (p + 1) * eps * max |partial sum|."""
    if x.dtype.kind != "f":
        return 0.0
    total = np.abs(x).astype(np.float64)
    WORLD.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
    return float((P + 1) * np.finfo(x.dtype).eps * total.max(initial=0.0))


def max_error(x: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(x.astype(np.float64) - expected).max(initial=0.0))


@pytest.fixture(scope="module")
def shared_comm() -> Communicator:
    return Communicator(tuning=Tuning(segment_bytes=4096))


@pytest.mark.mpi
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ["ring", "doubling", "native", "auto"])
def test_allreduce_sum_matches_native(comm: Communicator, n: int, dtype: type, algorithm: str) -> None:
    x = rank_data(n, dtype, comm.rank)
    expected, tol = native_reduce(x, "sum"), tolerance(x)
    result = comm.allreduce(x, op="sum", algorithm=algorithm)
    identical = same_on_every_rank(x)
    assert result is x
    assert max_error(x, expected) <= tol
    assert identical or algorithm in ("native", "auto"), "results differ between ranks"


@pytest.mark.mpi
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int64])
def test_shared_memory_allreduce_matches_native(shared_comm: Communicator, n: int, dtype: type) -> None:
    buf = shared_comm.allocate(n + 5, dtype)
    view = buf[3 : 3 + n]  # an offset inside the shared buffer
    view[...] = rank_data(n, dtype, shared_comm.rank)
    expected, tol = native_reduce(view, "sum"), tolerance(view)
    shared_comm.allreduce(view, algorithm="shm")
    identical = same_on_every_rank(view)
    assert max_error(view, expected) <= tol and identical
    assert not buf[:3].any() and not buf[3 + n :].any()


@pytest.mark.mpi
def test_single_node_is_true_unless_ranks_are_split_into_nodes() -> None:
    whole, split = Communicator(), Communicator(node_size=1)
    try:
        assert whole.single_node and split.single_node == (split.size == 1)
    finally:
        whole.free()
        split.free()


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("n", [1, 7, 1000, 262_147])
@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_hierarchical_allreduce_over_two_fake_nodes(n: int, op: str) -> None:
    comm = Communicator(node_size=2, tuning=Tuning(segment_bytes=2048))
    assert comm.shared is not None and comm.shared.cross is not None
    buf = comm.allocate(n, np.float64)
    buf[...] = rank_data(n, np.float64, comm.rank)
    expected, tol = native_reduce(buf, op), tolerance(buf)
    comm.allreduce(buf, op=op, algorithm="auto" if n > 10_000 else "shm")
    ok = max_error(buf, expected) <= tol and same_on_every_rank(buf)
    comm.free()  # buf is no longer valid memory after this
    assert ok


@pytest.mark.mpi
@pytest.mark.parametrize("op", ["mean", "max", "min"])
@pytest.mark.parametrize("algorithm", ["ring", "doubling", "shm", "native"])
@pytest.mark.parametrize("n", [0, 1, P + 1, 100_003])
def test_allreduce_ops(shared_comm: Communicator, op: str, algorithm: str, n: int) -> None:
    for dtype in (np.float16, np.float64, np.int32) if op != "mean" else (np.float16, np.float32):
        data = rank_data(n, dtype, shared_comm.rank, seed=7)
        x = shared_comm.allocate(n, dtype) if algorithm == "shm" else data.copy()
        x[...] = data
        expected, tol = native_reduce(x, op), tolerance(x)
        shared_comm.allreduce(x, op=op, algorithm=algorithm)
        assert max_error(x, expected) <= tol, dtype


@pytest.mark.mpi
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("algorithm", ["ring", "native"])
@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_reduce_scatter_then_allgather(comm: Communicator, n: int, algorithm: str, op: str) -> None:
    x = rank_data(n, np.float64, comm.rank, seed=11)
    expected, tol = native_reduce(x, op), tolerance(x)
    start, stop = comm.reduce_scatter(x, op=op, algorithm=algorithm)
    owned_ok = max_error(x[start:stop], expected[start:stop]) <= tol
    comm.allgather(x, algorithm=algorithm)
    bounds = WORLD.allgather((start, stop))
    assert (start, stop) == comm.chunk_bounds(n)[comm.rank] and owned_ok
    assert bounds == comm.chunk_bounds(n)
    assert max_error(x, expected) <= tol


@pytest.mark.mpi
@pytest.mark.parametrize("node_size", [None, 2])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_shared_memory_reduce_scatter_then_allgather(node_size: int | None, op: str) -> None:
    if node_size is not None and WORLD.Get_size() % node_size:
        pytest.skip("the fake nodes need a rank count divisible by their size")
    comm = Communicator(node_size=node_size, tuning=Tuning(segment_bytes=2048))
    ok = []
    for n in (0, 1, 7, 10_001):
        x = comm.allocate(n, np.float64)
        x[...] = rank_data(n, np.float64, comm.rank, seed=13)
        expected, tol = native_reduce(x, op), tolerance(x)
        start, stop = comm.reduce_scatter(x, op=op, algorithm="shm")
        ok.append(max_error(x[start:stop], expected[start:stop]) <= tol)
        x[start:stop] += 1.0  # what a sharded optimizer does: change the owned chunk, then share it
        comm.allgather(x, algorithm="shm")
        ok.append(max_error(x, expected + 1.0) <= tol and same_on_every_rank(x))
        # One node: the usual chunks. Fake nodes of 2: node rank i owns chunk i of 2, on both nodes.
        owner = chunk_bounds(n, 2)[comm.rank % 2] if node_size else comm.chunk_bounds(n)[comm.rank]
        ok.append((start, stop) == owner)
    comm.free()
    assert all(ok), ok


def recorder(buf: np.ndarray) -> tuple:
    """An ``inspect`` callback for ``buf``, and how often it saw each element and the values it saw."""
    seen, values = np.zeros(buf.size, np.int64), np.full(buf.size, np.nan)
    base = buf.__array_interface__["data"][0]

    def inspect(part: np.ndarray) -> None:
        first = (part.__array_interface__["data"][0] - base) // buf.itemsize
        seen[first : first + part.size] += 1
        values[first : first + part.size] = part

    return inspect, seen, values


@pytest.mark.mpi
@pytest.mark.parametrize("node_size", [None, 2])
@pytest.mark.parametrize("algorithm", ["ring", "doubling", "shm", "native"])
def test_allreduce_inspects_every_final_value(node_size: int | None, algorithm: str) -> None:
    if node_size is not None and P % node_size:
        pytest.skip("the fake nodes need a rank count divisible by their size")
    comm = Communicator(node_size=node_size, tuning=Tuning(segment_bytes=2048))
    # ring and shm: each element by the rank that finishes it (shm: one per node); others: every rank, whole.
    times = {"ring": 1, "shm": P // (node_size or P), "doubling": P, "native": P}[algorithm]
    ok = []
    for n in (1, P + 1, 10_001):
        x = comm.allocate(n, np.float64)
        x[...] = rank_data(n, np.float64, comm.rank, seed=17)
        inspect, seen, values = recorder(x)
        comm.allreduce(x, op="mean", algorithm=algorithm, inspect=inspect)
        total = seen.copy()
        WORLD.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
        ok.append(bool((total == times).all()) and np.array_equal(values[seen > 0], x[seen > 0]))
    comm.free()
    assert all(ok), ok


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "shm", "native"])
def test_reduce_scatter_inspects_the_owned_chunk(algorithm: str) -> None:
    comm = Communicator(tuning=Tuning(segment_bytes=2048))
    ok = []
    for n in (1, P + 1, 10_001):
        x = comm.allocate(n, np.float64)
        x[...] = rank_data(n, np.float64, comm.rank, seed=19)
        inspect, seen, values = recorder(x)
        start, stop = comm.reduce_scatter(x, op="mean", algorithm=algorithm, inspect=inspect)
        owned = np.zeros(n, bool)
        owned[start:stop] = True
        ok.append(np.array_equal(seen, owned.astype(np.int64)) and np.array_equal(values[owned], x[owned]))
    comm.free()
    assert all(ok), ok


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", DTYPES)
def test_allgather_collects_each_ranks_chunk(comm: Communicator, dtype: type) -> None:
    n = 3 * P + 2
    bounds = comm.chunk_bounds(n)
    x = np.zeros(n, dtype)
    a, b = bounds[comm.rank]
    x[a:b] = comm.rank + 1
    comm.allgather(x, algorithm="ring")
    expected = np.concatenate([np.full(hi - lo, r + 1, dtype) for r, (lo, hi) in enumerate(bounds)])
    assert np.array_equal(x, expected)


def broadcast_every_root(comm: Communicator, n: int, algorithm: str, shared: bool) -> bool:
    """Broadcast rank-dependent data from every root; True when each matches MPI's Bcast."""
    ok = True
    for root in range(comm.size):
        data = rank_data(n, np.float32, comm.rank, seed=root)
        x = comm.allocate(n, np.float32) if shared else data.copy()
        x[...] = data
        expected = data.copy()
        WORLD.Bcast(expected, root=root)
        comm.broadcast(x, root=root, algorithm=algorithm)
        ok &= bool(np.array_equal(x, expected))
    return ok


@pytest.mark.mpi
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("algorithm", ["tree", "scatter", "shm", "native", "auto"])
def test_broadcast_every_root(shared_comm: Communicator, n: int, algorithm: str) -> None:
    assert broadcast_every_root(shared_comm, n, algorithm, shared=algorithm in ("shm", "auto"))


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("n", [1, 1000, 100_003])
def test_hierarchical_broadcast_over_two_fake_nodes(n: int) -> None:
    comm = Communicator(node_size=2, tuning=Tuning(segment_bytes=2048))
    ok = broadcast_every_root(comm, n, "shm", shared=True)
    comm.free()
    assert ok


@pytest.mark.mpi
def test_segment_pipelining_with_tiny_segments() -> None:
    comm = Communicator(tuning=TINY)
    for n in (0, 3, 17 * P + 5, 10_001):
        x = rank_data(n, np.float64, comm.rank, seed=3)
        expected, tol = native_reduce(x, "sum"), tolerance(x)
        comm.allreduce(x, algorithm="ring")
        assert max_error(x, expected) <= tol


@pytest.mark.mpi(min_size=2)
def test_scratch_is_one_segment_reused_between_calls(comm: Communicator) -> None:
    comm.allreduce(np.ones(100_000, np.float32), algorithm="ring")
    first = comm._scratch[np.dtype(np.float32)]
    comm.allreduce(np.ones(3_000_000, np.float32), algorithm="ring")
    assert comm._scratch[np.dtype(np.float32)] is first
    assert first.nbytes == comm.tuning.segment_bytes


@pytest.mark.mpi(min_size=2)
def test_ring_python_state_does_not_grow_with_the_buffer(comm: Communicator) -> None:
    peaks = []
    for n in (1 << 16, 1 << 22):  # 256 KiB and 16 MiB of float32: 1 and 64 segments
        x = np.ones(n, np.float32)
        comm.allreduce(x, algorithm="ring")  # scratch allocated outside the measurement
        tracemalloc.start()
        comm.allreduce(x, algorithm="ring")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert np.all(x == comm.size**2)
    assert peaks[1] < 64 * 1024 and peaks[1] < 2 * peaks[0] + 16 * 1024, peaks


@pytest.mark.mpi
def test_auto_choice_follows_the_thresholds(comm: Communicator) -> None:
    small, large = comm.tuning.allreduce_small_bytes, comm.tuning.broadcast_large_bytes
    shm_from = comm.tuning.allreduce_shm_bytes
    choose = comm.tuning.allreduce_algorithm
    assert choose(small - 4, half=False, memory="none") == "native"
    assert choose(small, half=False, memory="none") == "ring"
    assert choose(shm_from - 4, half=False, memory="shared") == "native"
    assert choose(shm_from, half=False, memory="shared") == "shm"
    assert choose(16, half=True, memory="shared") == "shm"
    assert choose(16, half=True, memory="none") == "doubling"
    assert choose(small * 2, half=True, memory="none") == "ring"
    assert large > small
    broadcast = comm.tuning.broadcast_algorithm
    assert broadcast(large, comm.size, memory="none") == ("scatter" if comm.size > 2 else "native")
    assert broadcast(large - 4, comm.size, memory="none") == "native"
    shm_bytes = comm.tuning.broadcast_shm_bytes
    assert broadcast(shm_bytes, comm.size, memory="shared") == "shm"
    assert broadcast(shm_bytes - 4, comm.size, memory="shared") == "native"


def test_tuning_from_environment() -> None:
    tuned = Tuning.from_env({"MPITRAIN_SEGMENT_BYTES": "4096", "MPITRAIN_ALLREDUCE_SMALL_BYTES": "0"})
    assert tuned.segment_bytes == 4096 and tuned.allreduce_small_bytes == 0
    assert tuned.broadcast_large_bytes == Tuning().broadcast_large_bytes
    assert "segment_bytes=4096" in tuned.describe()
    with pytest.raises(ValueError, match="MPITRAIN_SEGMENT_BYTES='4k': expected an integer"):
        Tuning.from_env({"MPITRAIN_SEGMENT_BYTES": "4k"})
    with pytest.raises(ValueError, match="segment_bytes must be at least 64"):
        Tuning(segment_bytes=8)
    band = Tuning.from_env({"MPITRAIN_STAGED_NATIVE_BYTES": "1024,2048"})
    assert band.staged_native_bytes == (1024, 2048)
    with pytest.raises(ValueError, match="expected 2 comma-separated integers"):
        Tuning.from_env({"MPITRAIN_STAGED_NATIVE_BYTES": "1024"})


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
    _raises_everywhere(lambda: comm.reduce_scatter(good.copy(), algorithm="tree"), ValueError, "unknown algorithm")
    if comm.size > 1:  # a shared buffer on one rank, a private one elsewhere: in place and staged do not mix
        shared = comm.allocate(6)
        _raises_everywhere(lambda: comm.allreduce(shared if comm.rank == odd else good.copy()), ValueError, "disagree")
        comm.release(shared)
    _raises_everywhere(lambda: comm.allgather(np.zeros(12)[::2]), ValueError, "C-contiguous")
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
    _raises_everywhere(lambda: comm.allgather(np.zeros(4 + comm.rank)), ValueError, "ranks disagree")
    # The communicator is still usable afterwards.
    x = np.ones(5)
    comm.allreduce(x)
    assert np.array_equal(x, np.full(5, comm.size))


@pytest.mark.mpi
def test_unchecked_mode_raises_local_errors_locally() -> None:
    comm = Communicator(checked=False)
    with pytest.raises(ValueError, match="unknown op"):
        comm.allreduce(np.zeros(3), op="prod")
    with pytest.raises(TypeError, match="unsupported dtype"):
        comm.allreduce(np.zeros(3, np.complex64))
    x = rank_data(1001, np.float64, comm.rank)
    expected, tol = native_reduce(x, "sum"), tolerance(x)
    comm.allreduce(x)
    assert max_error(x, expected) <= tol


@pytest.mark.mpi
def test_agreement_raises_one_ranks_error_everywhere(comm: Communicator) -> None:
    def body():
        with comm.agreement():
            if comm.rank == comm.size - 1:
                raise FileNotFoundError("data.npz: no such file")

    _raises_everywhere(body, FileNotFoundError, f"rank {comm.size - 1}: data.npz: no such file")
    with comm.agreement():
        pass


@pytest.mark.mpi
@pytest.mark.parametrize(
    "raised,expected",
    [(PermissionError, OSError), (IsADirectoryError, OSError), (ZeroDivisionError, RuntimeError)],
)
def test_an_agreed_error_keeps_its_nearest_known_type(comm: Communicator, raised, expected) -> None:
    def body():
        with comm.agreement():
            if comm.rank == 0:
                raise raised("out.npz")

    _raises_everywhere(body, expected, "rank 0: out.npz")


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "doubling", "shm", "auto"])
@pytest.mark.parametrize("op", ["sum", "mean", "max"])
@pytest.mark.parametrize("n", [1, P + 1, 1000, 100_003])
def test_bfloat16_allreduce_in_float32(shared_comm: Communicator, algorithm: str, op: str, n: int) -> None:
    values = rank_data(n, np.float32, shared_comm.rank, seed=5)
    x = shared_comm.allocate(n, BFLOAT16) if algorithm in ("shm", "auto") else np.empty(n, BFLOAT16)
    x[...] = values
    exact = x.astype(np.float64)
    expected = native_reduce(exact, op)
    scale = np.abs(exact)
    WORLD.Allreduce(MPI.IN_PLACE, scale, op=MPI.SUM)
    shared_comm.allreduce(x, op=op, algorithm=algorithm)
    error = np.abs(x.astype(np.float64) - expected)
    assert x.dtype == BFLOAT16
    assert (error <= (P + 1) * 2.0**-8 * scale + 1e-30).all()
    assert same_on_every_rank(x.view(np.uint16))


@pytest.mark.mpi
def test_bfloat16_rejects_native(comm: Communicator) -> None:
    _raises_everywhere(
        lambda: comm.allreduce(np.zeros(4, BFLOAT16), algorithm="native"), ValueError, "cannot reduce bfloat16"
    )


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "doubling", "native", "auto"])
def test_unsigned_integers_are_reduced_as_integers_not_bfloat16(comm: Communicator, algorithm: str) -> None:
    # Defect: uint16 was taken for bfloat16 bit patterns ([300, 20000, 40000, 65535] over 2 ranks gave
    # [428, 20128, 40128, 65535]). Now it wraps like MPI's own unsigned sum.
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16):
        x = np.array([300, 20000, 40000, 65535, comm.rank], np.uint64).astype(dtype)
        expected = x.copy()
        WORLD.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
        comm.allreduce(x, op="sum", algorithm=algorithm)
        assert x.dtype == dtype and np.array_equal(x, expected), (dtype, x, expected)
    _raises_everywhere(lambda: comm.allreduce(np.zeros(4, np.uint16), op="mean"), TypeError, "floating dtype")


def test_the_dtype_list_in_errors_is_the_one_the_readme_gives() -> None:
    with open(__file__.replace("tests/test_comm.py", "README.md")) as f:
        readme = f.read()
    with pytest.raises(TypeError) as info:
        Communicator(MPI.COMM_SELF, checked=False).allreduce(np.zeros(2, np.complex64))
    listed = str(info.value).split("expected one of ")[1]
    assert listed == ", ".join(map(str, ALL_DTYPES))
    assert f"Buffers are C-contiguous, writable numpy arrays of {listed}" in " ".join(readme.split())
