"""A saved model used on its own: ``evaluate`` (loss, accuracy, confusion matrix) and ``predict`` (labels).

``--save`` writes the architecture beside the parameters (the ``ARCHITECTURE``
entry: model name, hidden sizes, dropout, input shape, class count, dtype, and
the run's configuration), so neither command needs the model's flags again;
a ``--standardize`` run also saves its per-feature mean and deviation
(``SCALING``), which both commands apply to their samples.
Both shard the samples over the ranks (each evaluated on exactly one) and
gather on rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpitrain import checkpoint
from mpitrain.comm import Communicator
from mpitrain.data import Scaling, eval_shard, load_dataset
from mpitrain.nn import Sequential, SoftmaxCrossEntropy, build_model
from mpitrain.parallel.base import from_json_array, json_array

ARCHITECTURE = "mpitrain/architecture"
SCALING = ("mpitrain/standardize/mean", "mpitrain/standardize/std")
BATCH = 1024


def architecture_entry(model: str, hidden: tuple[int, ...], dropout: float, input_shape: tuple[int, ...],
                       num_classes: int, dtype: str, config: dict[str, Any],
                       scaling: Scaling | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """The entries ``--save`` adds to the parameters: what ``load`` rebuilds the model from (and the
    inputs' standardization, when the run had one)."""
    spec = {"model": model, "hidden": list(hidden), "dropout": dropout, "input_shape": list(input_shape),
            "num_classes": num_classes, "dtype": dtype, "config": config}  # fmt: skip
    entries = {ARCHITECTURE: json_array(spec)}
    if scaling is not None:
        entries |= {SCALING[0]: scaling.mean, SCALING[1]: scaling.std}
    return entries


@dataclass
class Saved:
    """A model read back from a ``--save`` file, initialised and in evaluation mode."""

    model: Sequential
    spec: dict[str, Any]
    scaling: Scaling | None = None  # applied to every sample before the model sees it


def load(path: str) -> Saved:
    """Rebuild the model ``path`` (a ``--save`` file) holds, with its parameters.

    Raises:
        FileNotFoundError: no such file. ValueError: no architecture in it
        (saved by an older version), or parameters that do not fit it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model-file {path}: no such file")
    with np.load(path, allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    if ARCHITECTURE not in arrays:
        raise ValueError(f"--model-file {path}: holds no architecture (saved before mpitrain recorded it)")
    spec = from_json_array(arrays.pop(ARCHITECTURE))
    scaling = Scaling(arrays.pop(SCALING[0]), arrays.pop(SCALING[1])) if SCALING[0] in arrays else None
    model = build_model(spec["model"], spec["input_shape"], spec["num_classes"], tuple(spec["hidden"]),
                        dropout=spec["dropout"])  # fmt: skip
    model.init_params(dtype=np.dtype(spec["dtype"]))
    model.load_state_dict(arrays)
    return Saved(model.eval(), spec, scaling)


def _fits(saved: Saved, x: np.ndarray, what: str) -> None:
    shape = tuple(saved.spec["input_shape"])
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"the model takes samples shaped {shape}; {what} holds {tuple(x.shape[1:])}")


def _outputs(saved: Saved, x: np.ndarray) -> np.ndarray:
    dtype = np.dtype(saved.spec["dtype"])
    if saved.scaling is not None:
        x = saved.scaling.apply(x)
    parts = [saved.model.forward(x[i : i + BATCH].astype(dtype)).copy() for i in range(0, len(x), BATCH)]
    return np.concatenate(parts) if parts else np.zeros((0, saved.spec["num_classes"]), dtype)


def evaluate(comm: Communicator, model_file: str, dataset: str) -> dict[str, Any] | None:
    """Loss, accuracy and confusion matrix (rows: true class, columns: predicted) of the saved model on
    ``dataset``'s test split, on rank 0 (None elsewhere); collective. Errors are raised on every rank."""
    with comm.agreement():
        saved = load(model_file)
        data = load_dataset(dataset, seed=saved.spec["config"].get("seed", 0))
        _fits(saved, data.x_test, f"{dataset}'s test split")
        if data.num_classes > saved.spec["num_classes"]:
            raise ValueError(
                f"{dataset} has {data.num_classes} classes; the model predicts {saved.spec['num_classes']}"
            )
    part = eval_shard(len(data.x_test), comm.rank, comm.size)
    x, y = data.x_test[part], data.y_test[part]
    classes = saved.spec["num_classes"]
    sums = np.zeros(2 + classes * classes)  # loss sum, count, confusion counts
    if len(y):
        out = _outputs(saved, x)
        sums[0] = SoftmaxCrossEntropy().forward(out, y) * len(y)
        sums[1] = len(y)
        np.add.at(sums[2:].reshape(classes, classes), (y, out.argmax(axis=1)), 1)
    comm.allreduce(sums, op="sum")
    if comm.rank != 0:
        return None
    confusion = sums[2:].reshape(classes, classes).astype(np.int64)
    return {"loss": sums[0] / sums[1], "accuracy": np.trace(confusion) / sums[1], "samples": int(sums[1]),
            "confusion": confusion}  # fmt: skip


def predict(comm: Communicator, model_file: str, input_file: str, output_file: str) -> int:
    """Write the saved model's predicted label for every sample of ``input_file`` (an ``.npz`` whose ``x``,
    or only array, holds the samples) to ``output_file`` (``.npy``, rank 0, atomically); the count.
    Collective; errors are raised on every rank."""
    with comm.agreement():
        saved = load(model_file)
        if not os.path.isfile(input_file):
            raise FileNotFoundError(f"--input {input_file}: no such file")
        with np.load(input_file, allow_pickle=False) as f:
            if "x" not in f.files and len(f.files) != 1:
                raise ValueError(f"--input {input_file}: expected an array named x (or only one), got {f.files}")
            x = f["x" if "x" in f.files else f.files[0]]
        _fits(saved, x, f"--input {input_file}")
        if comm.rank == 0 and not os.path.isdir(os.path.dirname(os.path.abspath(output_file))):
            raise FileNotFoundError(f"--output {output_file}: the folder does not exist")
    part = eval_shard(len(x), comm.rank, comm.size)
    labels = _outputs(saved, x[part]).argmax(axis=1).astype(np.int64)
    gathered = comm.gather_object(labels, root=0)
    if comm.rank == 0:
        everything = np.concatenate(gathered)
        checkpoint.atomic_write(output_file, lambda f: np.save(f, everything))
    return len(x)


__all__ = ["ARCHITECTURE", "Saved", "architecture_entry", "evaluate", "load", "predict"]
