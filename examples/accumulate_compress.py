"""Gradient accumulation and compression through DistributedOptimizer: the gradients of K backward passes
add up locally, then one fp16 all-reduce and one step (a large effective batch over a slow network).

    mpirun -np 2 python examples/accumulate_compress.py --passes 4 --compression fp16
"""

import argparse

import numpy as np
from sklearn.datasets import load_digits

import mpitrain as mt
from mpitrain.nn import SoftmaxCrossEntropy, build_model
from mpitrain.optim import SGD

parser = argparse.ArgumentParser()
parser.add_argument("--passes", type=int, default=4, help="backward passes per step")
parser.add_argument("--compression", default="fp16", help="none, fp16, bf16 or topk:RATIO")
parser.add_argument("--epochs", type=int, default=5)
args = parser.parse_args()

mt.init()
x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype(np.float32)
model = build_model("mlp", (64,), 10).init_params(seed=0)
sgd = SGD(model.flat_params, model.flat_grads, 0.1 / args.passes, momentum=0.9)  # the passes' gradients add up
optimizer = mt.DistributedOptimizer(sgd, model, compression=args.compression, backward_passes_per_step=args.passes)
loss, micro = SoftmaxCrossEntropy(), 16
mine = np.arange(mt.rank(), 1500, mt.size())[: 1500 // mt.size()]
for epoch in range(args.epochs):
    order = np.random.default_rng([0, epoch]).permutation(mine)
    steps = len(order) // (micro * args.passes)
    for step in range(steps):
        optimizer.zero_grad()
        for p in range(args.passes):
            batch = order[(step * args.passes + p) * micro :][:micro]
            loss.forward(model.forward(x[batch]), y[batch])
            model.backward(loss.backward())
        optimizer.step()  # one compressed average of the summed gradients, one update
    accuracy = (model.eval().forward(x[1500:]).argmax(1) == y[1500:]).mean()
    model.train()
    if mt.rank() == 0:
        print(f"epoch {epoch + 1}: {steps} steps of {args.passes} x {micro} x {mt.size()} samples, "
              f"test accuracy {accuracy:.3f}", flush=True)  # fmt: skip
optimizer.close()
