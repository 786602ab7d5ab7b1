"""The Horovod-style library API: collectives on a user's own arrays against MPI's, the process layout,
parameter and optimizer-state broadcasts that leave the root alone, and DistributedOptimizer against one
process on the whole batch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI

import mpitrain as mt
from mpitrain.jobs import child_environment, mpiexec_command
from mpitrain.nn import SoftmaxCrossEntropy, build_model
from mpitrain.optim import SGD, Adam

WORLD = MPI.COMM_WORLD


@pytest.fixture(scope="module", autouse=True)
def api():
    mt.init()
    yield
    mt.shutdown()


def _mine(shape=(5, 3), dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(WORLD.Get_rank())
    return rng.normal(size=shape).astype(dtype)


@pytest.mark.mpi
@pytest.mark.parametrize("op,native", [("sum", MPI.SUM), ("max", MPI.MAX), ("min", MPI.MIN), ("mean", MPI.SUM)])
def test_allreduce_matches_mpi_and_leaves_the_argument_alone(op: str, native) -> None:
    x = _mine()
    before = x.copy()
    got = mt.allreduce(x, op=op)
    expected = np.empty_like(x)
    WORLD.Allreduce(x, expected, op=native)
    if op == "mean":
        expected /= WORLD.Get_size()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert np.array_equal(x, before) and got is not x


@pytest.mark.mpi
def test_integer_sums_and_lists_are_taken_as_arrays() -> None:
    got = mt.allreduce([WORLD.Get_rank(), 1], op="sum")
    assert got.tolist() == [sum(range(WORLD.Get_size())), WORLD.Get_size()]


@pytest.mark.mpi
def test_async_handles_finish_in_submission_order_whatever_order_they_are_waited() -> None:
    arrays = [_mine((n,)) for n in (1, 100, 10_000)]
    handles = [mt.allreduce_async(a, op="sum") for a in arrays]
    results = [h.wait() for h in reversed(handles)][::-1]
    for a, got in zip(arrays, results, strict=True):
        expected = np.empty_like(a)
        WORLD.Allreduce(a, expected, op=MPI.SUM)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert all(h.done() for h in handles)


@pytest.mark.mpi
def test_grouped_allreduce_equals_one_allreduce_each() -> None:
    arrays = [_mine((3, 4)), _mine((7,)), _mine((0,)), _mine((2, 2, 2))]
    grouped = mt.grouped_allreduce(arrays)
    for a, got in zip(arrays, grouped, strict=True):
        assert got.shape == a.shape
        np.testing.assert_allclose(got, mt.allreduce(a), rtol=1e-12)


@pytest.mark.mpi
def test_grouped_allreduce_of_mixed_dtypes_reduces_each_in_its_own_dtype() -> None:
    arrays = [_mine((3,)), _mine((4,), np.float32), (_mine((2, 2)) * 100).astype(np.int64), _mine((5,))]
    grouped = mt.grouped_allreduce(arrays, op="sum")
    for a, got in zip(arrays, grouped, strict=True):
        expected = np.empty_like(a)
        WORLD.Allreduce(a, expected, op=MPI.SUM)
        assert got.dtype == a.dtype and got.shape == a.shape
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="floating dtype"):
        mt.grouped_allreduce([np.zeros(2), np.zeros(2, np.int32)])


@pytest.mark.mpi
def test_broadcast_allgather_objects_and_layout() -> None:
    size, me = WORLD.Get_size(), WORLD.Get_rank()
    root = size - 1
    x = _mine((4,))
    got = mt.broadcast(x, root=root)
    np.testing.assert_array_equal(got, WORLD.bcast(x, root=root))
    gathered = mt.allgather(np.full((me + 1, 2), me, np.int32))  # first dimensions differ
    assert gathered.shape == (size * (size + 1) // 2, 2)
    assert gathered[:, 0].tolist() == [r for r in range(size) for _ in range(r + 1)]
    assert mt.broadcast_object({"from": me}, root=root) == {"from": root}
    mt.barrier()
    node = WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    assert (mt.rank(), mt.size(), mt.local_rank(), mt.local_size()) == (me, size, node.Get_rank(), node.Get_size())
    assert mt.cross_size() * mt.local_size() == size and mt.cross_rank() == 0  # one node here
    node.Free()


@pytest.mark.mpi(min_size=2)
def test_arrays_of_different_shapes_are_one_error_on_every_rank() -> None:
    with pytest.raises(ValueError, match="rank") as caught:
        mt.allreduce(np.zeros(3 + WORLD.Get_rank()))
    assert getattr(caught.value, "on_all_ranks", False)
    np.testing.assert_allclose(mt.allreduce(np.ones(2), op="sum"), WORLD.Get_size())  # still usable


def test_a_call_before_init_says_what_to_do() -> None:
    import mpitrain.api as api

    state, api._STATE = api._STATE, None
    try:
        with pytest.raises(RuntimeError, match=r"call mpitrain.init\(\) first"):
            mt.rank()
    finally:
        api._STATE = state


def _model(seed: int):
    return build_model("mlp", (8,), 4, (16,)).init_params(seed=seed, dtype=np.float64)


@pytest.mark.mpi
def test_broadcast_parameters_and_optimizer_state_leave_the_root_alone() -> None:
    model = _model(seed=WORLD.Get_rank())  # every rank different
    optimizer = Adam(model.flat_params, model.flat_grads, 1e-3)
    model.flat_grads[...] = WORLD.Get_rank() + 1.0
    for _ in range(WORLD.Get_rank() + 1):  # different state and step counts
        optimizer.step()
    root = WORLD.Get_size() - 1
    before = {k: np.array(v, copy=True) for k, v in optimizer.state_dict().items()}
    params_before = model.flat_params.copy()
    mt.broadcast_parameters(model, root=root)
    mt.broadcast_optimizer_state(optimizer, root=root)
    state = optimizer.state_dict()
    expected = WORLD.bcast({k: np.array(v) for k, v in before.items()}, root=root)
    assert all(np.array_equal(state[k], expected[k]) for k in expected), "a state buffer differs from the root's"
    np.testing.assert_array_equal(model.flat_params, WORLD.bcast(params_before, root=root))
    if WORLD.Get_rank() == root:  # read, never changed
        assert all(np.array_equal(state[k], before[k]) for k in before)
        np.testing.assert_array_equal(model.flat_params, params_before)


def _gradient_step(model, optimizer, x, y, loss) -> None:
    out = model.forward(x)
    loss.forward(out, y)
    model.backward(loss.backward())


@pytest.mark.mpi
@pytest.mark.parametrize("passes", [1, 2])
def test_distributed_optimizer_equals_one_process_on_the_whole_batch(passes: int) -> None:
    size, me = WORLD.Get_size(), WORLD.Get_rank()
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(size * passes * 6, 8)), rng.integers(0, 4, size * passes * 6)
    reference = _model(seed=3)
    ref_opt = SGD(reference.flat_params, reference.flat_grads, 0.1, momentum=0.9)
    model = _model(seed=3)
    optimizer = mt.DistributedOptimizer(
        SGD(model.flat_params, model.flat_grads, 0.1, momentum=0.9), model, backward_passes_per_step=passes,
        bucket_bytes=256,  # several buckets: overlap during backward
    )  # fmt: skip
    loss, ref_loss = SoftmaxCrossEntropy(), SoftmaxCrossEntropy()
    for _ in range(3):
        optimizer.zero_grad()
        for p in range(passes):  # this rank's blocks of 6: the mean over ranks and passes is the whole batch's
            block = slice((p * size + me) * 6, (p * size + me + 1) * 6)
            _gradient_step(model, optimizer, x[block], y[block], loss)
        assert optimizer.step()
        reference.zero_grad()
        _gradient_step(reference, ref_opt, x, y, ref_loss)
        reference.flat_grads *= passes  # the passes' gradients add up
        ref_opt.step()
    np.testing.assert_allclose(model.flat_params, reference.flat_params, rtol=1e-10, atol=1e-13)
    optimizer.close()


@pytest.mark.mpi
def test_distributed_optimizer_refuses_an_early_step_and_skips_non_finite_gradients() -> None:
    model = _model(seed=0)
    optimizer = mt.DistributedOptimizer(
        SGD(model.flat_params, model.flat_grads, 0.1), model, backward_passes_per_step=2
    )
    x, y = np.ones((4, 8)), np.zeros(4, np.int64)
    loss = SoftmaxCrossEntropy()
    _gradient_step(model, optimizer, x, y, loss)
    with pytest.raises(RuntimeError, match=r"step\(\) after 1 backward pass\(es\)"):
        optimizer.step()
    before = model.flat_params.copy()
    _gradient_step(model, optimizer, x * (np.nan if WORLD.Get_rank() == 0 else 1), y, loss)
    assert not optimizer.step() and optimizer.skipped_steps == 1  # rank 0's NaN stops every rank's step
    np.testing.assert_array_equal(model.flat_params, before)
    optimizer.close()
    with pytest.raises(ValueError, match="op 'mean' or 'sum'"):
        mt.DistributedOptimizer(SGD(model.flat_params, model.flat_grads, 0.1), model, op="max")


@pytest.mark.mpi
def test_join_on_uneven_data_averages_over_the_ranks_that_had_a_batch() -> None:
    """Rank r has r + 1 batches; after its last one it joins. Reference: one process replaying every step,
    each step's gradient the mean over the ranks that still had a batch."""
    size, me = WORLD.Get_size(), WORLD.Get_rank()
    rng = np.random.default_rng(11)
    batches = [[(rng.normal(size=(6, 8)), rng.integers(0, 4, 6)) for _ in range(r + 1)] for r in range(size)]
    model = _model(seed=5)
    optimizer = mt.DistributedOptimizer(SGD(model.flat_params, model.flat_grads, 0.1, momentum=0.9), model,
                                        bucket_bytes=256)  # fmt: skip
    loss = SoftmaxCrossEntropy()
    for x, y in batches[me]:
        optimizer.zero_grad()
        _gradient_step(model, optimizer, x, y, loss)
        assert optimizer.step()
    last = mt.join()
    reference = _model(seed=5)
    ref_opt, ref_loss = SGD(reference.flat_params, reference.flat_grads, 0.1, momentum=0.9), SoftmaxCrossEntropy()
    for step in range(size):
        total = np.zeros_like(reference.flat_grads)
        active = [r for r in range(size) if step < len(batches[r])]
        for r in active:
            reference.zero_grad()
            _gradient_step(reference, ref_opt, *batches[r][step], ref_loss)
            total += reference.flat_grads
        reference.flat_grads[...] = total / len(active)
        ref_opt.step()
    digests = WORLD.allgather(model.flat_params.tobytes())
    assert last == size - 1 and len(set(digests)) == 1
    np.testing.assert_allclose(model.flat_params, reference.flat_params, rtol=1e-9, atol=1e-12)
    x, y = batches[me][0]  # after join every rank trains again, together
    optimizer.zero_grad()
    _gradient_step(model, optimizer, x, y, loss)
    assert optimizer.step() and optimizer.reducer.contributors == size
    optimizer.close()
    assert mt.join() == -1  # nothing to shadow: a barrier


def _script_job(tmp_path, ranks: int, text: str, timeout: int) -> subprocess.CompletedProcess:
    """A user's script ``text`` run on ``ranks`` ranks under a fresh mpiexec (MPIEXEC_TIMEOUT ``timeout``)."""
    script = tmp_path / "script.py"
    script.write_text("import time\nimport numpy as np\nimport mpitrain as mt\n" + text)
    command = mpiexec_command(ranks, sys.executable, str(script))
    env = child_environment(timeout)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout + 15, check=False)


def test_a_call_that_some_ranks_never_make_ends_the_job_naming_them(tmp_path) -> None:
    text = "mt.init(timeout=3)\nif mt.rank() == 0:\n    mt.allreduce(np.ones(3))\nelse:\n    time.sleep(60)\n"
    done = _script_job(tmp_path, 2, text, 50)
    assert done.returncode != 0
    assert "allreduce #1 has not completed" in done.stderr and "have not entered it: [1]" in done.stderr, done.stderr


def test_an_exception_one_rank_does_not_catch_ends_the_job_at_once_naming_the_rank(tmp_path) -> None:
    text = (
        "mt.init(timeout=40)\nmt.allreduce(np.ones(3))\n"
        "if mt.rank() == 1:\n    raise ValueError('bad batch on rank 1')\nmt.allreduce(np.ones(3))\n"
    )
    done = _script_job(tmp_path, 3, text, 45)
    assert done.returncode != 0
    assert "ValueError: bad batch on rank 1" in done.stderr, done.stderr
    assert "[rank 1] uncaught ValueError: ending the whole job" in done.stderr, done.stderr
    assert "has not completed" not in done.stderr, done.stderr  # not the watchdog's timeout
