"""The Strategy interface under the training loop, and the registry behind ``--strategy``.

The loop (``train.py``), checkpoints and evaluation call a strategy through
these methods and nothing else, so a new way of training (parameter server,
gossip, a pipeline) is a sibling module, not a fork of the loop:

- ``shard``: which data shard this rank reads (None: it reads none, as a
  parameter server's servers or a pipeline's later stages);
- ``data_shards(options, world)`` (before construction) and ``num_parameters()``;
- ``start()``: make the ranks consistent before the first step;
- ``batches(sampler, epoch, first, count)``: which samples each of this
  rank's steps reads (one batch of its shard per round, unless the strategy
  hands out work asynchronously);
- ``step(x, y)``: one training step, returning the sums the loop reports;
- ``evaluate(x, y)``: the same sums on held-out data, without training;
- ``sync()``: a collective point where the state is consistent enough to
  checkpoint or evaluate; ``check()`` after it verifies that it is;
- ``state_dict()`` / ``load_state_dict()``: everything a checkpoint holds
  for this rank; ``export()``: the whole model's parameters by name;
- ``close()``: stop threads and free shared memory.

Each strategy declares its own options: an argparse group (``add_arguments``)
and a dataclass (``Options``), so ``train --help`` shows them grouped and a
flag given to the wrong strategy is one clear error.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar, NamedTuple

import numpy as np

from mpitrain import backend
from mpitrain.comm import Communicator
from mpitrain.data import ShardedBatches
from mpitrain.nn import Module
from mpitrain.optim import Optimizer

Loss = Any  # forward(output, target) -> float, forward_value(...) -> a 0-d array, backward() -> d(loss)/d(output)


class Sums(NamedTuple):
    """What a step or an evaluation adds to the loop's totals on this rank: numbers, or (a training step
    on a GPU) 0-d device arrays, which the loop sums on the device and reads once an epoch."""

    loss: Any  # loss summed over the samples (mean loss x samples)
    correct: Any
    samples: int


class Totals:
    """A rank's running (loss sum, correct, samples) over an epoch's steps: in a host array, with what GPU
    steps returned summed on their device and added in by ``read`` (once an epoch, and at a checkpoint:
    a resumed run then sums in the same order as one that went through)."""

    def __init__(self, start: np.ndarray) -> None:
        self.host = start
        self.device: Any = None

    def add(self, sums: Sums) -> None:
        """Add a step's sums (device values stay on the device)."""
        if not backend.is_device_array(sums.loss):
            self.host += sums
            return
        if self.device is None:
            self.device = backend.array_module_of(sums.loss).zeros(2, np.float64)
        self.device[0] += sums.loss
        self.device[1] += sums.correct
        self.host[2] += sums.samples

    def read(self) -> np.ndarray:
        """The totals so far, on the host (3 float64)."""
        if self.device is not None:
            self.host[:2] += backend.to_host(self.device)
            self.device.fill(0)
        return self.host


@dataclass
class Job:
    """What every strategy trains: how to build the model, its optimizer and loss, and with what.

    ``build_model()`` returns an uninitialised model (a strategy may cut it
    into stages); ``build_optimizer(params, grads, allocate)`` an optimizer
    over flat buffers; ``loss()`` a fresh loss object.
    """

    build_model: Callable[[], Module]
    build_optimizer: Callable[[Any, Any, Callable[[int, Any], Any] | None], Optimizer]
    loss: Callable[[], Loss]
    seed: int = 0
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    xp: ModuleType = np
    sample_shape: tuple[int, ...] = ()  # one input sample's shape (a pipeline sizes its messages by it)
    batch_size: int = 0  # the loop's per-rank batch (0: unknown; a pipeline needs it)
    clip_grad_norm: float = 0.0  # the averaged gradients' global norm is clipped to this (0: off)


class State(NamedTuple):
    """A rank's part of a checkpoint: ``replicated`` arrays are the same on every rank (rank 0 writes
    them once), ``local`` ones are this rank's own; ``meta`` is JSON-able."""

    replicated: dict[str, np.ndarray]
    local: dict[str, np.ndarray]
    meta: dict[str, Any]


class Strategy(ABC):
    """One way of training over a Communicator (see the module docstring)."""

    name: ClassVar[str]
    Options: ClassVar[type]  # a dataclass of this strategy's options

    def __init__(self, job: Job, comm: Communicator, options: Any) -> None:
        self.job, self.comm, self.options = job, comm, options
        self._sent_before = comm.sent_bytes

    @property
    def sent_bytes(self) -> int:
        """Bytes this rank has sent since the strategy was made (``Communicator.sent_bytes``)."""
        return self.comm.sent_bytes - self._sent_before

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Add this strategy's flags (their dests are the fields of ``Options``)."""
        return None

    @classmethod
    def validate(cls, options: Any, batch_size: int, world_size: int) -> None:
        """Raise ValueError naming the flags when ``options`` do not go together, or not with this batch
        size and world (before any setup)."""
        return None

    @classmethod
    def data_shards(cls, options: Any, world_size: int) -> int:
        """Into how many shards the training data is cut for a world of ``world_size`` (default: one per rank)."""
        return world_size

    @abstractmethod
    def num_parameters(self) -> int:
        """Trainable elements of the whole model (all ranks' parts together)."""

    @property
    @abstractmethod
    def shard(self) -> tuple[int, int] | None:
        """(index, count) of the data shard this rank reads each step, or None when it reads none."""

    @abstractmethod
    def start(self) -> None:
        """Make every rank's state consistent before the first step (collective)."""

    def batches(
        self, sampler: ShardedBatches | None, epoch: int, first: int, count: int
    ) -> Iterator[np.ndarray | None]:
        """This rank's sample indices for each of its steps in rounds [first, first + count) of ``epoch``.

        A round is one batch of every data shard. The default is one step per
        round: the next ``count`` batches of this rank's shard (None, a step
        without data, where ``sampler`` is None). An asynchronous strategy may
        give one rank more steps than another; every rank's iterator ends when
        the rounds are done, and the loop then meets the others (collective).
        """
        if sampler is None:
            return itertools.repeat(None, count)
        return itertools.islice(sampler.batches(epoch, first), count)

    @abstractmethod
    def step(self, x: Any, y: Any) -> Sums:
        """One training step on this rank's batch (None where ``shard`` is None); collective."""

    @abstractmethod
    def evaluate(self, x: Any, y: Any) -> Sums:
        """Loss and accuracy sums on a batch of held-out data; call after ``sync``."""

    @abstractmethod
    def sync(self) -> None:
        """Reach a state consistent enough to checkpoint or evaluate (collective)."""

    @abstractmethod
    def check(self) -> None:
        """Verify the consistency ``sync`` promises (collective); raise on every rank when it fails."""

    @abstractmethod
    def state_dict(self) -> State:
        """Everything a checkpoint must hold for this rank (call after ``sync``; collective)."""

    @abstractmethod
    def load_state_dict(self, state: State, same_world: bool) -> None:
        """Restore ``state_dict``'s result; ``same_world``: written by a world of this size and batch,
        so per-rank state applies (else only the replicated part)."""

    @abstractmethod
    def load_parameters(self, named: dict[str, np.ndarray]) -> None:
        """Start from these whole-model parameters by name (``--init-from``) instead of the seed's values;
        called on every rank before ``start``. Raises ValueError naming a missing or misshapen parameter."""

    @abstractmethod
    def export(self) -> dict[str, np.ndarray] | None:
        """The whole model's parameters by name on rank 0 (None elsewhere); call after ``sync``."""

    @property
    def stats(self) -> dict[str, Any]:
        """Counters the loop reports per epoch (e.g. lr, skipped_steps)."""
        return {}

    def describe(self) -> str:
        """How this strategy laid the job out over the ranks, for the run header ("" when there is nothing
        beyond the strategy's name)."""
        return ""

    def close(self) -> None:
        """Stop this strategy's threads and free its shared memory (collective)."""
        return None


def json_array(value: Any) -> np.ndarray:
    """A JSON-able value as a uint8 array, so per-rank metadata travels in a checkpoint's arrays."""
    return np.frombuffer(json.dumps(value).encode(), np.uint8)


def from_json_array(array: np.ndarray) -> Any:
    """The value ``json_array`` stored."""
    return json.loads(array.tobytes().decode())


def optimizer_arrays(optimizer: Optimizer) -> dict[str, np.ndarray]:
    """The optimizer's state buffers as host arrays named ``opt/<key>`` (its step count goes in meta)."""
    return {f"opt/{k}": backend.to_host(v) for k, v in optimizer.state_dict().items() if k != "steps"}


def load_optimizer(optimizer: Optimizer, arrays: dict[str, np.ndarray], steps: int, xp: ModuleType) -> None:
    """Restore what ``optimizer_arrays`` named (the other keys of ``arrays`` are ignored) and the step count."""
    state = {k[4:]: backend.to_device(v, xp) for k, v in arrays.items() if k.startswith("opt/")}
    optimizer.load_state_dict({**state, "steps": steps})


def release_model(comm: Communicator, model: Module, optimizer: Optimizer) -> None:
    """Free the node-shared memory (``Communicator.allocate``) of ``model``'s flat buffers and
    ``optimizer``'s state (collective); the model stays readable (its buffers are copied out first), the
    optimizer does not."""
    shared = [model.flat_params, model.flat_grads]
    shared += [v for v in optimizer.state_dict().values() if getattr(v, "ndim", 0)]
    model.rebind(model.flat_params.copy(), model.flat_grads.copy())
    comm.release(*shared)


def exported(comm: Communicator, model: Module) -> dict[str, np.ndarray] | None:
    """``Strategy.export`` of a model held whole: its parameters by name, host copies, on rank 0."""
    return model.state_dict() if comm.rank == 0 else None


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available to ``--strategy``."""
    STRATEGIES[cls.name] = cls
    return cls


def options_for(name: str, values: dict[str, Any]) -> Any:
    """The ``Options`` of strategy ``name`` from the matching keys of ``values`` (others are ignored)."""
    cls = get(name).Options
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def get(name: str) -> type[Strategy]:
    """The strategy class registered as ``name``.

    Raises:
        ValueError: no such strategy (the message lists them).
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
