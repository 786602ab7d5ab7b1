"""Data sets (digits, Keras-layout .npz, synthetic) and rank sharding.

Samples are float32 arrays shaped (N, *sample_shape): images carry a channel
axis, (N, C, H, W); vectors are (N, D). Labels are int64 in [0, classes).
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class Dataset:
    """A train/test split with its class count."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(self.x_train.shape[1:])


def load_dataset(spec: str, seed: int = 0, synthetic_samples: int = 4096) -> Dataset:
    """Load a data set by name or path.

    Args:
        spec: "digits" (scikit-learn's bundled 8x8 digits), "synthetic"
            (seeded, MNIST-shaped), or a path to a ``.npz`` file in Keras's
            layout.
        seed: seed of the synthetic data.
        synthetic_samples: training samples of the synthetic set.

    Raises:
        ValueError: unknown name, or a malformed ``.npz`` (message names file and key).
        FileNotFoundError: the ``.npz`` path does not exist.
    """
    if spec == "digits":
        return load_digits()
    if spec == "synthetic":
        return synthetic(synthetic_samples, seed=seed)
    if spec.endswith(".npz") or os.path.sep in spec:
        return load_npz(spec)
    raise ValueError(f"unknown dataset {spec!r}; expected 'digits', 'synthetic' or a path to a .npz file")


def load_digits(test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's digits (1797 images 8x8, 10 classes), scaled to [0, 1].

    The train/test split is stratified and fixed (random_state=0), so every
    rank and every run sees the same split.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=0, stratify=y)
    return Dataset("digits", x_train, y_train, x_test, y_test, 10)


def synthetic(
    n_train: int,
    n_test: int | None = None,
    shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """Seeded random inputs labelled by a fixed random linear map (so they are learnable)."""
    if n_train < 1:
        raise ValueError(f"synthetic data needs at least 1 training sample, got {n_train}")
    n_test = max(1, n_train // 4) if n_test is None else n_test
    rng = np.random.default_rng([seed, 0x5EED])
    x = rng.standard_normal((n_train + n_test, *shape), dtype=np.float32)
    weights = rng.standard_normal((int(np.prod(shape)), num_classes), dtype=np.float32)
    y = (x.reshape(len(x), -1) @ weights).argmax(axis=1).astype(np.int64)
    return Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes)


def load_npz(path: str) -> Dataset:
    """Load a ``.npz`` with x_train, y_train, x_test, y_test (Keras's layout), never unpickling.

    uint8 images are scaled to [0, 1]; (N, H, W) gets a channel axis and
    channels-last (N, H, W, C) with C in (1, 3, 4) becomes (N, C, H, W).
    The class count is 1 + the largest training label.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable npz, a missing key, object or non-numeric
            arrays, mismatched lengths or sample shapes, non-finite values,
            or labels that are not integers in [0, classes).
    """
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; expected a .npz file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable .npz file: it is not a zip archive of arrays, as numpy.savez writes")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .npz file ({type(exc).__name__})") from exc
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {', '.join(missing)}; expected {', '.join(NPZ_KEYS)}")
        arrays = {}
        for key in NPZ_KEYS:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:  # object arrays refuse to load without pickle
                raise ValueError(f"{path}: key {key!r} is not a plain numeric array ({exc})") from exc
    x_train = _images(path, "x_train", arrays["x_train"])
    x_test = _images(path, "x_test", arrays["x_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{path}: x_train samples {x_train.shape[1:]} and x_test samples {x_test.shape[1:]} differ")
    y_train = _labels(path, "y_train", arrays["y_train"], len(x_train))
    num_classes = int(y_train.max()) + 1
    if num_classes < 2:
        raise ValueError(f"{path}: key 'y_train' holds a single class; need at least 2")
    y_test = _labels(path, "y_test", arrays["y_test"], len(x_test), num_classes)
    return Dataset(os.path.basename(path), x_train, y_train, x_test, y_test, num_classes)


def _images(path: str, key: str, x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "uif":
        raise ValueError(f"{path}: key {key!r} has dtype {x.dtype}; expected integers or floats")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"{path}: key {key!r} has shape {x.shape}; expected (samples, ...) with samples > 0")
    scaled = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if not np.isfinite(scaled).all():
        raise ValueError(f"{path}: key {key!r} contains NaN or infinite values")
    if scaled.ndim == 3:
        return scaled[:, None, :, :]
    if scaled.ndim == 4 and scaled.shape[3] in (1, 3, 4) and scaled.shape[1] not in (1, 3, 4):
        return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))
    return scaled


def _labels(path: str, key: str, y: np.ndarray, count: int, num_classes: int | None = None) -> np.ndarray:
    if y.dtype.kind not in "uif":
        raise ValueError(f"{path}: key {key!r} has dtype {y.dtype}; expected integer class labels")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (count,):
        raise ValueError(f"{path}: key {key!r} has shape {y.shape}; expected ({count},) to match the images")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise ValueError(f"{path}: key {key!r} holds non-integer labels")
    labels = y.astype(np.int64)
    high = num_classes if num_classes is not None else np.iinfo(np.int64).max
    bad = (labels < 0) | (labels >= high)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        valid = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(
            f"{path}: key {key!r} label {labels[first]} at index {first} is out of range; expected {valid}"
        )
    return labels


@dataclass(frozen=True)
class Scaling:
    """Per-feature standardization: ``(x - mean) / std``, both shaped like one sample."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def of(cls, x_train: np.ndarray) -> Scaling:
        """The training split's per-feature mean and deviation (a constant feature keeps deviation 1)."""
        x = x_train.astype(np.float64)
        mean, std = x.mean(axis=0), x.std(axis=0)
        return cls(mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x`` standardized (a new float32 array)."""
        return ((x - self.mean) / self.std).astype(np.float32)

    def dataset(self, data: Dataset) -> Dataset:
        """Both splits of ``data`` standardized with this scaling."""
        return Dataset(data.name, self.apply(data.x_train), data.y_train, self.apply(data.x_test), data.y_test,
                       data.num_classes)  # fmt: skip


def scale_spread(x_train: np.ndarray) -> float:
    """How many times the widest feature's deviation exceeds the narrowest non-constant one's (1: alike)."""
    std = x_train.reshape(len(x_train), -1).astype(np.float64).std(axis=0) if len(x_train) else np.ones(1)
    varying = std[std > 0]
    return float(varying.max() / varying.min()) if varying.size else 1.0


class ShardedBatches:
    """Which training samples each rank sees, batch by batch.

    Every epoch one permutation is drawn from ``default_rng([seed, epoch])``,
    the same on every rank, and wrapped around (padded) to a whole number of
    global batches of ``batch_size * world_size``. Global batch ``s`` is that
    permutation's slice ``[s*B*W, (s+1)*B*W)`` and rank ``r`` takes the
    ``r``-th block of ``B`` from it, so every rank does the same number of
    steps and one process with batch ``B*W`` sees exactly the union.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"the training set is empty (got {num_samples} samples)")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = math.ceil(num_samples / (batch_size * world_size))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The padded global order of sample indices for ``epoch`` (same on every rank)."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return np.resize(perm, self.steps_per_epoch * self.batch_size * self.world_size)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[np.ndarray]:
        """This rank's sample indices for each step of ``epoch``, from ``start_step``."""
        order = self.epoch_order(epoch)
        global_batch = self.batch_size * self.world_size
        for step in range(start_step, self.steps_per_epoch):
            begin = step * global_batch + self.rank * self.batch_size
            yield order[begin : begin + self.batch_size]


def eval_shard(num_samples: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous part of an evaluation set: each sample on exactly one rank."""
    return slice(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)
