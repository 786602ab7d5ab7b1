"""Post-local SGD (``--strategy local-sgd``; Lin et al., ICLR 2020): ``--local-warmup K`` steps of
gradient all-reduce, then ``--sync-every H`` local steps between averages of the parameters.

During the warm-up the replicas stay bit-identical (as ``allreduce``);
afterwards each rank steps on its own gradients and every H-th step the
flat parameters are averaged with one all-reduce, so parameter traffic
falls by H. The optimizer state stays local (as PyTorch's
PostLocalSGDOptimizer). The step counter is checkpointed, so a resume in the
middle of a period, or of the warm-up, continues where the run was instead
of starting the warm-up again. Deterministic: same seed and world, same
result.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mpitrain.cli_types import nonneg_int, positive_int
from mpitrain.parallel.base import register
from mpitrain.parallel.local_replicas import LocalReplicas


@dataclass
class LocalSGDOptions:
    """Options of ``--strategy local-sgd``."""

    sync_every: int = 8
    local_warmup: int = 0


@register
class LocalSGD(LocalReplicas):
    """Post-local SGD: gradient all-reduce for --local-warmup steps, then a parameter average every
    --sync-every local steps."""

    name = "local-sgd"
    Options = LocalSGDOptions

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        d = LocalSGDOptions()
        group.add_argument(
            "--sync-every", type=positive_int, default=d.sync_every, help="local steps between parameter averages"
        )
        group.add_argument(
            "--local-warmup", type=nonneg_int, default=d.local_warmup, help="steps of gradient all-reduce first"
        )

    @classmethod
    def validate(cls, options: LocalSGDOptions, batch_size: int, world_size: int) -> None:
        if options.sync_every < 1 or options.local_warmup < 0:
            raise ValueError(
                f"--sync-every must be >= 1 and --local-warmup >= 0, "
                f"got {options.sync_every} and {options.local_warmup}"
            )

    def communicate(self) -> None:
        warmup, period = self.options.local_warmup, self.options.sync_every
        if self.steps <= warmup:
            with self.waiting():
                self.comm.allreduce(self.model.flat_grads, op="mean")
            self.optimizer.step()
            return
        self.optimizer.step()
        if (self.steps - warmup) % period == 0:
            with self.waiting():
                self.comm.allreduce(self.model.flat_params, op="mean")
