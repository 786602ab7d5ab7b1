"""Gradients of every layer and loss against central finite differences (float64), and the flat buffers."""

from __future__ import annotations

import numpy as np
import pytest

from mpitrain.nn import (
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaskStream,
    MaxPool2d,
    Module,
    MSELoss,
    Parameter,
    ReLU,
    Sequential,
    Sigmoid,
    SoftmaxCrossEntropy,
    Tanh,
    build_model,
)
from tests.conftest import OneBranch

EPS = 1e-6


def numeric_grad(f, x: np.ndarray) -> np.ndarray:
    """Central differences of scalar f() with respect to every element of x (modified in place)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        keep = x[i]
        x[i] = keep + EPS
        up = f()
        x[i] = keep - EPS
        down = f()
        x[i] = keep
        grad[i] = (up - down) / (2 * EPS)
    return grad


def check_module(module, x: np.ndarray, seed: int = 0) -> None:
    """Loss = sum(output * R) for a fixed random R; compare analytic and numeric gradients."""
    module.init_params(seed=seed, dtype=np.float64)
    out = module.forward(x)
    weights = np.random.default_rng(1).standard_normal(out.shape)

    def loss() -> float:
        return float((module.forward(x) * weights).sum())

    module.zero_grad()
    module.forward(x)
    dx = module.backward(weights)
    assert dx.shape == x.shape
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-7)
    for name, p in module.named_parameters():
        np.testing.assert_allclose(p.grad, numeric_grad(loss, p.data), rtol=1e-5, atol=1e-7, err_msg=name)


def random(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).standard_normal(shape)


@pytest.mark.parametrize(
    "module,shape",
    [
        (lambda: Linear(5, 3), (4, 5)),
        (lambda: Linear(7, 2, init="glorot"), (3, 7)),
        (lambda: Conv2d(2, 3, 3), (2, 2, 5, 6)),
        (lambda: Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 7, 5)),
        (lambda: Conv2d(1, 2, 2, stride=1, padding=2), (1, 1, 3, 3)),
        (lambda: Conv2d(8, 3, 3, padding=1), (2, 8, 4, 3)),  # 72 im2col rows: the pixel-rows product
        (lambda: Conv2d(1, 2, 3, stride=2, padding=2), (2, 1, 7, 6)),  # per-sample products throughout
        (lambda: Conv2d(4, 2, 3, padding=1), (2, 4, 7, 7)),  # per-sample forward, batch-wide backward
        (lambda: Conv2d(4, 2, 3, stride=2, padding=1), (2, 4, 6, 5)),  # batch-wide throughout, strided
        (lambda: MaxPool2d(2), (2, 3, 4, 6)),
        (lambda: MaxPool2d(3, stride=2), (2, 2, 7, 7)),
        (lambda: MaxPool2d(2), (1, 2, 5, 5)),
        (lambda: Flatten(), (3, 2, 2, 2)),
        (lambda: ReLU(), (4, 6)),
        (lambda: Tanh(), (4, 6)),
        (lambda: Sigmoid(), (4, 6)),
        (lambda: Sequential(Conv2d(1, 2, 3, padding=1), ReLU(), MaxPool2d(2), Flatten(), Linear(8, 3)), (2, 1, 4, 4)),
    ],
)
def test_layer_gradients(module, shape) -> None:
    x = random(*shape)
    if isinstance(module(), ReLU):
        x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    check_module(module(), x)


def direct_convolution(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """Cross-correlation, one output pixel at a time, on an explicitly padded input."""
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    k = weight.shape[2]
    oh, ow = (padded.shape[2] - k) // stride + 1, (padded.shape[3] - k) // stride + 1
    out = np.empty((x.shape[0], weight.shape[0], oh, ow))
    for y in range(oh):
        for x_ in range(ow):
            patch = padded[:, :, y * stride : y * stride + k, x_ * stride : x_ * stride + k]
            out[:, :, y, x_] = np.tensordot(patch, weight, axes=([1, 2, 3], [1, 2, 3])) + bias
    return out


@pytest.mark.parametrize(
    "channels,out_channels,kernel,stride,padding,sizes",
    [
        (1, 4, 3, 1, 1, [9, 9]),  # per-sample products
        (5, 3, 3, 1, 1, [6, 6]),  # 45 rows: batch-wide backward
        (3, 2, 3, 2, 1, [14, 13, 14]),  # 13 and 14 give the same output size: padding must stay zero
        (2, 3, 2, 3, 2, [8, 7]),
        (8, 2, 3, 1, 0, [4, 5]),  # 72 rows, fewer pixels: the pixel-rows product
    ],
)
def test_convolution_matches_a_direct_one_across_input_sizes(
    channels: int, out_channels: int, kernel: int, stride: int, padding: int, sizes: list[int]
) -> None:
    layer = Conv2d(channels, out_channels, kernel, stride=stride, padding=padding).init_params(seed=4, dtype=np.float64)
    layer.bias.data[...] = np.arange(out_channels) / 10
    for size in sizes:
        x = np.random.default_rng(size).standard_normal((3, channels, size, size))
        np.testing.assert_allclose(
            layer.forward(x), direct_convolution(x, layer.weight.data, layer.bias.data, stride, padding), atol=1e-12
        )
        fresh = Conv2d(channels, out_channels, kernel, stride=stride, padding=padding).init_params(dtype=np.float64)
        fresh.flat_params[...] = layer.flat_params
        grad = np.random.default_rng(size + 1).standard_normal(fresh.forward(x).shape)
        layer.zero_grad()
        np.testing.assert_array_equal(layer.backward(grad), fresh.backward(grad))
        np.testing.assert_array_equal(layer.flat_grads, fresh.flat_grads)


def test_dropout_gradient_and_eval() -> None:
    layer = Dropout(0.3, seed=5)
    layer.init_params(dtype=np.float64)
    x = random(50, 40)
    out = layer.forward(x)
    dropped = out == 0
    assert 0.2 < dropped.mean() < 0.4
    np.testing.assert_allclose(out[~dropped], x[~dropped] / 0.7)
    np.testing.assert_array_equal(layer.backward(np.ones_like(x)), np.where(dropped, 0.0, 1 / 0.7))
    layer.eval()
    assert layer.forward(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)


def test_dropout_masks_are_fair_independent_and_replayable() -> None:
    stream = MaskStream(11)
    first = stream.keep(np, (400, 500), 0.25)
    second = stream.keep(np, (400, 500), 0.25)
    n = first.size
    bound = 5 * np.sqrt(0.25 * 0.75 / n)  # five standard deviations of the kept fraction
    assert abs(first.mean() - 0.75) < bound and abs(second.mean() - 0.75) < bound
    both = (first & second).mean()  # independent masks: P(kept twice) = 0.75^2
    assert abs(both - 0.75**2) < 5 * np.sqrt(0.5625 * 0.4375 / n)
    neighbours = (first[:, :-1] & first[:, 1:]).mean()  # adjacent elements independent too
    assert abs(neighbours - 0.75**2) < 5 * np.sqrt(0.5625 * 0.4375 / n)
    other_seed = MaskStream(12).keep(np, (400, 500), 0.25)
    assert abs((first & other_seed).mean() - 0.75**2) < 5 * np.sqrt(0.5625 * 0.4375 / n)
    replay = MaskStream(0)
    replay.state = {"seed": 11, "count": 1}
    np.testing.assert_array_equal(replay.keep(np, (400, 500), 0.25), second)
    assert MaskStream(3).keep(np, (1000,), 0.0).all()
    with pytest.raises(ValueError, match="seed and count"):
        replay.state = {"bit_generator": "PCG64"}


def test_softmax_cross_entropy_gradient_and_stability() -> None:
    loss = SoftmaxCrossEntropy()
    logits = random(5, 4)
    labels = np.array([0, 3, 1, 1, 2])
    loss.forward(logits, labels)
    np.testing.assert_allclose(loss.backward(), numeric_grad(lambda: loss.forward(logits, labels), logits), atol=1e-8)
    huge = np.array([[1000.0, 0.0], [-1000.0, 0.0]])
    value = loss.forward(huge, np.array([0, 1]))
    assert np.isfinite(value) and value < 1e-10
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(loss.forward(logits, labels), -np.log(p[np.arange(5), labels]).mean())


def test_mse_gradient() -> None:
    loss = MSELoss()
    pred, target = random(3, 4), random(4, 3).T.copy()
    np.testing.assert_allclose(loss.forward(pred, target), ((pred - target) ** 2).mean())
    loss.forward(pred, target)
    np.testing.assert_allclose(loss.backward(), numeric_grad(lambda: loss.forward(pred, target), pred), atol=1e-8)
    with pytest.raises(ValueError, match="differ in shape"):
        loss.forward(pred, target.T)


def test_parameters_are_views_of_one_buffer_in_reverse_layer_order() -> None:
    model = build_model("mlp", (1, 8, 8), 10, (16, 12)).init_params(seed=3)
    params = model.parameters()
    assert model.flat_params.size == sum(p.size for p in params) == model.num_parameters()
    offset = 0
    for p in reversed(params):
        assert np.shares_memory(p.data, model.flat_params) and np.shares_memory(p.grad, model.flat_grads)
        assert p.data.__array_interface__["data"][0] == model.flat_params[offset:].__array_interface__["data"][0]
        offset += p.size
    model.flat_grads[:] = 1.0
    model.zero_grad()
    assert not any(p.grad.any() for p in params)


def test_init_is_seeded_and_scaled() -> None:
    a = build_model("mlp", (64,), 10, (256,)).init_params(seed=1)
    b = build_model("mlp", (64,), 10, (256,)).init_params(seed=1)
    c = build_model("mlp", (64,), 10, (256,)).init_params(seed=2)
    assert np.array_equal(a.flat_params, b.flat_params)
    assert not np.array_equal(a.flat_params, c.flat_params)
    he = a.layers[1].weight.data
    assert abs(he.std() - np.sqrt(2 / 64)) < 0.1 * np.sqrt(2 / 64)
    glorot = a.layers[-1].weight.data
    assert np.abs(glorot).max() <= np.sqrt(6 / (256 + 10))
    assert not a.layers[1].bias.data.any()


def test_the_published_layout_and_ready_offsets_match_the_buffer() -> None:
    model = build_model("mlp", (1, 8, 8), 10, (16, 12)).init_params(seed=3)
    by_name = dict(model.named_parameters())
    assert [name for name, _, _ in model.layout] == [name for name, _ in reversed(list(model.named_parameters()))]
    for name, start, stop in model.layout:
        assert np.shares_memory(by_name[name].grad, model.flat_grads[start:stop]) and stop - start == by_name[name].size
    sizes = [sum(p.size for p in layer.parameters()) for layer in model.layers]
    assert model.ready_offsets() == [sum(sizes[i:]) for i in range(len(sizes))]


@pytest.mark.parametrize("name,shape,hidden", [("mlp", (1, 8, 8), (16, 12)), ("cnn", (1, 8, 8), (20,))])
def test_a_stage_starts_with_the_values_its_layers_have_in_the_whole_model(name: str, shape, hidden) -> None:
    whole = build_model(name, shape, 10, hidden).init_params(seed=5, dtype=np.float64)
    expected = {n: p.data.copy() for n, p in whole.named_parameters()}
    cut = len(whole.layers) // 2
    for start, stop in ((0, cut), (cut, len(whole.layers))):
        stage = build_model(name, shape, 10, hidden).stage(start, stop).init_params(seed=5, dtype=np.float64)
        names = [n for n, _ in stage.named_parameters()]
        assert names and all(int(n.split(".")[0]) >= start for n in names)
        for n, p in stage.named_parameters():
            np.testing.assert_array_equal(p.data, expected[n])
    with pytest.raises(ValueError, match="not a non-empty range"):
        whole.stage(3, 3)


def test_random_state_round_trip_replays_the_same_dropout_masks() -> None:
    model = build_model("mlp", (64,), 10, (32, 16), dropout=0.5, dropout_seed=7).init_params()
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    state = model.random_state()
    assert len(state) == 2
    first = model.forward(x).copy()
    model.set_random_state(state)
    assert np.array_equal(model.forward(x), first)
    assert not np.array_equal(model.forward(x), first)  # the streams moved on
    with pytest.raises(ValueError, match="2 random streams, the state holds 1"):
        model.set_random_state(state[:1])


@pytest.mark.parametrize("name,shape", [("mlp", (64,)), ("cnn", (1, 8, 8))])
def test_backward_without_input_gradient_skips_it_and_keeps_parameter_gradients(name: str, shape) -> None:
    x = np.random.default_rng(0).standard_normal((5, *shape))
    grads = []
    for need in (True, False):
        model = build_model(name, shape, 10).init_params(seed=3, dtype=np.float64)
        model.need_input_grad = need
        out = model.forward(x)
        dx = model.backward(np.ones_like(out))
        assert (dx is None) == (not need)
        first = next(layer for layer in model.layers if layer.parameters())
        assert hasattr(first, "_ws_dx") == need  # the input layer's dx was never computed
        grads.append(model.flat_grads.copy())
    # Without the input gradient the cnn's first convolution runs fused with its pool: other round-off.
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "layers,shape",
    [
        (lambda: (Conv2d(1, 3, 3, padding=1), MaxPool2d(2), ReLU()), (4, 1, 8, 8)),
        (lambda: (Conv2d(2, 3, 3, padding=1), MaxPool2d(2)), (3, 2, 7, 9)),  # odd sizes: pixels in no window
        (lambda: (Conv2d(2, 4, 3, stride=2, padding=2), MaxPool2d(3), Flatten()), (2, 2, 13, 13)),
        (lambda: (Conv2d(8, 4, 2), MaxPool2d(2), Flatten()), (2, 8, 5, 5)),  # 32 rows: batch-wide gradient
        (lambda: (Conv2d(1, 2, 3), MaxPool2d(2)), (2, 1, 4, 4)),  # output 2x2: exactly one window
        (lambda: (Conv2d(1, 2, 3), MaxPool2d(3)), (2, 1, 4, 4)),  # output 2x2 < pool: not fused
    ],
)
def test_convolution_fused_with_its_pool_equals_the_two_layers(layers, shape) -> None:
    x = np.random.default_rng(3).standard_normal(shape)
    x[0, :, : shape[2] // 2] = 0.25  # a constant region: ties inside pool windows
    results = []
    for need in (True, False):  # True: the layers run one by one
        model = Sequential(*layers()).init_params(seed=6, dtype=np.float64)
        model.need_input_grad = need
        try:
            out = model.forward(x).copy()
        except ValueError as error:  # a pool larger than the convolution's output fails the same way
            results.append(str(error))
            continue
        model.backward(np.random.default_rng(4).standard_normal(out.shape))
        results.append((out, model.flat_grads.copy(), hasattr(model.layers[0], "_ws_pooled")))
    if isinstance(results[0], str):
        assert results[0] == results[1]
        return
    (out, grads, fused_first), (fused_out, fused_grads, fused) = results
    assert not fused_first and fused
    np.testing.assert_allclose(fused_out, out, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(fused_grads, grads, rtol=1e-12, atol=1e-15)


def test_pooling_before_relu_is_the_same_function_and_gradient() -> None:
    x = np.random.default_rng(1).standard_normal((4, 2, 6, 6))
    x[0, 0, :2, :2] = -1.0  # a window whose maximum is negative
    x[1, 1, :2, :2] = 0.5  # a tie
    results = []
    for layers in (
        (Conv2d(2, 3, 3, padding=1), ReLU(), MaxPool2d(2)),
        (Conv2d(2, 3, 3, padding=1), MaxPool2d(2), ReLU()),
    ):
        model = Sequential(*layers, Flatten()).init_params(seed=5, dtype=np.float64)
        out = model.forward(x).copy()
        dx = model.backward(np.random.default_rng(2).standard_normal(out.shape)).copy()
        results.append((out, dx, model.flat_grads.copy()))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


def test_max_pool_backward_needs_a_training_forward() -> None:
    pool = MaxPool2d(2)
    x = np.random.default_rng(0).standard_normal((1, 1, 4, 4))
    pool.eval()
    expected = x.reshape(1, 1, 2, 2, 2, 2).max(axis=(3, 5))
    np.testing.assert_array_equal(pool.forward(x), expected)
    with pytest.raises(RuntimeError, match="training mode"):
        pool.backward(np.ones((1, 1, 2, 2)))
    pool.train()
    np.testing.assert_array_equal(pool.forward(x), expected)
    assert pool.backward(np.ones((1, 1, 2, 2))).sum() == 4


def test_models_by_name_and_bad_sizes() -> None:
    cnn = build_model("cnn", (1, 8, 8), 10).init_params()
    assert cnn.forward(np.zeros((3, 1, 8, 8), np.float32)).shape == (3, 10)
    mlp = build_model("mlp", (1, 28, 28), 10, (32,)).init_params()
    assert mlp.forward(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", (64,), 10)
    with pytest.raises(ValueError, match="channels, height>=4"):
        build_model("cnn", (64,), 10)
    with pytest.raises(ValueError, match="positive"):
        build_model("mlp", (64,), 10, (0,))
    with pytest.raises(ValueError, match="in_features"):
        Linear(0, 3)
    with pytest.raises(ValueError, match="expects input"):
        mlp.layers[1].forward(np.zeros((2, 5)))


class Scale(Module):
    """A layer written to the plain contract: its backward adds into its gradient."""

    def __init__(self, features: int) -> None:
        self.w = Parameter((features,), "he", features, features)

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        return x * self.w.data

    def backward(self, grad: np.ndarray) -> np.ndarray:
        self.w.grad += (grad * self._x).sum(axis=0)
        return grad * self.w.data


@pytest.mark.parametrize(
    "model,shape",
    [
        (lambda: build_model("mlp", (64,), 10), (9, 64)),
        (lambda: build_model("cnn", (1, 8, 8), 10), (5, 1, 8, 8)),  # the first convolution runs fused
        (lambda: build_model("cnn", (40, 6, 6), 10), (3, 40, 6, 6)),  # 360 im2col rows: batch-wide products
        (lambda: Sequential(Flatten(), Linear(12, 6), Scale(6), ReLU(), Linear(6, 2)), (4, 3, 4)),
        (lambda: OneBranch(6, 3), (4, 6)),
    ],
)
@pytest.mark.parametrize("pieces", [1, 3])
@pytest.mark.parametrize("need_input_grad", [True, False])
def test_lazy_zero_grad_gives_the_gradients_of_an_eager_one(model, shape, pieces: int, need_input_grad: bool) -> None:
    x = np.random.default_rng(0).standard_normal(shape)
    grads = []
    for lazy in (False, True):
        net = model().init_params(seed=2, dtype=np.float64)
        net.need_input_grad = need_input_grad
        net.flat_grads[...] = np.nan  # what a lazy zero leaves must never reach a gradient
        net.zero_grad(lazy=lazy)
        for part in np.array_split(x, pieces):
            out = net.forward(part)
            net.backward(np.random.default_rng(len(part)).standard_normal(out.shape))
        net.settle_grads()
        assert not any(p.grad_stale for p in net.parameters())
        grads.append(net.flat_grads.copy())
    np.testing.assert_array_equal(grads[1], grads[0])
    assert np.isfinite(grads[0]).all()


def test_state_dict_round_trips_by_name_and_refuses_another_architecture() -> None:
    source = build_model("mlp", (1, 8, 8), 10, (16,)).init_params(seed=1)
    target = build_model("mlp", (1, 8, 8), 10, (16,)).init_params(seed=2, dtype=np.float64)
    state = source.state_dict()
    assert set(state) == {name for name, _ in source.named_parameters()}
    target.load_state_dict(state)
    np.testing.assert_array_equal(target.flat_params, source.flat_params.astype(np.float64))
    state["1.weight"][0, 0] += 1  # a copy, not a view of the model
    assert state["1.weight"][0, 0] != source.state_dict()["1.weight"][0, 0]
    wider = build_model("mlp", (1, 8, 8), 10, (32,)).init_params()
    with pytest.raises(ValueError, match=r"parameter '1.weight' is \(64, 16\) in the file, \(64, 32\) in this model"):
        wider.load_state_dict(state)
    with pytest.raises(ValueError, match=r"the parameters to load have no '3\.bias'"):
        target.load_state_dict({k: v for k, v in state.items() if k != "3.bias"})
