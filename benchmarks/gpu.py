"""GPU benchmarks: device-buffer all-reduce per path, and one training step on cupy against PyTorch.

    mpiexec -n 1 python benchmarks/gpu.py collectives --json build/gpu_collectives.json
    python benchmarks/gpu.py training --json build/gpu_training.json

``collectives``: busbw of a device all-reduce for each available path
(staged, with the host's adds; staged-gpu, with the GPUs' adds, on one
node; direct where MPI is CUDA-aware; nccl where cupy has it and every
rank has a GPU of its own), 1 to 256 MiB, beside a device-to-host copy of
the same size into page-locked memory, which bounds the staged path. At one
rank a sum all-reduce has nothing to do and returns at once (busbw 0): the
one-rank run is there for the copy column, the staging limit.

``training``: one step (forward, backward, SGD update) of the
784-1024-1024-10 MLP and of the CNN on 1x28x28 images, float32, batch 512
and 4096, on mpitrain's cupy core and on the same models in PyTorch on the
same GPU; medians of interleaved repeats and their ratio. ``--backend numpy
--device cpu`` runs the same code on a CPU (a smoke test of the script).
Both print an nccl-tests style table and write JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np

from mpitrain import backend
from mpitrain.nn import SoftmaxCrossEntropy, build_model
from mpitrain.optim import build_optimizer

MODELS = {"mlp": ((784,), (1024, 1024)), "cnn": ((1, 28, 28), (64,))}


def _torch_model(name: str) -> Any:
    import torch.nn as tnn

    if name == "mlp":
        return tnn.Sequential(
            tnn.Flatten(), tnn.Linear(784, 1024), tnn.ReLU(), tnn.Linear(1024, 1024), tnn.ReLU(), tnn.Linear(1024, 10)
        )
    return tnn.Sequential(
        tnn.Conv2d(1, 16, 3, padding=1), tnn.MaxPool2d(2), tnn.ReLU(),
        tnn.Conv2d(16, 32, 3, padding=1), tnn.MaxPool2d(2), tnn.ReLU(),
        tnn.Flatten(), tnn.Linear(32 * 7 * 7, 64), tnn.ReLU(), tnn.Linear(64, 10),
    )  # fmt: skip


def _ours(name: str, batch: int, xp: Any) -> Any:
    shape, hidden = MODELS[name]
    model = build_model(name, shape, 10, hidden).init_params(seed=0, xp=xp, dtype=np.float32)
    optimizer = build_optimizer("sgd", model.flat_params, model.flat_grads, 0.01)
    loss = SoftmaxCrossEntropy()
    rng = np.random.default_rng(0)
    x = backend.to_device(rng.standard_normal((batch, *shape)).astype(np.float32), xp)
    y = backend.to_device(rng.integers(0, 10, batch), xp)

    def step() -> None:
        model.zero_grad()
        loss.forward(model.forward(x), y)
        model.backward(loss.backward())
        optimizer.step()

    return step


def _theirs(name: str, batch: int, device: str) -> Any:
    import torch

    model = _torch_model(name).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = torch.nn.CrossEntropyLoss()
    shape, _ = MODELS[name]
    x = torch.randn((batch, *shape), device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        criterion(model(x), y).backward()
        optimizer.step()

    return step


def _timed(step: Any, sync: Any, steps: int) -> float:
    sync()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - began) / steps


def training(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time one training step per (model, batch), ours against torch's, interleaved; the rows."""
    xp = backend.get_array_module(args.backend)
    try:
        import torch
    except ImportError:
        torch = None
    device_sync = (lambda: backend.synchronize(xp)) if xp is not np else (lambda: None)
    torch_sync = (lambda: torch.cuda.synchronize()) if torch is not None and args.device == "cuda" else (lambda: None)
    if torch is not None:
        torch.manual_seed(0)
        torch.backends.cudnn.benchmark = True
    rows = []
    print("#  model  batch   mpitrain ms     torch ms   ratio (ours / torch)")
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            ours = _ours(name, batch, xp)
            theirs = _theirs(name, batch, args.device) if torch is not None else None
            for _ in range(args.warmup):
                ours()
                if theirs is not None:
                    theirs()
            times: dict[str, list[float]] = {"mpitrain": [], "torch": []}
            for _ in range(args.repeat):
                times["mpitrain"].append(_timed(ours, device_sync, args.steps))
                if theirs is not None:
                    times["torch"].append(_timed(theirs, torch_sync, args.steps))
            mine = statistics.median(times["mpitrain"])
            other = statistics.median(times["torch"]) if times["torch"] else float("nan")
            row = {"model": name, "batch": batch, "backend": args.backend, "device": args.device,
                   "mpitrain_s": mine, "torch_s": other, "ratio": mine / other,
                   "mpitrain_range_s": [min(times["mpitrain"]), max(times["mpitrain"])],
                   "torch_range_s": [min(times["torch"]), max(times["torch"])] if times["torch"] else None}  # fmt: skip
            rows.append(row)
            print(f"{name:>8} {batch:6d} {mine * 1e3:12.3f} {other * 1e3:12.3f} {mine / other:9.2f}", flush=True)
    return rows


def collectives(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """Time a device all-reduce for each available path and a device-to-host copy per size; the rows
    (on rank 0; None on the others)."""
    from mpitrain.comm import Communicator

    comm = Communicator()
    backend.select_device(comm.local_rank)
    cupy = backend.device_module()
    paths = ["staged"] + (["staged-gpu"] if comm.single_node and comm.size > 1 else [])
    paths += ["direct"] if comm.cuda_aware.aware else []
    gpus = comm.allgather_object((comm.local_rank, backend.current_device()))
    own_gpus = len(set(gpus)) == len(gpus) and cupy.cuda.runtime.getDeviceCount() >= comm.local_size
    if backend.nccl_module() is not None and own_gpus:  # NCCL refuses two ranks on one GPU
        paths.append("nccl")
    transfers = backend.Transfers()
    rows = []
    if comm.rank == 0:
        print(f"# {comm.size} rank(s); CUDA-aware MPI: {comm.cuda_aware.describe()}; paths: {', '.join(paths)}")
        print("#      bytes      path       time us   algbw GB/s   busbw GB/s   d2h copy GB/s")
    size = 1 << 20
    while size <= args.end:
        buf = cupy.ones(size // 4, dtype=cupy.float32)
        host = transfers.host(size)
        copy_times = []
        per_path: dict[str, list[float]] = {p: [] for p in paths}
        for _ in range(args.warmup):
            for path in paths:
                comm.allreduce(buf, algorithm=path)
        for _ in range(args.iters):
            for path in paths:  # interleaved
                backend.synchronize(cupy)
                comm.comm.Barrier()
                began = time.perf_counter()
                comm.allreduce(buf, algorithm=path)
                backend.synchronize(cupy)
                per_path[path].append(comm.comm.allreduce(time.perf_counter() - began, op=_max()))
            transfers.begin()
            began = time.perf_counter()
            transfers.wait(transfers.to_host(buf, host.view(np.float32)))
            copy_times.append(time.perf_counter() - began)
        copy = size / statistics.median(copy_times) / 1e9
        for path in paths:
            t = statistics.median(per_path[path])
            bus = size / t / 1e9 * (2 * (comm.size - 1) / comm.size)
            row = {"bytes": size, "path": path, "ranks": comm.size, "time_s": t, "range_s": [min(per_path[path]),
                   max(per_path[path])], "algbw": size / t / 1e9, "busbw": bus, "d2h_copy_GBps": copy}  # fmt: skip
            rows.append(row)
            if comm.rank == 0:
                print(f"{size:12d} {path:>9} {t * 1e6:13.1f} {size / t / 1e9:12.2f} {bus:12.2f} {copy:15.2f}")
        size *= args.factor
    rank = comm.rank
    comm.close()
    return rows if rank == 0 else None


def _max() -> Any:
    from mpi4py import MPI

    return MPI.MAX


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark named on the command line; 0 on success."""
    parser = argparse.ArgumentParser(prog="benchmarks/gpu.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    coll = sub.add_parser("collectives", help="device all-reduce per path")
    coll.add_argument("--end", type=int, default=256 << 20, help="largest size in bytes (from 1 MiB)")
    coll.add_argument("--factor", type=int, default=4)
    coll.add_argument("--iters", type=int, default=20)
    coll.add_argument("--warmup", type=int, default=3)
    train = sub.add_parser("training", help="one training step, cupy against torch")
    train.add_argument("--models", default="mlp,cnn")
    train.add_argument("--batches", default="512,4096")
    train.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    train.add_argument("--repeat", type=int, default=5)
    train.add_argument("--warmup", type=int, default=5)
    train.add_argument("--backend", default="cupy", choices=backend.BACKENDS)
    train.add_argument("--device", default="cuda", help="torch device (cuda, or cpu with --backend numpy)")
    for p in (coll, train):
        p.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = collectives(args) if args.what == "collectives" else training(args)
    if args.json and rows is not None:
        with open(args.json, "w") as f:
            json.dump({"benchmark": args.what, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
