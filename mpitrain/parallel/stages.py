"""How a pipeline cuts a ``Sequential`` model into stages and runs a stage's micro-batches: ``--split``
read and checked, the balanced split by cost, each layer's output shape and cost, a stage's span of a
flat layout, a rank's chunks as one module, and slots (copies of a stage's layers sharing its
parameters, gradients and random streams, one per micro-batch in flight)."""

from __future__ import annotations

import argparse
import itertools
import math
from typing import Any

import numpy as np

from mpitrain.nn import Module, Sequential
from mpitrain.parallel.base import Job


def layer_list(text: str) -> tuple[int, ...]:
    """``--split``: comma-separated layer indices where a new stage begins, e.g. ``3`` or ``2,4,6``."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like 2,4; got {text!r}") from None


def balanced_split(costs: list[float], parts: int) -> list[int]:
    """Where stages 1..parts-1 begin so that the costliest stage costs least (every stage non-empty).

    An exact linear partition (dynamic programming over prefix sums); ties go to the earliest cut.
    """
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"{n} layers cannot be cut into {parts} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    best = [[math.inf] * (n + 1) for _ in range(parts + 1)]  # best[p][i]: first i layers in p stages
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                value = max(best[p - 1][j], prefix[i] - prefix[j])
                if value < best[p][i]:
                    best[p][i], cut[p][i] = value, j
    cuts, i = [], n
    for p in range(parts, 1, -1):
        i = cut[p][i]
        cuts.append(i)
    return cuts[::-1]


def check_split(split: tuple[int, ...], layers: int, stages: int) -> None:
    """Raise ValueError unless ``split`` starts ``stages - 1`` stages at increasing indices inside (0, layers)."""
    if len(split) != stages - 1:
        raise ValueError(f"--split needs {stages - 1} layer indices for {stages} stages, got {len(split)}")
    bounds = [0, *split, layers]
    for a, b in itertools.pairwise(bounds):
        if not a < b:
            raise ValueError(
                f"--split {','.join(map(str, split))} does not cut the {layers} layers into non-empty stages "
                f"in order (each index in 1..{layers - 1}, increasing)"
            )


def layer_span(layout: list[tuple[str, int, int]], first: int, stop: int) -> tuple[int, int] | None:
    """(start, stop) in a flat buffer laid out as ``layout`` of the parameters of layers [first, stop)
    (contiguous: the layout is in reverse layer order), or None when those layers have none."""
    spans = [(a, b) for name, a, b in layout if first <= int(name.split(".", 1)[0]) < stop]
    return (min(a for a, _ in spans), max(b for _, b in spans)) if spans else None


class Chunks(Module):
    """A rank's model chunks as one module: one pair of flat buffers, parameters named as in the whole model."""

    def __init__(self, chunks: list[Sequential]) -> None:
        self.chunks = chunks

    def children(self) -> list[Module]:
        return list(self.chunks)

    def named_parameters(self, prefix: str = "") -> Any:
        for chunk in self.chunks:
            yield from chunk.named_parameters(prefix)


class Slot:
    """One micro-batch's place on a stage: layers sharing the stage's parameters, and a loss object."""

    def __init__(self, model: Sequential, loss: Any) -> None:
        self.model, self.loss = model, loss
        self.grad: Any = None  # last stage: d(loss)/d(output) of the micro-batch in this slot


def twin(fresh: Sequential, chunk: Sequential) -> Sequential:
    """``fresh`` (the same layers, uninitialised) made to compute with ``chunk``'s parameters, gradients and
    random streams."""
    for (_, p), (_, q) in zip(fresh.named_parameters(), chunk.named_parameters(), strict=True):
        p.data, p.grad = q.data, q.grad
    for m, n in zip(fresh.modules(), chunk.modules(), strict=True):
        m.xp, m.training = n.xp, n.training
        if getattr(n, "random_stream", None) is not None:
            m.random_stream = n.random_stream
    fresh.need_input_grad = chunk.need_input_grad
    return fresh


def profile(job: Job) -> tuple[list[tuple[int, ...]], list[float]]:
    """Each layer's output shape per sample and its cost (parameters + output elements per sample), from
    a forward of one zero sample in evaluation mode (no random numbers drawn)."""
    model = job.build_model().init_params(seed=job.seed, dtype=job.dtype)
    model.eval()
    x = np.zeros((1, *job.sample_shape), job.dtype)
    shapes, costs = [], []
    for layer in model.layers:
        x = layer.forward(x)
        shapes.append(tuple(x.shape[1:]))
        costs.append(float(layer.num_parameters() + x[0].size))
    return shapes, costs
