"""Synchronous data parallelism: one replica per rank, gradients averaged every step."""

from __future__ import annotations

import hashlib
from typing import Any

from mpitrain import backend
from mpitrain.comm import Communicator, mark_all_ranks
from mpitrain.nn import Module, SoftmaxCrossEntropy
from mpitrain.optim import Optimizer


class DataParallel:
    """Wraps a model and its optimizer so every rank applies the same averaged update.

    Each step: forward and backward on this rank's batch, one all-reduce
    (mean) of the model's flat gradient buffer, then the optimizer updates the
    flat parameter buffer. Since every rank starts from rank 0's parameters
    and applies bit-identical gradients, the replicas stay bit-identical.

    Args:
        model: a model whose ``init_params`` has run.
        optimizer: an optimizer over ``model.flat_params`` / ``model.flat_grads``.
        comm: the communicator of the data-parallel group.
        algorithm: all-reduce algorithm (see ``Communicator.allreduce``).
    """

    def __init__(self, model: Module, optimizer: Optimizer, comm: Communicator, algorithm: str = "auto") -> None:
        if optimizer.params is not model.flat_params or optimizer.grads is not model.flat_grads:
            raise ValueError("the optimizer must update the model's own flat_params and flat_grads")
        self.model, self.optimizer, self.comm, self.algorithm = model, optimizer, comm, algorithm
        self.loss_fn = SoftmaxCrossEntropy()

    def broadcast_parameters(self, root: int = 0) -> None:
        """Copy ``root``'s parameters to every rank."""
        self.comm.broadcast(self.model.flat_params, root=root)

    def train_step(self, x: Any, y: Any) -> tuple[float, int]:
        """One synchronous step on this rank's batch; returns (local mean loss, local correct count)."""
        model = self.model
        model.train()
        model.zero_grad()
        logits = model.forward(x)
        loss = self.loss_fn.forward(logits, y)
        model.backward(self.loss_fn.backward())
        backend.synchronize(model.xp)
        self.comm.allreduce(model.flat_grads, op="mean", algorithm=self.algorithm)
        self.optimizer.step()
        return loss, int((logits.argmax(axis=1) == y).sum())

    def parameter_digest(self) -> str:
        """sha256 of this rank's parameter bytes."""
        return hashlib.sha256(backend.to_host(self.model.flat_params).tobytes()).hexdigest()

    def check_replicas(self) -> None:
        """Compare parameter digests across ranks (collective).

        Raises:
            RuntimeError: on every rank, naming the ranks whose parameters differ from rank 0's.
        """
        digests = self.comm.allgather_object(self.parameter_digest())
        differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise mark_all_ranks(
                RuntimeError(f"replicas diverged: ranks {differ} hold parameters different from rank 0's")
            )
