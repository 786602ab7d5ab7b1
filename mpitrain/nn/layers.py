"""Layers: Linear, Conv2d (im2col), MaxPool2d, Flatten, activations, Dropout.

Images are NCHW. Every layer works on whatever array module ``self.xp`` is
(set by ``Module.init_params``) and accumulates into its parameters' ``grad``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpitrain import backend
from mpitrain.nn.module import Module, Parameter


def _positive_int(name: str, value: int) -> int:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Linear(Module):
    """y = x @ weight + bias, with weight of shape (in_features, out_features)."""

    def __init__(self, in_features: int, out_features: int, init: str = "he") -> None:
        fan_in = _positive_int("in_features", in_features)
        fan_out = _positive_int("out_features", out_features)
        self.weight = Parameter((fan_in, fan_out), init, fan_in, fan_out)
        self.bias = Parameter((fan_out,), "zeros")

    def forward(self, x: Any) -> Any:
        if x.ndim != 2 or x.shape[1] != self.weight.shape[0]:
            raise ValueError(f"Linear expects input (batch, {self.weight.shape[0]}), got {tuple(x.shape)}")
        self._x = x
        return x @ self.weight.data + self.bias.data

    def backward(self, grad: Any) -> Any:
        self.weight.grad += self._x.T @ grad
        self.bias.grad += grad.sum(axis=0)
        return grad @ self.weight.data.T


class Conv2d(Module):
    """2-D convolution (cross-correlation) by im2col and one matrix product.

    weight: (out_channels, in_channels, kernel, kernel); input (N, C, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        init: str = "he",
    ) -> None:
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.kernel = _positive_int("kernel_size", kernel_size)
        self.stride = _positive_int("stride", stride)
        if not isinstance(padding, (int, np.integer)) or padding < 0:
            raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
        self.padding = int(padding)
        fan_in = self.in_channels * self.kernel**2
        fan_out = self.out_channels * self.kernel**2
        shape = (self.out_channels, self.in_channels, self.kernel, self.kernel)
        self.weight = Parameter(shape, init, fan_in, fan_out)
        self.bias = Parameter((self.out_channels,), "zeros")

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """Spatial output size for an (h, w) input."""
        k, s, p = self.kernel, self.stride, self.padding
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def forward(self, x: Any) -> Any:
        xp = self.xp
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d expects input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        n, _, h, w = x.shape
        oh, ow = self.output_hw(h, w)
        if oh < 1 or ow < 1:
            raise ValueError(f"Conv2d kernel {self.kernel} does not fit input {h}x{w} with padding {self.padding}")
        p, k, s = self.padding, self.kernel, self.stride
        xpad = xp.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
        windows = xp.lib.stride_tricks.sliding_window_view(xpad, (k, k), axis=(2, 3))[:, :, ::s, ::s][:, :, :oh, :ow]
        cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, -1)
        self._cols, self._xshape = cols, xpad.shape
        out = cols @ self.weight.data.reshape(self.out_channels, -1).T + self.bias.data
        return xp.ascontiguousarray(out.reshape(n, oh, ow, self.out_channels).transpose(0, 3, 1, 2))

    def backward(self, grad: Any) -> Any:
        xp = self.xp
        n, _, oh, ow = grad.shape
        k, s, p = self.kernel, self.stride, self.padding
        g = grad.transpose(0, 2, 3, 1).reshape(-1, self.out_channels)
        self.weight.grad += (g.T @ self._cols).reshape(self.weight.shape)
        self.bias.grad += g.sum(axis=0)
        dcols = (g @ self.weight.data.reshape(self.out_channels, -1)).reshape(n, oh, ow, self.in_channels, k, k)
        dx = xp.zeros(self._xshape, dtype=grad.dtype)
        for i in range(k):
            for j in range(k):
                dx[:, :, i : i + s * (oh - 1) + 1 : s, j : j + s * (ow - 1) + 1 : s] += dcols[
                    :, :, :, :, i, j
                ].transpose(0, 3, 1, 2)
        return dx[:, :, p : dx.shape[2] - p, p : dx.shape[3] - p] if p else dx


class MaxPool2d(Module):
    """Max over kernel x kernel windows (stride defaults to the kernel size)."""

    def __init__(self, kernel_size: int, stride: int | None = None) -> None:
        self.kernel = _positive_int("kernel_size", kernel_size)
        self.stride = self.kernel if stride is None else _positive_int("stride", stride)

    def forward(self, x: Any) -> Any:
        xp = self.xp
        k, s = self.kernel, self.stride
        if x.ndim != 4 or x.shape[2] < k or x.shape[3] < k:
            raise ValueError(f"MaxPool2d({k}) expects input (N, C, H>={k}, W>={k}), got {tuple(x.shape)}")
        windows = xp.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s]
        flat = windows.reshape(*windows.shape[:4], k * k)
        self._argmax = flat.argmax(axis=-1)
        self._xshape = x.shape
        return xp.take_along_axis(flat, self._argmax[..., None], axis=-1)[..., 0]

    def backward(self, grad: Any) -> Any:
        xp = self.xp
        k, s = self.kernel, self.stride
        oh, ow = grad.shape[2:]
        dx = xp.zeros(self._xshape, dtype=grad.dtype)
        for idx in range(k * k):
            i, j = divmod(idx, k)
            dx[:, :, i : i + s * (oh - 1) + 1 : s, j : j + s * (ow - 1) + 1 : s] += grad * (self._argmax == idx)
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
        self._mask = x > 0
        return x * self._mask

    def backward(self, grad: Any) -> Any:
        return grad * self._mask


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
