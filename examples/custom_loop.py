"""Your own model and training loop on every rank, with mpitrain's library API (Horovod's names).

mpirun -np 2 python examples/custom_loop.py --epochs 3
"""

import argparse

import numpy as np
from sklearn.datasets import load_digits

import mpitrain as mt
from mpitrain.nn import Linear, ReLU, Sequential, SoftmaxCrossEntropy
from mpitrain.optim import SGD

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch", type=int, default=32)
args = parser.parse_args()

mt.init()
x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype(np.float32)
train, test = slice(0, 1500), slice(1500, None)
model = Sequential(Linear(64, 128), ReLU(), Linear(128, 10)).init_params(seed=0)
optimizer = mt.DistributedOptimizer(SGD(model.flat_params, model.flat_grads, 0.05, momentum=0.9), model)
mt.broadcast_parameters(model, root=0)  # every replica starts from rank 0's values
loss = SoftmaxCrossEntropy()

for epoch in range(args.epochs):
    order = np.random.default_rng([1, epoch]).permutation(1500)  # the same order on every rank
    mine = order[mt.rank() :: mt.size()][: 1500 // mt.size()]  # this rank's equal share
    for start in range(0, len(mine) - args.batch + 1, args.batch):
        batch = mine[start : start + args.batch]
        optimizer.zero_grad()
        out = model.forward(x[train][batch])
        loss.forward(out, y[train][batch])
        model.backward(loss.backward())
        optimizer.step()  # gradients averaged over the ranks, then one SGD step
    correct = mt.allreduce(np.array([(model.eval().forward(x[test]).argmax(1) == y[test]).sum()]), op="sum")
    model.train()
    if mt.rank() == 0:
        print(f"epoch {epoch + 1}: test accuracy {correct[0] / mt.size() / len(y[test]):.3f}", flush=True)
optimizer.close()
