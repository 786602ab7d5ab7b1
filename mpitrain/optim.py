"""Optimizers that update a model's flat parameter buffer in place.

Each ``step`` runs a handful of vectorised operations over the flat buffer
(no Python loop over parameters), block by block: a block of every operand
stays in cache while all the update's operations pass over it, instead of
each operation streaming the whole buffer through memory. Scratch is one
block per buffer, allocated once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mpitrain.backend import array_module_of

SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "adam", "adamw")
BLOCK = 1 << 17  # elements per block: a block of each float32 operand fits in L2 together


class LRSchedule:
    """Learning rate as a function of the step number (0-based).

    Linear warm-up from base_lr/warmup_steps to base_lr over ``warmup_steps``,
    then one of: ``constant``; ``step`` (multiply by ``gamma`` every
    ``step_size`` steps); ``cosine`` (from base_lr down to ``min_lr`` at
    ``total_steps``, then held).
    """

    def __init__(
        self,
        base_lr: float,
        kind: str = "constant",
        warmup_steps: int = 0,
        total_steps: int = 0,
        step_size: int = 0,
        gamma: float = 0.1,
        min_lr: float = 0.0,
    ) -> None:
        if not (math.isfinite(base_lr) and base_lr > 0):
            raise ValueError(f"learning rate must be a positive finite number, got {base_lr!r}")
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if kind == "step" and step_size < 1:
            raise ValueError(f"the step schedule needs step_size >= 1, got {step_size}")
        if kind == "cosine" and total_steps <= warmup_steps:
            raise ValueError(
                f"the cosine schedule needs total_steps > warmup_steps, got {total_steps} <= {warmup_steps}"
            )
        self.base_lr, self.kind, self.warmup_steps = float(base_lr), kind, int(warmup_steps)
        self.total_steps, self.step_size, self.gamma, self.min_lr = int(total_steps), int(step_size), gamma, min_lr

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        t = step - self.warmup_steps
        if self.kind == "step":
            return self.base_lr * self.gamma ** (t // self.step_size)
        if self.kind == "cosine":
            frac = min(t / (self.total_steps - self.warmup_steps), 1.0)
            return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
        return self.base_lr


class Optimizer:
    """Base: holds the flat buffers, the schedule and the step count."""

    def __init__(
        self,
        params: Any,
        grads: Any,
        lr: float | LRSchedule,
        weight_decay: float = 0.0,
        allocate: Callable[[int, Any], Any] | None = None,
    ) -> None:
        if params.shape != grads.shape or params.ndim != 1:
            raise ValueError(
                f"params and grads must be flat buffers of one shape, got {params.shape} and {grads.shape}"
            )
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.params, self.grads = params, grads
        self.schedule = lr if isinstance(lr, LRSchedule) else LRSchedule(lr)
        self.weight_decay = float(weight_decay)
        self.steps = 0
        self.xp = array_module_of(params)
        self._allocate = allocate or (lambda count, dtype: self.xp.zeros(count, dtype=dtype))
        self._scratch = self.xp.empty(min(BLOCK, params.size), params.dtype)

    def _state_buffer(self) -> Any:
        """A zeroed state buffer shaped like the parameters, from ``allocate``."""
        return self._allocate(self.params.size, self.params.dtype)

    @property
    def lr(self) -> float:
        """Learning rate the next step will use."""
        return self.schedule(self.steps)

    def step(self, ranges: Sequence[tuple[int, int]] | None = None) -> None:
        """Apply one update from the current gradients, to the (start, stop) ``ranges`` only if given
        (a sharded optimizer: each rank updates its own part)."""
        lr = self.lr
        for first, last in [(0, self.params.size)] if ranges is None else ranges:
            for start in range(first, last, BLOCK):
                part = slice(start, min(start + BLOCK, last))
                self._update(lr, part, part.stop - part.start)
        self.steps += 1

    def _update(self, lr: float, part: slice, n: int) -> None:
        """Update ``params[part]`` (``n`` elements); scratch buffers are used as ``scratch[:n]``."""
        raise NotImplementedError

    def _decayed_grad(self, part: slice, n: int) -> Any:
        """grads + weight_decay * params over ``part``, in scratch (or a view of grads)."""
        if not self.weight_decay:
            return self.grads[part]
        d = self._scratch[:n]
        self.xp.multiply(self.params[part], self.weight_decay, out=d)
        d += self.grads[part]
        return d

    def state_dict(self) -> dict[str, Any]:
        """Step count and state buffers, by name."""
        return {"steps": np.int64(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.steps = int(state["steps"])


class SGD(Optimizer):
    """SGD with momentum, Nesterov and L2 weight decay, as torch.optim.SGD (dampening 0).

    d = g + wd*p; buf = mu*buf + d; d = d + mu*buf (Nesterov) or buf; p -= lr*d.
    """

    def __init__(
        self,
        params: Any,
        grads: Any,
        lr: float | LRSchedule,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        allocate: Callable[[int, Any], Any] | None = None,
    ) -> None:
        super().__init__(params, grads, lr, weight_decay, allocate)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0.0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum, self.nesterov = float(momentum), nesterov
        self.buf = self._state_buffer() if momentum else None
        self._step_dir = self.xp.empty_like(self._scratch)

    def _update(self, lr: float, part: slice, n: int) -> None:
        xp, d, step = self.xp, self._decayed_grad(part, n), self._step_dir[:n]
        if self.buf is None:
            xp.multiply(d, lr, out=step)
        else:
            buf = self.buf[part]
            buf *= self.momentum
            buf += d
            if self.nesterov:
                xp.multiply(buf, self.momentum, out=step)
                step += d
                step *= lr
            else:
                xp.multiply(buf, lr, out=step)
        self.params[part] -= step

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.buf is not None:
            state["momentum_buffer"] = self.buf
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.buf is not None:
            self.buf[...] = state["momentum_buffer"]


class Adam(Optimizer):
    """Adam (Kingma & Ba) with L2 weight decay added to the gradient, as torch.optim.Adam.

    m = b1*m + (1-b1)*d; v = b2*v + (1-b2)*d^2;
    p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
    """

    decoupled = False

    def __init__(
        self,
        params: Any,
        grads: Any,
        lr: float | LRSchedule,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        allocate: Callable[[int, Any], Any] | None = None,
    ) -> None:
        super().__init__(params, grads, lr, weight_decay, allocate)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adam betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self.m = self._state_buffer()
        self.v = self._state_buffer()
        self._tmp = self.xp.empty_like(self._scratch)

    def _update(self, lr: float, part: slice, n: int) -> None:
        xp, tmp, params, m, v = self.xp, self._tmp[:n], self.params[part], self.m[part], self.v[part]
        if self.decoupled:
            params *= 1.0 - lr * self.weight_decay
            d = self.grads[part]
        else:
            d = self._decayed_grad(part, n)
        t = self.steps + 1
        m *= self.beta1
        xp.multiply(d, 1.0 - self.beta1, out=tmp)
        m += tmp
        v *= self.beta2
        xp.multiply(d, d, out=tmp)
        tmp *= 1.0 - self.beta2
        v += tmp
        xp.divide(v, 1.0 - self.beta2**t, out=tmp)
        xp.sqrt(tmp, out=tmp)
        tmp += self.eps
        xp.divide(m, tmp, out=tmp)
        tmp *= lr / (1.0 - self.beta1**t)
        params -= tmp

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "exp_avg": self.m, "exp_avg_sq": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.m[...] = state["exp_avg"]
        self.v[...] = state["exp_avg_sq"]


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr*wd before the Adam step."""

    decoupled = True


def clip_grad_norm(
    grads: Any,
    max_norm: float,
    ranges: Sequence[tuple[int, int]] | None = None,
    total: Callable[[float], float] | None = None,
) -> float:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``; return the norm before.

    As ``torch.nn.utils.clip_grad_norm_``: the factor is max_norm / (norm +
    1e-6), applied only when below 1. ``ranges``: the (start, stop) parts this
    rank holds (a sharded optimizer's owned chunks; default the whole
    buffer); ``total`` turns this rank's sum of squares into the global one
    (a sum over the ranks that hold the other parts), so every rank computes
    the same norm and the same factor.
    """
    parts = [grads[a:b] for a, b in ranges] if ranges is not None else [grads]
    squares = sum(float(part.dot(part)) for part in parts)
    norm = math.sqrt(total(squares) if total is not None else squares)
    factor = max_norm / (norm + 1e-6)
    if factor < 1.0:
        for part in parts:
            part *= factor
    return norm


def build_optimizer(
    name: str,
    params: Any,
    grads: Any,
    lr: float | LRSchedule,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    allocate: Callable[[int, Any], Any] | None = None,
) -> Optimizer:
    """Optimizer by name ("sgd", "adam", "adamw") over the flat buffers; ``allocate(count, dtype)``
    gives its zeroed state buffers (default ``zeros``)."""
    if name == "sgd":
        return SGD(params, grads, lr, momentum, nesterov, weight_decay, allocate)
    if name == "adam":
        return Adam(params, grads, lr, weight_decay=weight_decay, allocate=allocate)
    if name == "adamw":
        return AdamW(params, grads, lr, weight_decay=weight_decay, allocate=allocate)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
