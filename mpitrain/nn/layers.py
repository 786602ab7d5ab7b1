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


class MaskStream:
    """Dropout's random stream: mask ``k`` is a hash of (seed, k, element index), computed where the
    activations are.

    On cupy the mask is drawn on the device (no per-step host copy), and
    numpy and cupy give the same bits: it is integer arithmetic (a
    multiply-add of the index, then the "lowbias32" avalanche of 32-bit
    multiplies and xor-shifts), which wraps the same way on both. The whole
    state is two integers, so a checkpoint or a replayed micro-batch
    restores it exactly.
    """

    def __init__(self, seed: int) -> None:
        self.seed, self.count = int(seed), 0

    @property
    def state(self) -> dict[str, int]:
        """The stream's position: restoring it repeats the masks from there."""
        return {"seed": self.seed, "count": self.count}

    @state.setter
    def state(self, value: dict[str, int]) -> None:
        if not isinstance(value, dict) or set(value) != {"seed", "count"}:
            raise ValueError(f"not a dropout stream's state (expected seed and count): {value!r}")
        self.seed, self.count = int(value["seed"]), int(value["count"])

    def keep(self, xp: Any, shape: tuple[int, ...], p: float) -> Any:
        """The next mask: a boolean array of ``shape``, each element True with probability 1 - p."""
        size = int(np.prod(shape, dtype=np.int64))
        if size >= 1 << 32:
            raise ValueError(f"Dropout masks index elements in 32 bits; {size} elements is too many")
        key = _splitmix64((self.seed << 32) ^ self.count) & 0xFFFFFFFF
        self.count += 1
        u32 = np.uint32
        h = xp.arange(size, dtype=xp.uint32)
        h *= u32(0x9E3779B9)
        h += u32(key)
        for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B)):
            h ^= h >> u32(shift)
            h *= u32(factor)
        h ^= h >> u32(16)
        return (h >= u32(min(round(p * 2**32), 2**32 - 1))).reshape(shape)


def _splitmix64(x: int) -> int:
    """A 64-bit mix of ``x`` (Python integers: the per-mask key, on the host)."""
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


class Dropout(Module):
    """Zero each input with probability p in training, scaling the rest by 1/(1-p).

    The masks come from a ``MaskStream(seed)``, drawn on the activations'
    device, so a seeded run is reproducible, the same on numpy and cupy;
    give each rank its own seed for independent masks.
    """

    def __init__(self, p: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.random_stream = MaskStream(seed)

    def forward(self, x: Any) -> Any:
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        keep = self.random_stream.keep(self.xp, x.shape, self.p)
        self._mask = (keep / (1.0 - self.p)).astype(x.dtype)
        return x * self._mask

    def backward(self, grad: Any) -> Any:
        return grad if self._mask is None else grad * self._mask
