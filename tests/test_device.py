"""Collectives and messages on device arrays, on a CPU, through the cupy stand-in (``fake_cupy``).

The stand-in's "device" memory is host memory that is reachable only
through ``__cuda_array_interface__``, so the direct path really hands MPI
an array by that interface (as with cupy on a CUDA-aware MPI), and the
staged path is shown never to let MPI read it. References: the same host
algorithm on a host copy of the same rank-dependent data (bit for bit),
and MPI's native collective on host copies. Tiny segments force many
pipelined pieces per call.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpitrain.comm import Communicator, Tuning, raised_on_all_ranks
from mpitrain.comm.ops import UFUNCS
from tests import fake_cupy
from tests.conftest import WORLD, rank_data, same_on_every_rank
from tests.test_comm import max_error, native_reduce, tolerance
from tests.test_staging import relative_eps

P = WORLD.Get_size()
SIZES = [0, 1, P + 1, 1000, 20_011]
SMALL_SEGMENTS = Tuning(device_segment_bytes=512)
DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64]


@pytest.fixture
def device_comm(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """(the cupy stand-in, a Communicator whose MPI is told CUDA-aware or not by the test's ``aware`` param)."""
    cupy = fake_cupy.install(monkeypatch)
    monkeypatch.setenv("MPITRAIN_CUDA_AWARE", "1" if request.param else "0")
    comm = Communicator(tuning=SMALL_SEGMENTS)
    yield cupy, comm
    comm.close()


def _reduced(cupy, comm: Communicator, dtype: type, algorithm: str, seed: int):
    """(n, op, the host data, its device copy all-reduced with ``algorithm``) for every size and op."""
    for n in SIZES:
        for op in ("sum", "mean", "max") if np.dtype(dtype).kind == "f" else ("sum", "min"):
            x = rank_data(n, dtype, comm.rank, seed=seed)
            device = cupy.asarray(x)
            comm.allreduce(device, op=op, algorithm=algorithm)
            yield n, op, x, device


def host_reference(name: str, x: np.ndarray, algorithm: str, comm: Communicator, **kwargs) -> tuple:
    """The host collective on a host copy; (the copy, what the call returned)."""
    copy = x.copy()
    returned = getattr(comm, name)(copy, algorithm=algorithm, **kwargs)
    return copy, returned


@pytest.mark.mpi
@pytest.mark.parametrize("device_comm", [False], indirect=True)
@pytest.mark.parametrize("algorithm", ["auto", "staged", "ring", "native", "shm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_staged_allreduce_equals_the_host_algorithm_and_mpi_never_sees_the_device(device_comm, algorithm, dtype):
    cupy, comm = device_comm
    wrong = []
    for n, op, x, device in _reduced(cupy, comm, dtype, algorithm, seed=5):
        # The same host algorithm, segment by segment, on node-shared memory as the staged path uses.
        shared = comm.allocate(n, dtype) if comm.shared is not None else np.empty(n, dtype)
        shared[...] = x
        step = SMALL_SEGMENTS.device_segment_bytes // x.itemsize
        for a in range(0, n, step):
            comm.allreduce(shared[a : a + step], op=op, algorithm="auto" if algorithm == "staged" else algorithm)
        expected = shared.copy()
        comm.release(shared)
        tol = tolerance(x.astype(np.float32)) * relative_eps(dtype)
        if not np.array_equal(device.get(), expected, equal_nan=True):
            wrong.append((n, op, "differs from the host algorithm"))
        if not same_on_every_rank(device.get()):
            wrong.append((n, op, "differs between ranks"))
        if max_error(device.get(), native_reduce(x, op)) > tol:
            wrong.append((n, op, "differs from native"))
    assert not wrong
    assert fake_cupy.INTERFACE_READS[0] == 0, "MPI was handed a device array on the staged path"


@pytest.mark.mpi
@pytest.mark.parametrize("device_comm", [True], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_allreduce_is_mpis_native_call_on_the_device_array(device_comm, dtype):
    cupy, comm = device_comm
    wrong = []
    for n in SIZES:
        x = rank_data(n, dtype, comm.rank, seed=6)
        device = cupy.asarray(x)
        comm.allreduce(device, algorithm="auto")  # CUDA-aware: auto is direct
        expected, _ = host_reference("allreduce", x, "native", comm)
        if not np.array_equal(device.get(), expected):
            wrong.append(n)
    assert not wrong
    assert fake_cupy.INTERFACE_READS[0] > 0 or P == 1


@pytest.mark.mpi
@pytest.mark.parametrize("device_comm", [False, True], indirect=True)
@pytest.mark.parametrize("algorithm", ["auto", "staged", "native", "tree", "scatter", "shm"])
def test_device_broadcast_matches_native(device_comm, algorithm):
    cupy, comm = device_comm
    wrong = []
    for n in SIZES:
        for root in {0, P - 1}:
            x = rank_data(n, np.float32, comm.rank, seed=7)
            device = cupy.asarray(x)
            comm.broadcast(device, root=root, algorithm=algorithm)
            expected = x.copy()
            WORLD.Bcast(expected, root=root)
            if not np.array_equal(device.get(), expected):
                wrong.append((n, root))
    assert not wrong


@pytest.mark.mpi
@pytest.mark.parametrize("device_comm", [False, True], indirect=True)
@pytest.mark.parametrize("algorithm", ["auto", "staged", "ring", "native", "shm"])
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_device_reduce_scatter_and_allgather_match_the_host(device_comm, algorithm, dtype):
    cupy, comm = device_comm
    host_algorithm = "auto" if algorithm == "staged" else algorithm
    wrong = []
    for n in SIZES:
        x = rank_data(n, dtype, comm.rank, seed=8)
        device = cupy.asarray(x)
        start, stop = comm.reduce_scatter(device, op="sum", algorithm=algorithm)
        expected, owned = host_reference("reduce_scatter", x, host_algorithm, comm)
        direct = comm.device_path(algorithm) == "direct"
        if (start, stop) != (comm.chunk_bounds(n)[comm.rank] if direct else owned):
            wrong.append((n, "chunk", (start, stop)))
        total = native_reduce(x, "sum")
        if max_error(device.get()[start:stop], total[start:stop]) > tolerance(x.astype(np.float32)):
            wrong.append((n, "reduce_scatter"))
        if not direct and not np.array_equal(device.get()[start:stop], expected[start:stop]):
            wrong.append((n, "reduce_scatter differs from the host algorithm"))
        gathered = cupy.asarray(x)
        comm.allgather(gathered, algorithm=algorithm)
        expected, _ = host_reference("allgather", x, host_algorithm, comm)
        if not np.array_equal(gathered.get(), expected):
            wrong.append((n, "allgather"))
    assert not wrong


@pytest.mark.mpi
@pytest.mark.parametrize("device_comm", [False, True], indirect=True)
def test_device_messages_arrive_whole_on_both_paths(device_comm):
    cupy, comm = device_comm
    right, left = (comm.rank + 1) % P, (comm.rank - 1) % P
    reads_before = fake_cupy.INTERFACE_READS[0]
    wrong = []
    for n in (1, 1000, 70_000):
        x = cupy.asarray(rank_data(n, np.float64, comm.rank, seed=9))
        into = cupy.empty(n, np.float64)
        message = comm.sendrecv(x, right, into, left)
        if message.count != n or not np.array_equal(into.get(), rank_data(n, np.float64, left, seed=9)):
            wrong.append((n, "sendrecv"))
        again = cupy.empty(n, np.float64)
        receive, send = comm.irecv(again, left), comm.isend(x, right)
        send.wait()
        receive.wait()
        if not np.array_equal(again.get(), rank_data(n, np.float64, left, seed=9)):
            wrong.append((n, "isend/irecv"))
        if comm.rank == 0 and P > 1:
            comm.send(x, 1, tag=3)
        elif comm.rank == 1:
            blocking = cupy.empty(n, np.float64)
            comm.recv(blocking, 0, tag=3)
            if not np.array_equal(blocking.get(), rank_data(n, np.float64, 0, seed=9)):
                wrong.append((n, "send/recv"))
    assert not wrong
    exposed = fake_cupy.INTERFACE_READS[0] > reads_before
    assert exposed == comm.cuda_aware.aware


@pytest.mark.mpi
@pytest.mark.parametrize("device_comm", [False], indirect=True)
def test_direct_on_an_mpi_not_shown_cuda_aware_is_refused_on_every_rank(device_comm):
    cupy, comm = device_comm
    with pytest.raises(ValueError, match="not CUDA-aware") as caught:
        comm.allreduce(cupy.asarray(np.ones(8, np.float32)), algorithm="direct")
    assert raised_on_all_ranks(caught.value)
    assert fake_cupy.INTERFACE_READS[0] == 0


@pytest.mark.mpi
@pytest.mark.parametrize("device_comm", [False], indirect=True)
def test_a_device_array_on_one_rank_and_a_host_array_on_another_is_an_error_everywhere(device_comm):
    cupy, comm = device_comm
    x = np.ones(16, np.float32)
    buf = cupy.asarray(x) if comm.rank == 0 else x
    if P == 1:
        pytest.skip("needs two ranks")
    with pytest.raises(ValueError) as caught:
        comm.allreduce(buf)
    assert raised_on_all_ranks(caught.value)


@pytest.mark.mpi
@pytest.mark.parametrize("device_comm", [False], indirect=True)
def test_nccl_without_nccl_and_bad_device_buffers_say_why(device_comm):
    cupy, comm = device_comm
    with pytest.raises(ValueError, match=r"cupy\.cuda\.nccl"):
        comm.allreduce(cupy.asarray(np.ones(4, np.float32)), algorithm="nccl")
    with pytest.raises(ValueError, match="unknown algorithm 'nccl'"):
        comm.allgather(cupy.asarray(np.ones(4, np.float32)), algorithm="nccl")
    with pytest.raises(ValueError, match="C-contiguous"):
        comm.allreduce(cupy.asarray(np.ones((4, 4), np.float32))[:, 1])
    with pytest.raises(TypeError, match="unsupported dtype"):
        comm.allreduce(cupy.asarray(np.ones(4, np.complex64)))


@pytest.mark.mpi
@pytest.mark.parametrize("device_comm", [False], indirect=True)
def test_staging_memory_is_allocated_once_and_reused(device_comm):
    cupy, comm = device_comm
    for _ in range(3):  # "mean": staged at one rank too (it has values to finish)
        comm.allreduce(cupy.asarray(rank_data(5000, np.float32, comm.rank)), op="mean")
    first = comm._staging_memory(1, np.dtype(np.float32)).ctypes.data
    comm.allreduce(cupy.asarray(rank_data(5000, np.float32, comm.rank)), op="mean")
    comm.reduce_scatter(cupy.asarray(rank_data(3000, np.float32, comm.rank)))
    staging = comm._staging_memory(1, np.dtype(np.float32))
    assert staging.ctypes.data == first
    assert comm.shares(staging) == (comm.shared is not None)  # node-shared: the host collective is shm in place
    assert (staging.ctypes.data in fake_cupy.REGISTERED) == (comm.shared is not None)  # and page-locked
    comm.close()
    assert not fake_cupy.REGISTERED  # unlocked before the window went


@pytest.mark.mpi
def test_the_library_api_reduces_device_arrays_on_the_device(monkeypatch: pytest.MonkeyPatch):
    from mpitrain import api

    cupy = fake_cupy.install(monkeypatch)
    monkeypatch.setenv("MPITRAIN_CUDA_AWARE", "0")
    api.init(timeout=60)
    try:
        x = rank_data(1001, np.float32, WORLD.Get_rank(), seed=10)
        mean = api.allreduce(cupy.asarray(x))
        grouped = api.grouped_allreduce([cupy.asarray(x), cupy.asarray(x[:7])], op="sum")
        root = api.broadcast(cupy.asarray(x), root=P - 1)
        gathered = api.allgather(cupy.asarray(x[: WORLD.Get_rank() + 1]))
    finally:
        api.shutdown()
    assert all(isinstance(a, cupy.ndarray) for a in (mean, *grouped, root, gathered))
    assert max_error(mean.get(), native_reduce(x, "mean")) <= tolerance(x)
    assert max_error(grouped[1].get(), native_reduce(x[:7], "sum")) <= tolerance(x)
    expected = x.copy()
    WORLD.Bcast(expected, root=P - 1)
    assert np.array_equal(root.get(), expected)
    pieces = [rank_data(1001, np.float32, r, seed=10)[: r + 1] for r in range(P)]
    assert np.array_equal(gathered.get(), np.concatenate(pieces))
    assert fake_cupy.INTERFACE_READS[0] == 0


@pytest.mark.mpi
def test_nccl_reduces_and_broadcasts_with_one_gpu_per_rank_and_refuses_shared_ones(monkeypatch):
    from mpitrain import backend

    cupy = fake_cupy.install(monkeypatch, nccl=True)
    nccl = backend.nccl_module()
    wrong = []
    with Communicator() as shared:  # one "GPU" for every rank
        if P > 1:
            with pytest.raises(ValueError, match="one GPU per rank"):
                shared.allreduce(cupy.asarray(np.ones(4, np.float32)), algorithm="nccl")
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: P)
    backend.select_device(WORLD.Get_rank())
    with Communicator() as comm:
        for dtype in (np.float16, np.float32, np.int64):
            for op in ("sum", "mean", "max") if np.dtype(dtype).kind == "f" else ("sum", "min"):
                x = rank_data(1001, dtype, comm.rank, seed=12)
                device = cupy.asarray(x)
                comm.allreduce(device, op=op, algorithm="nccl")
                tol = tolerance(x.astype(np.float32)) * relative_eps(dtype)
                if max_error(device.get(), native_reduce(x, op)) > tol:
                    wrong.append((dtype.__name__, op))
            x = rank_data(77, dtype, comm.rank, seed=13)
            device = cupy.asarray(x)
            comm.broadcast(device, root=P - 1, algorithm="nccl")
            expected = x.copy()
            WORLD.Bcast(expected, root=P - 1)
            if not np.array_equal(device.get(), expected):
                wrong.append((dtype.__name__, "broadcast"))
    assert not wrong
    assert {name for name, _, _ in nccl.calls} == ({"allReduce", "bcast"} if P > 1 else set())  # 1 rank: no call
    assert fake_cupy.INTERFACE_READS[0] == 0  # NCCL takes pointers; MPI saw no device array


@pytest.mark.mpi
@pytest.mark.parametrize("device_comm", [False], indirect=True)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int64])
def test_staged_gpu_reduces_each_chunk_on_its_owners_device_in_node_rank_order(device_comm, dtype):
    from mpitrain.comm.ring import chunk_bounds

    cupy, comm = device_comm
    wrong = []
    for n, op, x, device in _reduced(cupy, comm, dtype, "staged-gpu", seed=14):
        everyone = WORLD.allgather(x)  # the reference: chunk r = x_r, then the others added in rank order
        expected = np.empty_like(x)
        ufunc = UFUNCS[op]
        for owner, (a, b) in enumerate(chunk_bounds(n, P)):
            part = everyone[owner][a:b].copy()
            for rank in range(P):
                if rank != owner:
                    ufunc(part, everyone[rank][a:b], out=part)
            expected[a:b] = part / P if op == "mean" else part
        if not np.array_equal(device.get(), expected):
            wrong.append((n, op))
    assert not wrong
    assert fake_cupy.INTERFACE_READS[0] == 0


@pytest.mark.mpi
@pytest.mark.parametrize("device_comm", [False], indirect=True)
def test_staged_gpu_page_locks_the_peers_copies_it_reads_once_and_unlocks_them_on_close(device_comm):
    cupy, comm = device_comm
    if comm.size == 1:
        pytest.skip("one rank reduces on its device without staging")
    staged = cupy.asarray(rank_data(3000, np.float32, comm.rank))
    comm.allreduce(staged)  # "staged": only this rank's own copy is page-locked
    own = comm._staging_memory(1, np.dtype(np.float32))
    assert {own.ctypes.data} == fake_cupy.REGISTERED
    for _ in range(2):  # the second call registers nothing again (CUDA would refuse it)
        comm.allreduce(staged, algorithm="staged-gpu")
    window, _ = comm._find_shared(own)
    assert {peer.ctypes.data for peer in window.peers} == fake_cupy.REGISTERED  # every node rank's copy
    comm.close()
    assert not fake_cupy.REGISTERED


@pytest.mark.mpi
@pytest.mark.parametrize("device_comm", [False], indirect=True)
def test_staged_gpu_needs_one_node(device_comm):
    cupy, _ = device_comm
    if P % 2 or P == 2:
        pytest.skip("needs fake nodes of 2 ranks, at least two of them")
    with Communicator(node_size=2) as comm, pytest.raises(ValueError, match="one node"):
        comm.allreduce(cupy.asarray(np.ones(8, np.float32)), algorithm="staged-gpu")
