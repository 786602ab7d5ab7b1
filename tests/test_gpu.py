"""The GPU path on a real GPU: skipped where cupy or a GPU is missing (CPU-only CI).

References: the numpy backend on the same seed and data (layers, training),
MPI's native collectives on host copies (device collectives, both paths
where the MPI allows them), an uninterrupted run (resume). Run them with
``benchmarks/gpu_check.sh`` or ``mpiexec -n 2 python -m mpi4py -m pytest
--with-mpi -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpitrain import backend
from mpitrain.comm import Communicator, Tuning
from mpitrain.nn import MaskStream, SoftmaxCrossEntropy, build_model
from mpitrain.train import train, train_config
from tests.conftest import WORLD, rank_data, shared_folder
from tests.test_comm import max_error, native_reduce, tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cupy" not in backend.available_backends(), reason="needs cupy and a GPU"),
]
P = WORLD.Get_size()
SMALL = {"epochs": 3, "progress": False, "hidden": (64,), "batch_size": 32, "seed": 4}


@pytest.fixture(scope="module", autouse=True)
def _this_ranks_gpu() -> None:
    backend.select_device(WORLD.Get_rank())


def _models(name: str, shape: tuple[int, ...]):
    cupy = backend.get_array_module("cupy")
    pair = []
    for xp in (np, cupy):
        model = build_model(name, shape, 10, (32,)).init_params(seed=3, xp=xp, dtype=np.float32)
        pair.append(model)
    return cupy, pair


@pytest.mark.parametrize(("name", "shape"), [("mlp", (64,)), ("cnn", (1, 8, 8))])
def test_every_layer_forward_and_backward_on_cupy_equal_numpys(name: str, shape: tuple[int, ...]) -> None:
    cupy, (host, device) = _models(name, shape)
    x = np.random.default_rng(0).standard_normal((16, *shape)).astype(np.float32)
    y = np.arange(16) % 10
    results = []
    for model, xp in ((host, np), (device, cupy)):
        loss = SoftmaxCrossEntropy()
        model.zero_grad()
        value = loss.forward(model.forward(backend.to_device(x, xp)), backend.to_device(y, xp))
        model.backward(loss.backward())
        results.append((float(value), backend.to_host(model.flat_grads).copy()))
    (host_loss, host_grads), (device_loss, device_grads) = results
    assert abs(host_loss - device_loss) <= 1e-5 * max(1.0, abs(host_loss))
    assert np.allclose(device_grads, host_grads, rtol=1e-4, atol=1e-5)


def test_bfloat16_rounding_on_the_device_is_ml_dtypes_bit_for_bit() -> None:
    import ml_dtypes

    from mpitrain.comm.compress import _round_to_bfloat16

    cupy = backend.get_array_module("cupy")
    rng = np.random.default_rng(2)
    values = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-40, 38, 200_000)).astype(np.float32)
    values = values[np.isfinite(values)]
    out = cupy.empty(values.size, np.uint16)
    _round_to_bfloat16(cupy, cupy.asarray(values), out)
    assert np.array_equal(cupy.asnumpy(out), values.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_dropout_masks_drawn_on_the_device_equal_numpys() -> None:
    cupy = backend.get_array_module("cupy")
    for p in (0.1, 0.5):
        host = MaskStream(9).keep(np, (256, 333), p)
        device = MaskStream(9).keep(cupy, (256, 333), p)
        assert isinstance(device, cupy.ndarray) and np.array_equal(cupy.asnumpy(device), host)


@pytest.mark.mpi
@pytest.mark.parametrize("path", ["staged", "staged-gpu", "direct", "nccl"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64])
def test_device_collectives_equal_native_on_host_copies(path: str, dtype: type) -> None:
    cupy = backend.get_array_module("cupy")
    comm = Communicator(tuning=Tuning(device_segment_bytes=1 << 16))
    try:
        if path == "direct" and not comm.cuda_aware.aware:
            pytest.skip(f"MPI is not CUDA-aware here ({comm.cuda_aware.detail})")
        if path == "nccl" and (backend.nccl_module() is None or cupy.cuda.runtime.getDeviceCount() < P):
            pytest.skip("nccl needs cupy.cuda.nccl and one GPU per rank")
        if path == "staged-gpu" and not comm.single_node:
            pytest.skip("staged-gpu needs one node")
        wrong = []
        for n in (0, 1, P + 1, 100_003, 3_000_001):
            x = rank_data(n, dtype, comm.rank, seed=2)
            device = cupy.asarray(x)
            comm.allreduce(device, algorithm=path)
            tol = tolerance(x.astype(np.float32)) * (16 if dtype == np.float16 else 1)
            if max_error(cupy.asnumpy(device), native_reduce(x, "sum")) > tol:
                wrong.append((n, "allreduce"))
            if path == "staged-gpu":  # an all-reduce only
                continue
            device = cupy.asarray(x)
            comm.broadcast(device, root=P - 1, algorithm=path)
            expected = x.copy()
            WORLD.Bcast(expected, root=P - 1)
            if not np.array_equal(cupy.asnumpy(device), expected):
                wrong.append((n, "broadcast"))
            if path != "nccl":
                device = cupy.asarray(x)
                start, stop = comm.reduce_scatter(device, algorithm=path)
                if max_error(cupy.asnumpy(device)[start:stop], native_reduce(x, "sum")[start:stop]) > tol:
                    wrong.append((n, "reduce_scatter"))
                device = cupy.asarray(x)
                comm.allgather(device, algorithm=path)
                if not np.array_equal(cupy.asnumpy(device), x if P == 1 else _gathered(x, comm)):
                    wrong.append((n, "allgather"))
        assert not wrong
    finally:
        comm.close()


def _gathered(x: np.ndarray, comm: Communicator) -> np.ndarray:
    out = x.copy()
    comm.allgather(out, algorithm="native")
    return out


@pytest.mark.mpi
def test_training_on_cupy_reaches_numpys_accuracy() -> None:
    with Communicator() as comm:
        host = train(train_config(**SMALL), comm).history[-1]["accuracy"]
        device = train(train_config(**SMALL, backend="cupy"), comm).history[-1]["accuracy"]
    assert abs(host - device) <= 0.02, (host, device)


@pytest.mark.mpi
def test_resume_on_the_gpu_is_bit_identical(tmp_path) -> None:
    folder = shared_folder(tmp_path)
    base = {**SMALL, "backend": "cupy", "dropout": 0.1}
    with Communicator() as comm:
        whole = train(train_config(**base), comm).strategy.model.flat_params
        train(train_config(**base, checkpoint_dir=folder, checkpoint_every=20, max_steps=30), comm)
        resumed = train(train_config(**base, checkpoint_dir=folder, resume=folder), comm).strategy.model.flat_params
    assert backend.to_host(resumed).tobytes() == backend.to_host(whole).tobytes()


@pytest.mark.mpi
def test_a_steady_state_step_copies_only_the_batch_and_the_staged_gradients(monkeypatch) -> None:
    """Copies made through backend's primitives (to_device, to_host, the staged transfers), in two runs
    that stop inside the first epoch (no evaluation) after different step counts: the extra steps
    must add the batch's two copies each, no copy to the host, and the same staged copies each.
    A scalar read by ``float()`` of a device array does not pass through backend and is not counted."""
    counts = {"to_device": 0, "to_host": 0, "staged": 0}
    for name in ("to_device", "to_host"):
        original = getattr(backend, name)

        def counted(*args, _original=original, _name=name):
            counts[_name] += 1
            return _original(*args)

        monkeypatch.setattr(backend, name, counted)
    copy = backend.Transfers._copy

    def staged(self, *args):
        counts["staged"] += 1
        return copy(self, *args)

    monkeypatch.setattr(backend.Transfers, "_copy", staged)
    seen = []
    with Communicator() as comm:
        for steps in (4, 10):
            counts.update(to_device=0, to_host=0, staged=0)
            train(train_config(**SMALL, backend="cupy", max_steps=steps), comm)
            seen.append(dict(counts))
        aware = comm.cuda_aware.aware
    extra = {k: seen[1][k] - seen[0][k] for k in counts}
    assert extra["to_device"] == 2 * 6 and extra["to_host"] == 0, (seen, extra)
    assert extra["staged"] % 6 == 0 and (extra["staged"] == 0) == (P == 1 or aware), (seen, extra)
