"""Data sets, .npz validation and sharding."""

from __future__ import annotations

import numpy as np
import pytest

from mpitrain.data import ShardedBatches, eval_shard, load_dataset, load_digits, load_npz, synthetic


def write_npz(path, **overrides) -> str:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (20, 6, 6), dtype=np.uint8),
        "y_train": np.arange(20) % 4,
        "x_test": rng.integers(0, 256, (8, 6, 6), dtype=np.uint8),
        "y_test": np.arange(8) % 4,
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return str(path)


def test_digits_is_a_fixed_stratified_split() -> None:
    data = load_digits()
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert data.x_train.dtype == np.float32 and data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    assert data.num_classes == 10
    counts = np.bincount(data.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: about 36 of each class
    again = load_dataset("digits")
    assert np.array_equal(again.x_test, data.x_test) and np.array_equal(again.y_train, data.y_train)


def test_npz_uint8_images_are_scaled_and_get_a_channel_axis(tmp_path) -> None:
    data = load_npz(write_npz(tmp_path / "ok.npz"))
    raw = np.load(tmp_path / "ok.npz")
    assert data.x_train.shape == (20, 1, 6, 6) and data.x_train.dtype == np.float32
    np.testing.assert_allclose(data.x_train[:, 0], raw["x_train"] / 255.0, rtol=1e-6)
    assert data.num_classes == 4 and data.y_train.dtype == np.int64


def test_npz_channels_last_and_vectors(tmp_path) -> None:
    rgb = np.random.default_rng(1).random((20, 6, 6, 3)).astype(np.float32)
    data = load_npz(write_npz(tmp_path / "rgb.npz", x_train=rgb, x_test=rgb[:8], y_train=np.arange(20)[:, None] % 4))
    assert data.x_train.shape == (20, 3, 6, 6)
    np.testing.assert_array_equal(data.x_train[:, 2], rgb[..., 2])
    vec = np.ones((20, 5))
    assert load_npz(write_npz(tmp_path / "v.npz", x_train=vec, x_test=vec[:8])).sample_shape == (5,)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"y_test": None}, "missing key(s) y_test"),
        ({"y_train": np.arange(19) % 4}, "key 'y_train' has shape (19,); expected (20,)"),
        ({"x_test": np.zeros((8, 5, 5), np.uint8)}, "differ"),
        (
            {"y_test": np.array([0, 1, 2, 3, 4, 0, 1, 2])},
            "key 'y_test' label 4 at index 4 is out of range; expected [0, 4)",
        ),
        ({"y_train": -(np.arange(20) % 4)}, "key 'y_train' label -1 at index 1 is out of range"),
        ({"y_train": np.arange(20) * 0.5}, "non-integer labels"),
        ({"x_train": np.array([f"s{i}" for i in range(20)])}, "key 'x_train' has dtype <U3"),
        ({"x_train": np.full((20, 6, 6), np.nan)}, "NaN or infinite"),
        ({"y_train": np.zeros(20, int)}, "single class"),
        ({"x_train": np.zeros((0, 6, 6))}, "samples > 0"),
    ],
)
def test_npz_errors_name_file_and_key(tmp_path, overrides, message) -> None:
    path = write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(ValueError) as info:
        load_npz(path)
    assert path in str(info.value) and message in str(info.value)


def test_npz_object_arrays_are_refused_without_unpickling(tmp_path) -> None:
    path = tmp_path / "obj.npz"
    arrays = {k: np.zeros((2, 2)) for k in ("x_train", "x_test", "y_test")}
    np.savez(path, y_train=np.array([object(), 1], dtype=object), **arrays)
    with pytest.raises(ValueError, match="key 'y_train' is not a plain numeric array"):
        load_npz(str(path))


def test_npz_missing_or_garbage_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_npz(str(tmp_path / "none.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        load_npz(str(tmp_path / "junk.npz"))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_a_directory_or_another_kind_of_file_is_named_as_such(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"is a directory; expected a \.npz file"):
        load_dataset(str(tmp_path))
    np.save(tmp_path / "plain.npy", np.zeros(3))  # numpy's own format, but not an archive
    (tmp_path / "notes.txt").write_text("x_train,y_train\n")
    for name in ("plain.npy", "notes.txt"):
        with pytest.raises(ValueError) as info:
            load_dataset(str(tmp_path / name))
        assert "not a zip archive of arrays" in str(info.value) and "allow_pickle" not in str(info.value)


def test_synthetic_is_seeded_and_learnable_shape() -> None:
    a, b = synthetic(64, seed=3), synthetic(64, seed=3)
    assert np.array_equal(a.x_train, b.x_train) and a.x_train.shape == (64, 1, 28, 28)
    assert not np.array_equal(a.x_train, synthetic(64, seed=4).x_train)
    assert len(np.unique(a.y_train)) > 1


@pytest.mark.parametrize("n,batch,world", [(10, 3, 1), (10, 3, 4), (7, 2, 3), (1, 4, 2), (100, 8, 3)])
def test_sharding_covers_every_sample_with_equal_steps(n: int, batch: int, world: int) -> None:
    shards = [ShardedBatches(n, batch, r, world, seed=9) for r in range(world)]
    for epoch in (0, 1):
        per_rank = [list(s.batches(epoch)) for s in shards]
        assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
        assert all(len(batch_idx) == batch for b in per_rank for batch_idx in b)
        seen = np.concatenate([idx for b in per_rank for idx in b])
        assert set(seen.tolist()) == set(range(n))
        order = shards[0].epoch_order(epoch)
        for step in range(shards[0].steps_per_epoch):
            joined = np.concatenate([per_rank[r][step] for r in range(world)])
            np.testing.assert_array_equal(joined, order[step * batch * world : (step + 1) * batch * world])
    assert not np.array_equal(shards[0].epoch_order(0), shards[0].epoch_order(1)) or n == 1


def test_sharding_resumes_mid_epoch_and_rejects_bad_sizes() -> None:
    s = ShardedBatches(50, 4, 1, 2, seed=0)
    full = list(s.batches(3))
    assert all(np.array_equal(a, b) for a, b in zip(full[2:], s.batches(3, start_step=2), strict=True))
    with pytest.raises(ValueError, match="empty"):
        ShardedBatches(0, 4, 0, 1, 0)
    with pytest.raises(ValueError, match="batch size"):
        ShardedBatches(5, 0, 0, 1, 0)


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (0, 2), (360, 4)])
def test_eval_shards_partition_the_test_set(n: int, world: int) -> None:
    covered = np.concatenate([np.arange(n)[eval_shard(n, r, world)] for r in range(world)])
    np.testing.assert_array_equal(covered, np.arange(n))
