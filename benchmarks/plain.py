"""The plain baselines of the training benchmark: an MLP step as a user would write it in numpy.

``PlainMLP.step`` does forward, softmax cross-entropy, backward and SGD with
momentum (torch.optim.SGD's update) on one flat parameter and one flat
gradient buffer, with no framework around it. Given an mpi4py
communicator it also averages the flat gradient with one in-place
``Allreduce`` per step: the least a data-parallel step can do.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from mpi4py import MPI


class PlainMLP:
    """Flatten, (Linear, ReLU) per hidden size, Linear; He-initialised; float32."""

    def __init__(self, sizes: list[int], lr: float = 0.01, momentum: float = 0.9, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        shapes = list(itertools.pairwise(sizes))
        total = sum(a * b + b for a, b in shapes)
        self.params, self.grads = np.zeros(total, np.float32), np.zeros(total, np.float32)
        self.velocity = np.zeros(total, np.float32)
        self.layers, offset = [], 0
        for a, b in shapes:
            w, gw = (buf[offset : offset + a * b].reshape(a, b) for buf in (self.params, self.grads))
            offset += a * b
            bias, gb = (buf[offset : offset + b] for buf in (self.params, self.grads))
            offset += b
            w[...] = rng.normal(0, np.sqrt(2 / a), (a, b))
            self.layers.append((w, bias, gw, gb))
        self.lr, self.momentum = lr, momentum

    def step(self, x: np.ndarray, y: np.ndarray, comm: Any = None) -> float:
        """One training step on (x, y); with ``comm`` the gradient is averaged over its ranks first."""
        h = x.reshape(len(x), -1)
        inputs = []
        for i, (w, b, _, _) in enumerate(self.layers):
            inputs.append(h)
            h = h @ w + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0)
        shifted = h - h.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        probs = exp / exp.sum(axis=1, keepdims=True)
        loss = -np.log(probs[np.arange(len(y)), y]).mean()
        grad = probs
        grad[np.arange(len(y)), y] -= 1
        grad /= len(y)
        for i in range(len(self.layers) - 1, -1, -1):
            w, _, gw, gb = self.layers[i]
            np.matmul(inputs[i].T, grad, out=gw)
            gb[...] = grad.sum(axis=0)
            if i:
                grad = (grad @ w.T) * (inputs[i] > 0)
        if comm is not None:
            comm.Allreduce(MPI.IN_PLACE, self.grads, op=MPI.SUM)
            self.grads /= comm.Get_size()
        self.velocity *= self.momentum
        self.velocity += self.grads
        self.params -= self.lr * self.velocity
        return float(loss)
