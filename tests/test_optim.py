"""Optimizer updates and LR schedules against their published formulas, written out step by step."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpitrain.optim import BLOCK, SGD, Adam, AdamW, LRSchedule, build_optimizer

STEPS = 5


def run(opt_factory, n: int = 7):
    """Run STEPS updates with seeded gradients; return (final params, initial params, the gradients)."""
    rng = np.random.default_rng(0)
    params = rng.standard_normal(n)
    grads = np.zeros(n)
    start = params.copy()
    opt = opt_factory(params, grads)
    history = []
    for _ in range(STEPS):
        grads[:] = rng.standard_normal(n)
        history.append(grads.copy())
        opt.step()
    return params, start, history


@pytest.mark.parametrize(
    "momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.01), (0.5, False, 0.1)]
)
def test_sgd_matches_formula(momentum: float, nesterov: bool, wd: float) -> None:
    lr = 0.1
    got, p, grads = run(lambda w, g: SGD(w, g, lr, momentum=momentum, nesterov=nesterov, weight_decay=wd))
    buf = np.zeros_like(p)
    for g in grads:
        d = g + wd * p
        if momentum:
            buf = momentum * buf + d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    np.testing.assert_allclose(got, p, rtol=1e-13)


@pytest.mark.parametrize("cls,wd", [(Adam, 0.0), (Adam, 0.05), (AdamW, 0.05)])
def test_adam_matches_formula(cls, wd: float) -> None:
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    got, p, grads = run(lambda w, g: cls(w, g, lr, weight_decay=wd))
    m = v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if cls is AdamW:
            p = p - lr * wd * p
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    np.testing.assert_allclose(got, p, rtol=1e-12)


def test_schedules() -> None:
    warm = LRSchedule(0.1, warmup_steps=4)
    assert [warm(s) for s in range(6)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    step = LRSchedule(1.0, kind="step", step_size=3, gamma=0.5, warmup_steps=2)
    assert [step(s) for s in range(2, 10)] == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25])
    cos = LRSchedule(1.0, kind="cosine", total_steps=12, warmup_steps=2, min_lr=0.1)
    for s in range(2, 14):
        frac = min((s - 2) / 10, 1.0)
        assert cos(s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    assert cos(2) == pytest.approx(1.0) and cos(12) == pytest.approx(0.1) and cos(50) == pytest.approx(0.1)


def test_optimizer_follows_its_schedule() -> None:
    params, grads = np.zeros(3), np.ones(3)
    opt = SGD(params, grads, LRSchedule(1.0, warmup_steps=2))
    opt.step()
    opt.step()
    np.testing.assert_allclose(params, -(0.5 + 1.0))
    assert opt.steps == 2 and opt.lr == 1.0


def test_state_dict_round_trip_continues_identically() -> None:
    def factory(w, g):
        return build_optimizer("adamw", w, g, 0.01, weight_decay=0.1)

    full, _, _ = run(factory)
    rng = np.random.default_rng(0)
    params = rng.standard_normal(7)
    grads = np.zeros(7)
    first = factory(params, grads)
    for _ in range(2):
        grads[:] = rng.standard_normal(7)
        first.step()
    second = factory(params, grads)
    second.load_state_dict({k: np.copy(v) for k, v in first.state_dict().items()})
    for _ in range(STEPS - 2):
        grads[:] = rng.standard_normal(7)
        second.step()
    np.testing.assert_array_equal(params, full)


def test_bad_hyperparameters() -> None:
    w, g = np.zeros(3), np.zeros(3)
    for bad, match in [
        (lambda: SGD(w, g, -0.1), "positive finite"),
        (lambda: SGD(w, g, float("nan")), "positive finite"),
        (lambda: SGD(w, g, 0.1, momentum=1.0), "momentum"),
        (lambda: SGD(w, g, 0.1, nesterov=True), "Nesterov"),
        (lambda: SGD(w, g, 0.1, weight_decay=-1), "weight_decay"),
        (lambda: Adam(w, g, 0.1, betas=(0.9, 1.0)), "betas"),
        (lambda: SGD(w, np.zeros(4), 0.1), "one shape"),
        (lambda: build_optimizer("lamb", w, g, 0.1), "unknown optimizer"),
        (lambda: LRSchedule(0.1, kind="cosine", total_steps=3, warmup_steps=3), "total_steps"),
        (lambda: LRSchedule(0.1, kind="step"), "step_size"),
        (lambda: LRSchedule(0.1, kind="linear"), "unknown schedule"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_blocked_update_covers_every_element(name: str) -> None:
    """Buffers of several blocks (and a partial last one) update exactly as one small buffer per element."""
    n = 2 * BLOCK + 5

    def factory(w, g):
        return build_optimizer(name, w, g, 0.01, momentum=0.9 if name == "sgd" else 0.0, weight_decay=0.01)

    big, start, grads = run(factory, n)
    for i in (0, BLOCK - 1, BLOCK, 2 * BLOCK + 4):  # block edges and the tail
        params, g = start[i : i + 1].copy(), np.zeros(1)
        opt = factory(params, g)
        for history in grads:
            g[0] = history[i]
            opt.step()
        assert params[0] == big[i]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_update_of_ranges_touches_only_them_and_equals_the_full_update(name: str) -> None:
    n = 3 * BLOCK + 11
    ranges = [(5, BLOCK + 7), (2 * BLOCK, 2 * BLOCK + 3), (3 * BLOCK, n)]  # block boundaries inside ranges
    rng = np.random.default_rng(4)
    start, grads = rng.standard_normal(n), rng.standard_normal(n)
    whole, part = start.copy(), start.copy()
    allocated = []

    def allocate(count: int, dtype) -> np.ndarray:
        allocated.append(np.zeros(count, dtype))
        return allocated[-1]

    full = build_optimizer(name, whole, grads.copy(), 0.01, momentum=0.9, weight_decay=0.01)
    sharded = build_optimizer(name, part, grads.copy(), 0.01, momentum=0.9, weight_decay=0.01, allocate=allocate)
    for _ in range(2):
        full.step()
        sharded.step(ranges)
    inside = np.zeros(n, bool)
    for a, b in ranges:
        inside[a:b] = True
    np.testing.assert_array_equal(part[inside], whole[inside])
    np.testing.assert_array_equal(part[~inside], start[~inside])
    # The optimizer's state lives in what allocate gave it.
    state = [v for k, v in sharded.state_dict().items() if k != "steps"]
    assert state and all(any(s is a for a in allocated) for s in state)
