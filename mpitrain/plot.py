"""``python -m mpitrain plot RUN.jsonl [RUN2.jsonl ...] -o curves.png``: training curves from --metrics files.

Four panels: loss (training, and test dashed) and test accuracy, each
against the epoch and against wall time (the epochs' ``time_s`` summed), one
colour per run. matplotlib is an optional extra (``pip install
'mpitrain[bench]'``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any


def read_records(path: str) -> list[dict[str, Any]]:
    """The epoch records of a ``--metrics`` file (a resumed run appends: a repeated epoch keeps its last record).

    Raises:
        FileNotFoundError: no such file. ValueError: a line that is not a JSON epoch record, or none at all.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such metrics file")
    by_epoch: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                by_epoch[int(record["epoch"])] = record
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path} line {number}: not an epoch record of --metrics") from None
    if not by_epoch:
        raise ValueError(f"{path}: no epoch records")
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot(paths: Sequence[str], output: str) -> None:
    """Draw the curves of every run in ``paths`` into ``output`` (any format matplotlib writes)."""
    runs = [(os.path.splitext(os.path.basename(p))[0], read_records(p)) for p in paths]
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plot needs matplotlib: pip install 'mpitrain[bench]' (or matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    for index, (name, records) in enumerate(runs):
        colour = f"C{index % 10}"
        epochs = [r["epoch"] for r in records]
        wall, total = [], 0.0
        for r in records:
            total += r.get("time_s", 0.0)
            wall.append(total)
        for column, x in enumerate((epochs, wall)):
            axes[0][column].plot(x, [r["loss"] for r in records], color=colour, label=f"{name} train")
            axes[0][column].plot(x, [r["test_loss"] for r in records], color=colour, linestyle="--",
                                 label=f"{name} test")  # fmt: skip
            axes[1][column].plot(x, [r["test_acc"] for r in records], color=colour, marker=".", label=name)
    for column, label in enumerate(("epoch", "wall time (s)")):
        axes[1][column].set_xlabel(label)
    axes[0][0].set_ylabel("loss")
    axes[0][0].set_yscale("log")
    axes[1][0].set_ylabel("test accuracy")
    for row in axes:
        for ax in row:
            ax.grid(True, alpha=0.3)
    axes[0][1].legend(fontsize=8)
    axes[1][1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
