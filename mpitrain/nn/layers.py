"""Layers: Linear, Flatten, activations, Dropout, and the workspaces every layer keeps.

Every layer works on whatever array module ``self.xp`` is
(set by ``Module.init_params``) and accumulates into its parameters' ``grad``.

Outputs and input gradients are written into workspaces that a layer keeps
and reuses while shapes repeat, so a steady-state training step allocates no
large arrays. The price: a layer's output is valid until its next forward
(its input gradient until its next backward); copy what must outlive that.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpitrain import backend
from mpitrain.nn.module import Module, Parameter


def positive_int(name: str, value: int) -> int:
    """``value`` as an int, or a ValueError naming ``name`` when it is not a positive integer."""
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def workspace(layer: Module, name: str, shape: tuple[int, ...], dtype: Any, zeroed: bool = False) -> Any:
    """A buffer kept on the layer and reused while the shape and dtype repeat (no per-step allocation).

    ``zeroed``: a new buffer starts as zeros (for buffers whose untouched parts must stay zero).
    """
    key = f"_ws_{name}"
    buf = getattr(layer, key, None)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = (layer.xp.zeros if zeroed else layer.xp.empty)(shape, dtype=dtype)
        setattr(layer, key, buf)
    return buf


class Linear(Module):
    """y = x @ weight + bias, with weight of shape (in_features, out_features)."""

    writes_stale_grads = True

    def __init__(self, in_features: int, out_features: int, init: str = "he") -> None:
        fan_in = positive_int("in_features", in_features)
        fan_out = positive_int("out_features", out_features)
        self.weight = Parameter((fan_in, fan_out), init, fan_in, fan_out)
        self.bias = Parameter((fan_out,), "zeros")

    def forward(self, x: Any) -> Any:
        if x.ndim != 2 or x.shape[1] != self.weight.shape[0]:
            raise ValueError(f"Linear expects input (batch, {self.weight.shape[0]}), got {tuple(x.shape)}")
        self._x = x
        out = workspace(self, "out", (x.shape[0], self.weight.shape[1]), x.dtype)
        self.xp.matmul(x, self.weight.data, out=out)
        out += self.bias.data
        return out

    def backward(self, grad: Any) -> Any:
        w = self.weight
        backend.matmul_into(
            self._x.T, grad, w.grad, add=not w.first_write(), scratch=lambda: workspace(self, "dw", w.shape, grad.dtype)
        )
        self.bias.add_grad(grad.sum(axis=0))
        if not self.need_input_grad:
            return None
        dx = workspace(self, "dx", self._x.shape, grad.dtype)
        self.xp.matmul(grad, self.weight.data.T, out=dx)
        return dx


class Flatten(Module):
    """(N, ...) -> (N, prod(...))."""

    def forward(self, x: Any) -> Any:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad: Any) -> Any:
        return grad.reshape(self._shape)


class ReLU(Module):
    """max(x, 0)."""

    def forward(self, x: Any) -> Any:
        self._mask = workspace(self, "mask", x.shape, bool)
        self.xp.greater(x, 0, out=self._mask)
        out = workspace(self, "out", x.shape, x.dtype)
        self.xp.multiply(x, self._mask, out=out)
        return out

    def backward(self, grad: Any) -> Any:
        dx = workspace(self, "dx", grad.shape, grad.dtype)
        self.xp.multiply(grad, self._mask, out=dx)
        return dx


class Tanh(Module):
    """tanh(x)."""

    def forward(self, x: Any) -> Any:
        self._y = self.xp.tanh(x)
        return self._y

    def backward(self, grad: Any) -> Any:
        return grad * (1 - self._y * self._y)


class Sigmoid(Module):
    """1 / (1 + exp(-x)), computed as (1 + tanh(x/2)) / 2 so it never overflows."""

    def forward(self, x: Any) -> Any:
        self._y = 0.5 * (1 + self.xp.tanh(0.5 * x))
        return self._y

    def backward(self, grad: Any) -> Any:
        return grad * self._y * (1 - self._y)


class Dropout(Module):
    """Zero each input with probability p in training, scaling the rest by 1/(1-p).

    The masks come from ``numpy.random.default_rng(seed)``, so a seeded run is
    reproducible; give each rank its own seed for independent masks.
    """

    def __init__(self, p: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.rng = np.random.default_rng(seed)

    def forward(self, x: Any) -> Any:
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        keep = self.rng.random(x.shape) >= self.p
        self._mask = backend.to_device((keep / (1.0 - self.p)).astype(x.dtype), self.xp)
        return x * self._mask

    def backward(self, grad: Any) -> Any:
        return grad if self._mask is None else grad * self._mask
