"""One rank's forward and backward over a batch: micro-batches, accumulation and dropout streams.

Every strategy that computes gradients on a rank's own batch (data
parallel, parameter-server workers, gossip, local SGD) runs this; what it
then does with the gradients is the strategy's business.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mpitrain import backend
from mpitrain.nn import Module, Sequential
from mpitrain.parallel.base import Loss, Sums
from mpitrain.timeline import SPANS

# Layer outputs per micro-batch when the size is automatic: small enough to keep a convolutional
# model's activations in cache, while an MLP, which re-reads its weights per micro-batch, stays whole
# (README "Speed on a core" has the measurements).
MICRO_BATCH_BYTES = 4 << 20


class LocalStep:
    """Forward and backward of ``model`` on a batch, as ``pieces(x)`` micro-batches summed locally.

    Args:
        model: an initialised model; its input gradient is not computed.
        loss: the loss object (``forward(output, y)`` / ``backward()``).
        accumulate: at least this many micro-batches per step.
        micro_batch: at most this many samples per forward/backward (0:
            automatic, about ``MICRO_BATCH_BYTES`` of layer outputs each).
            Splitting changes only the round-off of the summed gradient.

    Attributes:
        forward_s, backward_s: seconds of the last ``gradients`` call.
    """

    def __init__(self, model: Module, loss: Loss, accumulate: int = 1, micro_batch: int = 0) -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {accumulate}")
        if micro_batch < 0:
            raise ValueError(f"micro_batch must be at least 0 (automatic), got {micro_batch}")
        self.model, self.loss, self.accumulate, self.micro_batch = model, loss, accumulate, micro_batch
        model.need_input_grad = False  # nothing uses the gradient with respect to the data
        self._auto: dict[tuple[int, ...], int] = {}
        self._streams: list | None = [] if model.random_state() else None  # dropout states at step start
        self.forward_s = self.backward_s = 0.0

    def pieces(self, x: Any) -> int:
        """How many micro-batches a step on batch ``x`` runs: at least ``accumulate``, and enough that
        none exceeds the micro-batch size."""
        size = self.micro_batch
        if not size:
            shape = tuple(x.shape[1:])
            if shape not in self._auto:
                model = self.model
                per_sample = model.output_bytes_per_sample(x[:1]) if isinstance(model, Sequential) else 0
                self._auto[shape] = max(1, MICRO_BATCH_BYTES // per_sample) if per_sample else len(x)
            size = self._auto[shape]
        return min(len(x), max(self.accumulate, -(-len(x) // size)))

    def gradients(self, x: Any, y: Any, after_backward: Callable[[int], None] | None = None) -> Sums:
        """Write this batch's gradient into ``model.flat_grads`` (the micro-batches' gradients summed
        with weights len(micro)/len(batch): the whole batch's gradient up to round-off).

        ``after_backward`` is the last micro-batch's ``Sequential.after_backward``
        hook (overlap). Returns this rank's (loss sum, correct, samples).
        """
        if len(y) < self.accumulate:
            raise ValueError(f"a batch of {len(y)} cannot be cut into {self.accumulate} micro-batches")
        model, clock, pieces = self.model, time.perf_counter, self.pieces(x)
        if self._streams is not None:
            self._streams = model.random_state()
        if not model.training:  # a walk over every module, so only after an evaluation
            model.train()
        model.zero_grad(lazy=True)  # the first backward writes the gradients
        loss, correct, forward, backward = 0.0, 0, 0.0, 0.0
        bounds = [len(y) * i // pieces for i in range(pieces + 1)]
        hook_at = pieces - 1 if after_backward is not None and isinstance(model, Sequential) else -1
        for i in range(pieces):
            xm, ym = x[bounds[i] : bounds[i + 1]], y[bounds[i] : bounds[i + 1]]
            t0 = clock()
            output = model.forward(xm)
            weight = len(ym) / len(y)
            # 0-d arrays where the model is: a GPU step reads no scalar back (float64, as a Python float sums)
            loss = loss + weight * self.loss.forward_value(output, ym).astype(np.float64)
            correct = correct + (output.argmax(axis=1) == ym).sum()
            grad = self.loss.backward()
            if pieces > 1:
                grad *= weight
            t1 = clock()
            if i == hook_at:
                model.after_backward = after_backward
            try:
                model.backward(grad)
                if i == 0:  # a layer whose backward did not run (a custom model) still holds old gradients
                    model.settle_grads()
            finally:
                if i == hook_at:
                    model.after_backward = None
            backend.synchronize(model.xp)
            SPANS.add("forward", t0, t1)
            forward, backward = forward + t1 - t0, backward + SPANS.add("backward", t1) - t1
        self.forward_s, self.backward_s = forward, backward
        return Sums(loss * len(y), correct, len(y))

    def replay(self, x: Any, y: Any) -> None:
        """Recompute the last ``gradients`` call's local gradients (same parameters, data and dropout
        masks), e.g. after an all-reduce consumed them, to find which ranks' were non-finite."""
        if self._streams is not None:
            self.model.set_random_state(self._streams)
        self.gradients(x, y)

    def evaluate(self, x: Any, y: Any) -> Sums:
        """(loss sum, correct, samples) of the model in evaluation mode on a batch (zeros when empty)."""
        if len(y) == 0:
            return Sums(0.0, 0, 0)
        self.model.eval()
        output = self.model.forward(x)
        loss = self.loss.forward(output, y)
        return Sums(loss * len(y), int((output.argmax(axis=1) == y).sum()), len(y))
