"""Module, Parameter and Sequential, with every parameter a view of one flat buffer.

``Module.init_params`` allocates ONE contiguous parameter buffer and ONE
contiguous gradient buffer for a whole model and turns every parameter's
``data`` and ``grad`` into views of them. The layout (``Module.layout``) is
reverse layer order (the last layer's parameters first), so the gradients
that backward finishes first are contiguous at the front of the buffer. A
collective or an optimizer then works on the flat buffers with no packing
copies.

Each parameter's initial values come from a random stream of its own, keyed
by the seed and the parameter's dotted name, so a model built from a slice of
a Sequential's layers (``Sequential.stage``, a pipeline stage) starts with
exactly the values those layers have in the whole model.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np

from mpitrain import backend

INITS = ("he", "glorot", "zeros")


class Parameter:
    """A trainable tensor: its shape and initialisation, later its storage.

    ``data`` and ``grad`` are None until the owning model's ``init_params``
    binds them to views of the flat buffers.
    """

    def __init__(self, shape: tuple[int, ...], init: str, fan_in: int = 1, fan_out: int = 1) -> None:
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
        self.shape = tuple(int(s) for s in shape)
        self.init = init
        self.fan_in = fan_in
        self.fan_out = fan_out
        self.data: Any = None
        self.grad: Any = None
        self.grad_stale = False  # set by a lazy Module.zero_grad: the next gradient replaces grad

    def first_write(self) -> bool:
        """Whether the gradient written now must replace ``grad`` instead of adding to it: True once
        after a lazy ``Module.zero_grad``. Counts as that write."""
        stale, self.grad_stale = self.grad_stale, False
        return stale

    def add_grad(self, value: Any) -> None:
        """grad += value (grad = value on the first write after a lazy ``Module.zero_grad``)."""
        if self.first_write():
            self.grad[...] = value
        else:
            self.grad += value

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    def initial_values(self, rng: np.random.Generator) -> np.ndarray:
        """Draw this parameter's initial values (float64, host) from ``rng``.

        He: normal with std sqrt(2 / fan_in). Glorot: uniform in
        +-sqrt(6 / (fan_in + fan_out)). Zeros: zeros (no draw).
        """
        if self.init == "he":
            return rng.normal(0.0, np.sqrt(2.0 / self.fan_in), self.shape)
        if self.init == "glorot":
            limit = np.sqrt(6.0 / (self.fan_in + self.fan_out))
            return rng.uniform(-limit, limit, self.shape)
        return np.zeros(self.shape)


def parameter_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of parameter ``name`` (its dotted name in the whole model) under ``seed``."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


class Module:
    """Base of every layer and model.

    Subclasses set Parameters and child Modules as attributes in
    ``__init__`` and implement ``forward`` (caching what backward needs) and
    ``backward`` (accumulating into parameter gradients, returning the
    gradient with respect to the input).
    """

    xp: ModuleType = np
    training: bool = True
    need_input_grad: bool = True  # False: backward may skip d(loss)/d(input) and return None
    # True: every backward writes each of this module's own parameter gradients through
    # Parameter.first_write / add_grad, so a lazy zero_grad may leave them stale instead of filling them
    writes_stale_grads: bool = False

    def forward(self, x: Any) -> Any:
        """Compute the output for input ``x``."""
        raise NotImplementedError

    def backward(self, grad: Any) -> Any:
        """Given d(loss)/d(output), add parameter gradients and return d(loss)/d(input) (or None when
        ``need_input_grad`` is False and the layer skipped it)."""
        raise NotImplementedError

    def __call__(self, x: Any) -> Any:
        return self.forward(x)

    def fuses(self, following: Module) -> bool:
        """Whether ``forward_fused`` / ``backward_fused`` can run this layer and ``following`` as one
        in training, when no input gradient is needed (default: never)."""
        return False

    def forward_fused(self, x: Any, following: Module) -> Any:
        """Training forward of this layer, then ``following`` (only when ``fuses(following)``)."""
        raise NotImplementedError

    def backward_fused(self, grad: Any, following: Module) -> None:
        """Backward of ``forward_fused`` from d(loss)/d(following's output): parameter gradients of both
        layers, no input gradient."""
        raise NotImplementedError

    def children(self) -> list[Module]:
        """Direct sub-modules, in the order they were assigned."""
        return [v for v in vars(self).values() if isinstance(v, Module)]

    def modules(self) -> Iterator[Module]:
        """This module and all its descendants, depth first, in forward order."""
        yield self
        for child in self.children():
            yield from child.modules()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) for every parameter, in forward order."""
        for name, value in self._own_parameters():
            yield prefix + name, value
        for name, child in self._named_children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def _own_parameters(self) -> list[tuple[str, Parameter]]:
        """(attribute name, Parameter) of this module itself, not its children."""
        return [(name, value) for name, value in vars(self).items() if isinstance(value, Parameter)]

    def _named_children(self) -> list[tuple[str, Module]]:
        return [(k, v) for k, v in vars(self).items() if isinstance(v, Module)]

    def parameters(self) -> list[Parameter]:
        """All parameters, in forward order."""
        return [p for _, p in self.named_parameters()]

    def random_state(self) -> list[dict[str, Any]]:
        """The state of every random stream in this model (Dropout masks), in ``modules()`` order."""
        return [m.random_stream.state for m in self.modules() if getattr(m, "random_stream", None) is not None]

    def set_random_state(self, states: list[dict[str, Any]]) -> None:
        """Restore what ``random_state`` returned (the same model structure).

        Raises:
            ValueError: the number of streams differs.
        """
        owners = [m for m in self.modules() if getattr(m, "random_stream", None) is not None]
        if len(owners) != len(states):
            raise ValueError(f"the model has {len(owners)} random streams, the state holds {len(states)}")
        for module, state in zip(owners, states, strict=True):
            module.random_stream.state = state

    def train(self, mode: bool = True) -> Module:
        """Set training mode (affects Dropout) on this module and its descendants."""
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        """Set evaluation mode."""
        return self.train(False)

    def init_params(
        self,
        seed: int = 0,
        xp: ModuleType = np,
        dtype: Any = np.float32,
        allocate: Callable[[int, Any], Any] | None = None,
    ) -> Module:
        """Allocate the flat buffers, bind every parameter to views and initialise them.

        Each parameter's values are drawn from ``parameter_rng(seed, name)``
        in float64 and then cast, so the same seed gives the same model on
        every rank, for every dtype, and for a stage cut from it.
        ``allocate(count, dtype)`` returns a zeroed 1-D buffer for each flat
        buffer (for example memory that a collective can share); default
        ``xp.zeros``. Returns self.
        """
        named = list(self.named_parameters())
        allocate = allocate or (lambda count, kind: xp.zeros(count, dtype=kind))
        self.layout = self.flat_layout()
        total = self.layout[-1][2] if self.layout else 0
        self.rebind(allocate(total, dtype), allocate(total, dtype))
        for name, p in named:
            p.data[...] = backend.to_device(p.initial_values(parameter_rng(seed, name)).astype(dtype), xp)
        for m in self.modules():
            m.xp = xp
        return self

    def flat_layout(self) -> list[tuple[str, int, int]]:
        """(name, start, stop) of every parameter in the flat buffers ``init_params`` makes, in buffer
        order (reverse layer order: see the module docstring); needs no storage, so a whole model's layout
        is known where only a stage of it is allocated."""
        layout, offset = [], 0
        for name, p in reversed(list(self.named_parameters())):
            layout.append((name, offset, offset + p.size))
            offset += p.size
        return layout

    def rebind(self, flat_params: Any, flat_grads: Any) -> None:
        """Make ``flat_params`` / ``flat_grads`` (1-D, the layout's size) this model's buffers, every
        parameter's ``data`` and ``grad`` views of them (e.g. to move a model out of shared memory
        that is about to be freed: pass copies)."""
        by_name = dict(self.named_parameters())
        self.flat_params, self.flat_grads = flat_params, flat_grads
        self._owner_cache = None
        for name, start, stop in self.layout:
            p = by_name[name]
            p.data = flat_params[start:stop].reshape(p.shape)
            p.grad = flat_grads[start:stop].reshape(p.shape)

    def zero_grad(self, lazy: bool = False) -> None:
        """Set every gradient to zero: one fill of the flat gradient buffer.

        With ``lazy``, the gradients of layers that support it
        (``writes_stale_grads``) are only marked stale, and their next
        backward writes them instead of adding to them, which saves a fill of
        the whole buffer every step (README, "Speed on a core"). Until
        each such layer's backward has run, or ``settle_grads``, its
        gradients hold old values.
        """
        if not lazy:
            self.flat_grads.fill(0)
        for writes, params in self._owners():
            for p in params:
                p.grad_stale = lazy and writes
                if lazy and not writes:
                    p.grad.fill(0)

    def _owners(self) -> list[tuple[bool, list[Parameter]]]:
        """(writes_stale_grads, own parameters) of every module with parameters: walked once per
        ``init_params`` / ``rebind``, not once per step."""
        if getattr(self, "_owner_cache", None) is None:
            found = [(m.writes_stale_grads, [p for _, p in m._own_parameters()]) for m in self.modules()]
            self._owner_cache = [(writes, params) for writes, params in found if params]
        return self._owner_cache

    def settle_grads(self) -> None:
        """Zero every gradient still stale after a lazy ``zero_grad`` (its layer's backward did not run)."""
        for _, params in self._owners():
            for p in params:
                if not p.grad_stale:
                    continue
                p.grad.fill(0)
                p.grad_stale = False

    def num_parameters(self) -> int:
        """Total number of trainable elements."""
        return sum(p.size for p in self.parameters())

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of every parameter by dotted name (what ``--save`` writes; loads at any rank count)."""
        return {name: backend.to_host(p.data).copy() for name, p in self.named_parameters()}

    def load_state_dict(self, named: dict[str, Any]) -> None:
        """Copy ``named`` arrays into the parameters of those names (other keys are ignored).

        Raises:
            ValueError: a parameter is missing from ``named`` or has another shape there.
        """
        for name, p in self.named_parameters():
            if name not in named:
                raise ValueError(f"the parameters to load have no {name!r} (they hold {', '.join(sorted(named))})")
            value = np.asarray(backend.to_host(named[name]))
            if value.shape != p.shape:
                raise ValueError(f"parameter {name!r} is {value.shape} in the file, {p.shape} in this model")
            p.data[...] = backend.to_device(value.astype(p.data.dtype), backend.array_module_of(p.data))


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    ``after_backward``, when set, is called with each layer's index as soon
    as that layer's backward has finished (its gradients are final), so a
    caller can start communicating them while earlier layers still compute.

    With ``need_input_grad`` False (a model trained on data sets it), backward
    stops at the first layer with parameters, which skips its own input
    gradient: for an MLP that is the largest matrix product of the input
    layer, for a CNN the first convolution's col2im. In training that layer
    also runs fused with the next one when it ``fuses`` it (a convolution
    then a max-pool: the convolution writes its output in the pool's window
    order, so pooling reads contiguous memory).
    """

    def __init__(self, *layers: Module, first_index: int = 0) -> None:
        self.layers = list(layers)
        self.first_index = first_index  # this model's layer 0 is layer first_index of the whole model
        self.after_backward: Callable[[int], None] | None = None
        self._fused_at: int | None = None  # set by each forward, read by the backward after it

    def stage(self, start: int, stop: int) -> Sequential:
        """A new, uninitialised model of layers [start, stop): its parameters have the names, and after
        ``init_params`` with the same seed the values, they have in this model (the layers are shared
        objects, so build a fresh whole model per stage when several live in one process)."""
        if not 0 <= start < stop <= len(self.layers):
            raise ValueError(f"stage [{start}, {stop}) is not a non-empty range of the {len(self.layers)} layers")
        return Sequential(*self.layers[start:stop], first_index=self.first_index + start)

    def ready_offsets(self) -> list[int]:
        """For each layer index i: how many leading flat-gradient elements are final once the backward of
        layers i..end has run (the reverse layout puts later layers first). Needs ``init_params``."""
        ends: dict[int, int] = {}
        for name, _, stop in self.layout:
            layer = int(name.split(".", 1)[0]) - self.first_index
            ends[layer] = max(ends.get(layer, 0), stop)
        offsets, done = [], 0
        for index in range(len(self.layers) - 1, -1, -1):
            done = max(done, ends.get(index, 0))
            offsets.append(done)
        return offsets[::-1]

    def children(self) -> list[Module]:
        return list(self.layers)

    def _named_children(self) -> list[tuple[str, Module]]:
        return [(str(self.first_index + i), layer) for i, layer in enumerate(self.layers)]

    def forward(self, x: Any) -> Any:
        self._fused_at = self._fusion()
        index = 0
        while index < len(self.layers):
            if index == self._fused_at:
                x = self.layers[index].forward_fused(x, self.layers[index + 1])
                index += 2
            else:
                x = self.layers[index].forward(x)
                index += 1
        return x

    def _first_parametric(self) -> int:
        """Index of the first layer with parameters (asked for every forward and backward, so kept)."""
        key = tuple(map(id, self.layers))
        cached = getattr(self, "_first_cache", None)
        if cached is None or cached[0] != key:
            cached = self._first_cache = (
                key,
                next((i for i, m in enumerate(self.layers) if m.parameters()), len(self.layers)),
            )
        return cached[1]

    def _fusion(self) -> int | None:
        """Index of the layer that runs fused with the next one in this training step, if any."""
        first = self._first_parametric()
        can = self.training and not self.need_input_grad and first + 1 < len(self.layers)
        return first if can and self.layers[first].fuses(self.layers[first + 1]) else None

    def output_bytes_per_sample(self, sample: Any) -> int:
        """Bytes of all layer outputs for ``sample`` (a batch of one), from a forward in eval mode.

        Eval mode draws no random numbers, so training state is untouched.
        """
        mode = self.training
        self.eval()
        total = 0
        try:
            for layer in self.layers:
                sample = layer.forward(sample)
                total += int(sample.nbytes)
        finally:
            self.train(mode)
        return total // max(1, len(sample))

    def backward_stop(self) -> int:
        """The lowest layer index a backward runs (and reports to ``after_backward``): 0, or the first
        layer with parameters when no input gradient is needed."""
        return 0 if self.need_input_grad else self._first_parametric()

    def backward(self, grad: Any) -> Any:
        stop = self.backward_stop()
        fused = self._fused_at
        for index in range(len(self.layers) - 1, stop - 1, -1):
            layer = self.layers[index]
            layer.need_input_grad = self.need_input_grad or index > stop
            if fused is not None and index == fused:  # with the layer after it, whose backward this replaces
                layer.backward_fused(grad, self.layers[index + 1])
            elif fused is None or index != fused + 1:
                grad = layer.backward(grad)
            if self.after_backward is not None:
                self.after_backward(index)
        return grad if self.need_input_grad else None
