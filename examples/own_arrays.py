"""Train on arrays you already have in memory (no .npz), each rank reading its own equal share.

    mpirun -np 2 python examples/own_arrays.py --samples 2000 --epochs 5

``ShardedBatches`` is mpitrain's DistributedSampler: one permutation per
(seed, epoch), the same on every rank, padded so every rank takes the same
number of steps, and rank r reading the r-th block of each global batch.
"""

import argparse

import numpy as np

import mpitrain as mt
from mpitrain.data import ShardedBatches
from mpitrain.nn import SoftmaxCrossEntropy, build_model
from mpitrain.optim import Adam

parser = argparse.ArgumentParser()
parser.add_argument("--samples", type=int, default=4000)
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--batch", type=int, default=64, help="per rank")
args = parser.parse_args()

mt.init()
# Your data: any (samples, features) float array and integer labels. Here: two noisy rings.
rng = np.random.default_rng(0)  # the same data on every rank
radius = rng.integers(0, 2, args.samples)
angle = rng.uniform(0, 2 * np.pi, args.samples)
x = np.stack([(1 + radius) * np.cos(angle), (1 + radius) * np.sin(angle)], 1) + rng.normal(0, 0.15, (args.samples, 2))
x, y = x.astype(np.float32), radius

model = build_model("mlp", (2,), 2, (32, 32)).init_params(seed=0)
optimizer = mt.DistributedOptimizer(Adam(model.flat_params, model.flat_grads, 0.01), model)
loss = SoftmaxCrossEntropy()
sampler = ShardedBatches(len(x), args.batch, mt.rank(), mt.size(), seed=0)
for epoch in range(args.epochs):
    total = np.zeros(2)  # loss sum, samples on this rank
    for indices in sampler.batches(epoch):
        optimizer.zero_grad()
        value = loss.forward(model.forward(x[indices]), y[indices])
        model.backward(loss.backward())
        optimizer.step()
        total += value * len(indices), len(indices)
    total = mt.allreduce(total, op="sum")
    accuracy = (model.eval().forward(x).argmax(1) == y).mean()
    model.train()
    if mt.rank() == 0:
        print(f"epoch {epoch + 1}: loss {total[0] / total[1]:.4f} accuracy {accuracy:.3f}", flush=True)
optimizer.close()
