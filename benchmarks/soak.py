"""Soak test: many training steps with each rank's resident memory sampled; it must not grow after warm-up.

    mpiexec -n 2 python benchmarks/soak.py --steps 20000 --json build/soak.json

Trains the default MLP on digits (data parallel, as ``python -m mpitrain``)
and samples VmRSS from /proc every ``--every`` steps. Exit status 1 when any
rank's RSS at the end exceeds its RSS after warm-up by more than
``--tolerance-mb``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from mpi4py import MPI

from mpitrain import threads
from mpitrain.comm import Communicator
from mpitrain.data import ShardedBatches, load_digits
from mpitrain.nn import SoftmaxCrossEntropy, build_model
from mpitrain.optim import SGD
from mpitrain.parallel import DataParallel


def rss_mb() -> float:
    """This process's resident set size in MiB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    """Run the soak on COMM_WORLD; rank 0 prints the samples; returns the exit status."""
    parser = argparse.ArgumentParser(prog="benchmarks/soak.py", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--every", type=int, default=1000, help="steps between RSS samples")
    parser.add_argument("--warmup", type=int, default=1000, help="steps before the baseline sample")
    parser.add_argument("--tolerance-mb", type=float, default=2.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    world = MPI.COMM_WORLD
    comm = Communicator(world, timeout=300)
    threads.limit_threads(threads.ranks_sharing_cores(comm))
    data = load_digits()
    model = build_model("mlp", data.sample_shape, data.num_classes).init_params(allocate=comm.allocate)
    dp = DataParallel(
        model, SGD(model.flat_params, model.flat_grads, 0.05, momentum=0.9), comm, loss=SoftmaxCrossEntropy()
    )
    dp.broadcast_parameters()
    batches = ShardedBatches(len(data.x_train), 32, comm.rank, comm.size, seed=0)
    x, y = np.empty((32, *data.sample_shape), np.float32), np.empty(32, np.int64)
    samples, step, epoch = [], 0, 0
    while step < args.steps:
        for idx in batches.batches(epoch):
            np.take(data.x_train, idx, axis=0, out=x)
            np.take(data.y_train, idx, out=y)
            dp.train_step(x, y)
            step += 1
            if step % args.every == 0 or step == args.warmup:
                samples.append((step, world.gather(rss_mb(), root=0)))
            if step == args.steps:
                break
        epoch += 1
    dp.check_replicas()
    if comm.rank != 0:
        return 0
    baseline = dict(samples)[args.warmup]
    final = samples[-1][1]
    growth = [end - start for start, end in zip(baseline, final, strict=True)]
    print(f"# soak: {args.steps} steps, {comm.size} rank(s); RSS (MiB) per rank")
    for s, values in samples:
        print(f"  step {s:>6}: " + "  ".join(f"{v:8.1f}" for v in values))
    print(f"# growth after warm-up (step {args.warmup} -> {args.steps}): " + ", ".join(f"{g:+.1f}" for g in growth))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "samples": samples, "growth_mb": growth}, f, indent=1)
    return 1 if max(growth) > args.tolerance_mb else 0


if __name__ == "__main__":
    sys.exit(main())
