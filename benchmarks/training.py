"""Training throughput: mpitrain against PyTorch DDP (gloo), side by side in one invocation.

    python benchmarks/training.py --ranks 1,2,4 --steps 30 --json build/training.json --plot build/training.png

The driver starts one ``mpiexec -n N`` job per (framework, model, ranks),
interleaved, each a worker of this same script; workers time ``--steps``
steps after ``--warmup`` on synthetic MNIST-shaped data (per-rank batch
128, float32) and report samples/s (global samples over the slowest rank's
time) and, for mpitrain, the mean per-step breakdown over ranks: forward,
backward, exposed all-reduce wait and optimizer. Each rank uses ``--threads``
BLAS threads (default 1), torch too (torch.set_num_threads). Timings on
a shared machine move 20-30% from one job to the next: ``--repeat R`` runs
every job R times, in whole interleaved rounds, and reports each one's
median run and the range of its runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
from gloo import init_gloo

from mpitrain.jobs import child_environment, mpiexec_command

MODELS = {"mlp": (1024, 1024), "mlp-small": (256, 256), "cnn": (64,)}
INPUT = (1, 28, 28)
CLASSES = 10
FRAMEWORKS = ("mpitrain", "sharded", "ddp", "numpy", "numpy+mpi")
PLAIN = ("numpy", "numpy+mpi")  # the plain loops of benchmarks/plain.py: MLPs only; numpy at 1 rank, +mpi at 2+


def worker(args: argparse.Namespace) -> None:
    """Run inside an MPI job: time one framework on one model; rank 0 prints one JSON line."""
    from mpi4py import MPI

    from mpitrain import threads

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    nthreads = threads.limit_threads(node.Get_size(), args.threads)
    node.Free()
    rng = np.random.default_rng([args.seed, world.Get_rank()])
    x = rng.standard_normal((args.batch, *INPUT), dtype=np.float32)
    y = rng.integers(0, CLASSES, args.batch)
    make = {"ddp": _ddp_step, "numpy": _plain_step, "numpy+mpi": _plain_step}.get(args.framework, _mpitrain_step)
    step, breakdown, reset = make(args, world, nthreads, x, y)
    for _ in range(args.warmup):
        step()
    reset()
    world.Barrier()
    start = MPI.Wtime()
    for _ in range(args.steps):
        step()
    elapsed = world.allreduce(MPI.Wtime() - start, op=MPI.MAX)
    parts = {k: world.allreduce(v, op=MPI.SUM) / world.Get_size() for k, v in breakdown().items()}
    if world.Get_rank() == 0:
        record = {
            "framework": args.framework, "model": args.model, "ranks": world.Get_size(), "threads": nthreads,
            "samples_per_s": args.steps * args.batch * world.Get_size() / elapsed,
            "step_ms": elapsed / args.steps * 1e3, **{f"{k}_ms": v * 1e3 for k, v in parts.items()},
        }  # fmt: skip
        print("RESULT " + json.dumps(record), flush=True)


def _mpitrain_step(args, world, nthreads, x, y):
    """What ``python -m mpitrain train`` runs per step: the allreduce strategy with its default checks
    (replica digest every 100 steps, NaN verdict, a watchdog), each step watched as the loop does."""
    from mpitrain.comm import Communicator
    from mpitrain.nn import SoftmaxCrossEntropy, build_model
    from mpitrain.optim import SGD
    from mpitrain.parallel import AllReduce, Job
    from mpitrain.parallel.data_parallel import AllReduceOptions

    comm = Communicator(world, checked=False, timeout=300)  # the CLI's defaults
    job = Job(
        lambda: build_model(args.model.split("-")[0], INPUT, CLASSES, MODELS[args.model]),
        lambda params, grads, allocate: SGD(params, grads, 0.01, momentum=0.9, allocate=allocate),
        SoftmaxCrossEntropy,
    )
    options = AllReduceOptions(bucket_mb=args.bucket_mb, overlap=not args.no_overlap, micro_batch=args.micro_batch,
                               shard_optimizer=args.framework == "sharded")  # fmt: skip
    strategy = AllReduce(job, comm, options)
    strategy.start()
    engine = strategy.engine

    def step() -> None:
        with comm.watch("training step"):
            strategy.step(x, y)

    def breakdown() -> dict[str, float]:
        steps = max(engine.steps, 1)
        return {phase: seconds / steps for phase, seconds in engine.timings.items()}

    def reset() -> None:
        engine.timings = dict.fromkeys(engine.timings, 0.0)
        engine.steps = 0

    return step, breakdown, reset


def _plain_step(args, world, nthreads, x, y):
    from plain import PlainMLP

    model = PlainMLP([784, *MODELS[args.model], CLASSES])
    comm = world if args.framework == "numpy+mpi" else None
    return lambda: model.step(x, y, comm), dict, lambda: None


def _ddp_step(args, world, nthreads, x, y):
    import torch
    from torch import nn

    init_gloo(world, nthreads)
    torch.manual_seed(0)
    if args.model.startswith("mlp"):
        a, b = MODELS[args.model]
        layers = [nn.Flatten(), nn.Linear(784, a), nn.ReLU(), nn.Linear(a, b), nn.ReLU(), nn.Linear(b, 10)]
    else:
        # The same layer order as mpitrain's cnn: pooling before ReLU (the same function, less ReLU work).
        layers = [nn.Conv2d(1, 16, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1)]
        layers += [nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10)]
    model = nn.parallel.DistributedDataParallel(nn.Sequential(*layers))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model(tx), ty).backward()
        optimizer.step()

    return step, dict, lambda: None


def driver(args: argparse.Namespace) -> int:
    """Start the worker jobs, print the table, write JSON and a plot; returns the exit status."""
    frameworks = args.frameworks.split(",")
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown:
        print(f"# unknown frameworks {sorted(unknown)}; expected some of {', '.join(FRAMEWORKS)}")
        return 2
    try:
        import torch  # noqa: F401
    except ImportError:
        if "ddp" in frameworks:
            print("# torch is not importable: PyTorch DDP is left out (pip install torch==2.13.0)")
            frameworks.remove("ddp")
    ranks = [int(r) for r in args.ranks.split(",")]
    runs: dict[tuple[str, str, int], list[dict]] = {}
    for _ in range(args.repeat):  # whole rounds, so every configuration sees the machine's slow and fast spells
        for model in args.models.split(","):
            for n in ranks:
                for framework in frameworks:
                    if framework in PLAIN and (model == "cnn" or (framework == "numpy") != (n == 1)):
                        continue
                    trees = [None]
                    if args.baseline_tree and framework in ("mpitrain", "sharded") and model in ("mlp", "cnn"):
                        trees.append(args.baseline_tree)  # the same job on the other code, right after
                    for tree in trees:
                        record = run_worker(args, framework, model, n, tree)
                        if record is None:
                            return 1
                        runs.setdefault((record["framework"], model, n), []).append(record)
    records = [median_record(group) for group in runs.values()]
    print_table(records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.plot:
        plot(records, args.plot)
    return 0


def run_worker(args: argparse.Namespace, framework: str, model: str, n: int, tree: str | None = None) -> dict | None:
    """One ``mpiexec -n n`` job of this script as a worker (with ``tree``: that source tree's own worker
    and package, its record labelled ``FRAMEWORK@base``); its record, or None (reported) when it failed."""
    options = {"framework": framework, "model": model, "steps": args.steps, "warmup": args.warmup,
               "batch": args.batch, "threads": args.threads, "bucket-mb": args.bucket_mb,
               "micro-batch": args.micro_batch}  # fmt: skip
    flags = [part for k, v in options.items() for part in (f"--{k}", str(v))]
    flags += ["--no-overlap"] if args.no_overlap else []
    script, env = os.path.abspath(__file__), child_environment()
    if tree is not None:
        script = os.path.join(tree, "benchmarks", "training.py")
        env["PYTHONPATH"] = os.path.abspath(tree) + os.pathsep + env.get("PYTHONPATH", "")
    command = mpiexec_command(n, sys.executable, script, "--worker", *flags)
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"# {framework} {model} at {n} rank(s) failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        return None
    record = json.loads(lines[0][7:])
    if tree is not None:
        record["framework"] += "@base"
    return record


def median_record(group: list[dict]) -> dict:
    """The run with the median samples/s (the lower middle for an even count), with every run's samples/s."""
    ordered = sorted(group, key=lambda r: r["samples_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "runs_samples_per_s": [r["samples_per_s"] for r in group]}


def print_table(records: list[dict]) -> None:
    """Samples/s, scaling, ratios to DDP and to the plain loop (numpy at 1 rank, numpy+mpi at more), the
    mpitrain step breakdown (of the median run), the number of runs and their range (max - min) in percent
    of the median."""
    base = {(r["framework"], r["model"]): r["samples_per_s"] for r in records if r["ranks"] == 1}
    ddp = {(r["model"], r["ranks"]): r["samples_per_s"] for r in records if r["framework"] == "ddp"}
    plain = {(r["model"], r["ranks"]): r["samples_per_s"] for r in records if r["framework"] in PLAIN}
    nan = float("nan")
    print(
        f"# {'framework':>13} {'model':>9} {'ranks':>5} {'thr':>3} {'samples/s':>10} {'scaling':>7} {'eff':>5} "
        f"{'vs_ddp':>6} {'vs_plain':>8} {'step_ms':>8} {'fwd_ms':>7} {'bwd_ms':>7} {'wait_ms':>7} {'opt_ms':>7} "
        f"{'wait%':>5} {'runs':>4} {'range%':>6}"
    )
    for r in records:
        key = (r["model"], r["ranks"])
        speedup = r["samples_per_s"] / base.get((r["framework"], r["model"]), nan)
        versus = r["samples_per_s"] / ddp.get(key, nan)
        over_plain = r["samples_per_s"] / plain.get(key, nan)
        parts = [r.get(f"{k}_ms", nan) for k in ("forward", "backward", "allreduce_wait", "optimizer")]
        runs = r.get("runs_samples_per_s", [r["samples_per_s"]])
        spread = 100 * (max(runs) - min(runs)) / r["samples_per_s"]
        print(
            f"  {r['framework']:>13} {r['model']:>9} {r['ranks']:>5} {r['threads']:>3} {r['samples_per_s']:>10.0f} "
            f"{speedup:>7.2f} {speedup / r['ranks']:>5.2f} {versus:>6.2f} {over_plain:>8.2f} {r['step_ms']:>8.2f} "
            + " ".join(f"{v:>7.2f}" for v in parts)
            + f" {100 * parts[2] / r['step_ms']:>5.1f} {len(runs):>4} {spread:>6.1f}"
        )


def plot(records: list[dict], path: str) -> None:
    """samples/s against ranks, one line per framework and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({(r["framework"], r["model"]) for r in records}):
        mine = [r for r in records if (r["framework"], r["model"]) == key]
        ax.plot([r["ranks"] for r in mine], [r["samples_per_s"] for r in mine], marker="o", label=" ".join(key))
    ax.set_xlabel("ranks")
    ax.set_ylabel("samples/s")
    ax.set_title("training throughput, per-rank batch 128, float32")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    """Parse options; ``--worker`` runs inside an MPI job, otherwise this is the driver."""
    parser = argparse.ArgumentParser(prog="benchmarks/training.py", description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2,4", help="rank counts, e.g. 1,2,4")
    parser.add_argument("--models", default="mlp,mlp-small,cnn",
                        help="mlp (784-1024-1024-10), mlp-small (784-256-256-10), cnn")  # fmt: skip
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=128, help="per-rank batch")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/torch threads per rank")
    parser.add_argument("--bucket-mb", type=float, default=1.0, help="mpitrain gradient bucket size")
    parser.add_argument("--no-overlap", action="store_true", help="mpitrain: all-reduce after backward")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                        help="mpitrain (all-reduce), sharded (mpitrain --shard-optimizer), ddp, and the plain loops "
                             "numpy (1 rank) and numpy+mpi (2+ ranks: one in-place Allreduce per step)")  # fmt: skip
    parser.add_argument("--micro-batch", type=int, default=0, help="mpitrain: samples per forward/backward (0: auto)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per worker job")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every job, interleaved; the table shows each one's median run")  # fmt: skip
    parser.add_argument("--baseline-tree", default=None, metavar="DIR",
                        help="also time mpitrain and sharded (mlp, cnn) from another source tree, e.g. a git "
                             "worktree of an earlier commit, interleaved; rows FRAMEWORK@base")  # fmt: skip
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework", default="mpitrain", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"argument --repeat: expected an integer >= 1, got {args.repeat}")
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
