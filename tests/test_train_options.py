"""--clip-grad-norm and --standardize: what Horovod and DDP users reach for, against references computed
here (the norm formula of torch.nn.utils.clip_grad_norm_, per-feature statistics of the training split)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from mpitrain import inference
from mpitrain.comm import Communicator, raised_on_all_ranks
from mpitrain.data import Scaling, scale_spread
from mpitrain.optim import clip_grad_norm
from mpitrain.train import train, train_config
from tests.conftest import WORLD, run_mpitrain, same_on_every_rank, shared_folder


def test_clip_scales_to_the_norm_as_torch_does_and_leaves_small_gradients_alone() -> None:
    rng = np.random.default_rng(0)
    g = rng.standard_normal(1000).astype(np.float32)
    norm = float(np.linalg.norm(g.astype(np.float64)))
    original = g.copy()
    assert clip_grad_norm(g, 2 * norm) == pytest.approx(norm, rel=1e-6) and np.array_equal(g, original)
    assert clip_grad_norm(g, 1.0) == pytest.approx(norm, rel=1e-6)
    np.testing.assert_allclose(g, original * (1.0 / (norm + 1e-6)), rtol=1e-6)
    assert float(np.linalg.norm(g)) == pytest.approx(1.0, rel=1e-5)


def test_clip_over_parts_held_by_different_ranks_equals_the_whole() -> None:
    rng = np.random.default_rng(1)
    whole = rng.standard_normal(999)
    parts = whole.copy()
    halves = [(0, 400), (400, 999)]
    squares = {i: float(parts[a:b] @ parts[a:b]) for i, (a, b) in enumerate(halves)}
    # each "rank" holds one part; total sums the other's squares in, as the all-reduce does
    norms = [clip_grad_norm(parts, 0.5, [halves[i]], total=lambda sq, i=i: sq + squares[1 - i]) for i in (0, 1)]
    expected = clip_grad_norm(whole, 0.5)
    assert norms[0] == pytest.approx(expected) and norms[1] == pytest.approx(expected)
    np.testing.assert_allclose(parts, whole, rtol=1e-12)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("shard", [False, True])
def test_clipped_data_parallel_training_keeps_replicas_identical(comm: Communicator, shard: bool) -> None:
    config = train_config(epochs=1, progress=False, max_steps=12, lr=0.5, clip_grad_norm=0.05, shard_optimizer=shard)
    result = train(config, comm)
    record = result.history[-1] if result.history else None
    norms = WORLD.allgather(result.strategy.engine.grad_norm)
    assert same_on_every_rank(result.model.flat_params)
    assert len(set(norms)) == 1 and norms[0] > 0.05, norms  # clipping was active, and agreed on
    assert record is None or "grad_norm" in record


@pytest.mark.mpi
def test_clipping_changes_the_run_and_an_unclipped_strategy_refuses_it(comm: Communicator) -> None:
    plain = train(train_config(epochs=1, progress=False, max_steps=6, lr=0.5), comm).model.flat_params
    clipped = train(train_config(epochs=1, progress=False, max_steps=6, lr=0.5, clip_grad_norm=0.01), comm)
    assert not np.allclose(plain, clipped.model.flat_params)
    with pytest.raises(ValueError, match="--clip-grad-norm clips the averaged gradients") as caught:
        train(train_config(epochs=1, progress=False, strategy="gossip", clip_grad_norm=1.0), comm)
    assert raised_on_all_ranks(caught.value)


def test_scaling_uses_the_training_split_only_and_keeps_constant_features() -> None:
    rng = np.random.default_rng(2)
    x_train = np.stack([rng.normal(5, 1e4, 300), rng.normal(-2, 1e-2, 300), np.full(300, 7.0)], axis=1)
    scaling = Scaling.of(x_train.astype(np.float32))
    np.testing.assert_allclose(scaling.mean, x_train.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(scaling.std[:2], x_train.std(axis=0)[:2], rtol=1e-5)
    assert scaling.std[2] == 1.0  # constant: centred, not divided by zero
    z = scaling.apply(x_train.astype(np.float32))
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=0)[:2], 1, rtol=1e-4)
    assert scale_spread(x_train) == pytest.approx(x_train[:, 0].std() / x_train[:, 1].std())


def wide_table(folder: str) -> str:
    """scikit-learn's breast-cancer table as a Keras-layout .npz: 30 features whose scales differ about
    10^5-fold (areas in the thousands, fractal dimensions near 0.06), two classes."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(3).permutation(len(y))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    path = os.path.join(folder, "cancer.npz")
    if WORLD.Get_rank() == 0:
        np.savez(path, x_train=x[:450], y_train=y[:450], x_test=x[450:], y_test=y[450:])
    WORLD.Barrier()
    return path


@pytest.mark.mpi
def test_standardize_trains_the_table_and_the_saved_model_applies_it(comm: Communicator, tmp_path) -> None:
    folder = shared_folder(tmp_path)
    data, model = wide_table(folder), os.path.join(folder, "model.npz")
    common = {"dataset": data, "epochs": 15, "progress": False, "hidden": (16,), "nonfinite": "skip"}
    raw = train(train_config(**common), comm).history[-1]["test_acc"]
    scaled = train(train_config(**common, standardize=True, save=model), comm).history[-1]
    assert scaled["test_acc"] >= 0.9 and scaled["test_acc"] > raw + 0.1, (raw, scaled["test_acc"])
    WORLD.Barrier()
    result = inference.evaluate(comm, model, data)  # the raw test split: the saved scaling is applied
    if comm.rank == 0:
        assert result["accuracy"] == pytest.approx(scaled["test_acc"], abs=1e-12)
    saved = inference.load(model)
    with np.load(data) as f:
        expected = Scaling.of(f["x_train"].astype(np.float32))
    np.testing.assert_array_equal(saved.scaling.mean, expected.mean)


def test_the_header_says_when_feature_scales_differ_and_standardize_is_off(tmp_path) -> None:
    data = wide_table(str(tmp_path))
    done = run_mpitrain(1, "train", "--no-progress", "--epochs", "1", "--dataset", data, "--nonfinite", "skip")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WARNING mpitrain: the features' scales differ" in done.stderr and "--standardize" in done.stderr
    quiet = run_mpitrain(1, "train", "--no-progress", "--epochs", "1", "--dataset", data, "--standardize")
    assert quiet.returncode == 0 and "scales differ" not in quiet.stdout
    assert math.isfinite(float(quiet.stdout.split("test_acc ")[1].split()[0]))


def test_log_records_carry_the_rank_and_follow_the_level(tmp_path) -> None:
    folder = str(tmp_path / "ckpt")
    args = ("train", "--no-progress", "--epochs", "1", "--checkpoint-dir", folder)
    info = run_mpitrain(2, *args, "--log-level", "INFO")
    assert info.returncode == 0, info.stderr[-2000:]
    assert info.stderr.count("[rank 0/2] INFO mpitrain: checkpoint at step") == 1 and "DEBUG" not in info.stderr
    debug = run_mpitrain(2, *args, "--log-level", "DEBUG", "--resume", "auto")
    assert debug.returncode == 0, debug.stderr[-2000:]
    assert all(f"[rank {r}/2] DEBUG mpitrain: host:pid" in debug.stderr for r in (0, 1)), debug.stderr[-2000:]
    quiet = run_mpitrain(2, "train", "--no-progress", "--epochs", "1", "--log-level", "ERROR", "--batch-size", "1000")
    assert quiet.returncode == 0 and "WARNING" not in quiet.stderr
