"""Pipeline schedules measured: step time, live activations and the bubble against the published formulas,
and PyTorch's ``torch.distributed.pipelining`` (gloo) on the same model in the same invocation.

    python benchmarks/pipeline.py --repeat 3 --json build/pipeline.json

One ``mpiexec -n P`` job per P in ``--stages`` (default 2 and 4) runs, in
whole rounds repeated ``--repeat`` times so every configuration sees the
machine's slow and fast spells:

- ``compute``: the 784-1024-1024-10 MLP (float32, per-pipeline batch
  ``--batch``) cut into P stages by ``--strategy pipeline``'s balanced split,
  for each schedule (interleaved with V = 2 where the model has 2P layers)
  and M in ``--micro``; the step time (median over rounds of each round's
  median step, max over ranks), and the bytes of layer outputs each stage
  held at its peak (``stats["activation_bytes"]``) with the peak count of
  live micro-batches;
- ``sleep``: every stage's compute replaced by a fixed sleep (``--sleep-ms``
  per micro-batch forward on a rank, twice that backward, split over its V
  chunks), so P ranks on fewer cores measure the schedule alone. The
  formula counts no time for messages; a hop costs 0.05-0.2 ms here (a
  message that a rank has waited on for milliseconds arrives 50-100 us late
  on this VM even in raw MPI), so the default of 40 ms keeps the messages as
  small beside a stage's work as the formula assumes;
- in both modes the measured bubble, the idle share of a step: 1 - (a rank's
  forward and backward seconds per step, mean over ranks) / step time,
  against GPipe's and 1F1B's (P - 1) / (M + P - 1) and interleaved's
  (P - 1) / (V M + P - 1) (a bubble of (P - 1) / (V M) of the ideal time, as
  a share of the step). With compute on oversubscribed cores a rank's
  "compute" includes time it waited for a core, so only the sleep rows test
  the schedule against the formula;
- ``torch`` (P = 2, where torch is importable): the same MLP split at the same
  layer, ``ScheduleGPipe`` and ``Schedule1F1B`` with the same micro-batches,
  SGD with momentum, gloo on this host, one thread per rank like ours.

Each rank pins its BLAS (and torch) threads to ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from mpitrain.jobs import child_environment, mpiexec_command

SCHEDULES = ("gpipe", "1f1b", "interleaved")
HIDDEN = (1024, 1024)
INPUT, CLASSES = (784,), 10
TORCH_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}


def _job(batch: int, model: Any = None) -> Any:
    from mpitrain.nn import SoftmaxCrossEntropy, build_model
    from mpitrain.optim import SGD
    from mpitrain.parallel import Job

    return Job(
        model or (lambda: build_model("mlp", INPUT, CLASSES, HIDDEN)),
        lambda params, grads, allocate: SGD(params, grads, 0.01, momentum=0.9, allocate=allocate),
        SoftmaxCrossEntropy,
        sample_shape=INPUT,
        batch_size=batch,
    )


def _sleep_model(stages: int, chunks: int, forward_s: float) -> Any:
    """A model of P x V stages, each a small Linear and a layer that sleeps: ``forward_s / V`` per forward of
    a micro-batch, twice that per backward, so a rank's V chunks sleep ``forward_s`` per micro-batch."""
    from mpitrain.nn import Linear, Module, Sequential

    class Sleep(Module):
        def forward(self, x: Any) -> Any:
            time.sleep(forward_s / chunks)
            return x

        def backward(self, grad: Any) -> Any:
            time.sleep(2 * forward_s / chunks)
            return grad

    def build() -> Sequential:
        layers: list = []
        for _ in range(stages * chunks):
            layers += [Linear(16, 16), Sleep()]
        return Sequential(*layers[:-1], Linear(16, CLASSES), layers[-1])

    return build


def _time_steps(step: Any, warmup: int, steps: int, after_warmup: Any = None) -> float:
    """The median over ``steps`` timed steps (after ``warmup``, then ``after_warmup()``) of each step's
    time, max over ranks."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    for _ in range(warmup):
        step()
    if after_warmup is not None:
        after_warmup()
    times = np.zeros(steps)
    for i in range(steps):
        world.Barrier()
        began = MPI.Wtime()
        step()
        times[i] = MPI.Wtime() - began
    world.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    return float(np.median(times))


def _ours(args: argparse.Namespace, comm: Any, kind: str, micro: int, sleep: bool) -> dict | None:
    from mpitrain.parallel import Pipeline
    from mpitrain.parallel.pipeline import PipelineOptions

    stages = comm.size
    chunks = 2 if kind == "interleaved" else 1
    if sleep:
        job = _job(args.batch, _sleep_model(stages, chunks, args.sleep_ms / 1e3))
        job.sample_shape = (16,)
        split = tuple(range(2, 2 * stages * chunks, 2))
    else:
        job, split = _job(args.batch), ()
        layers = len(job.build_model().layers)
        if stages * chunks > layers:
            refused = f"{stages * chunks} chunks cannot be cut from the MLP's {layers} layers"
            return {"framework": "mpitrain", "mode": "compute", "schedule": kind, "stages": stages, "micro": micro,
                    "refused": refused}  # fmt: skip
    pipeline = Pipeline(job, comm, PipelineOptions(stages, micro, kind, chunks, split))
    pipeline.start()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, *job.sample_shape)).astype(np.float32)
    y = rng.integers(0, CLASSES, args.batch)
    fed = pipeline.shard is not None
    computing = []  # compute seconds of the warm-up, then of the timed steps
    steps, warmup = (args.sleep_steps, 1) if sleep else (args.steps, args.warmup)  # sleeps barely vary
    step_s = _time_steps(
        lambda: pipeline.step(x if fed else None, y if fed else None),
        warmup,
        steps,
        lambda: computing.append(pipeline.stats["compute_s"]),
    )
    busy = (pipeline.stats["compute_s"] - computing[0]) / steps
    stats = pipeline.stats
    activations = comm.allgather_object((stats["activation_bytes"], stats["peak_live_rank"]))
    busy_ms = 1e3 * float(np.mean(comm.allgather_object(busy)))
    pipeline.close()
    record = {"framework": "mpitrain", "mode": "sleep" if sleep else "compute", "schedule": kind, "stages": stages,
              "micro": micro, "chunks": chunks, "step_ms": step_s * 1e3,
              "activation_bytes": [sum(a) for a, _ in activations], "peak_live": [p for _, p in activations],
              "micro_bytes": [a[0] // max(1, p) if p else 0 for a, p in activations]}  # fmt: skip
    record["busy_ms"] = busy_ms  # forward + backward per step, mean over ranks
    record["bubble"] = 1 - busy_ms / record["step_ms"]  # the idle share of the step
    return record


def _torch(args: argparse.Namespace, comm: Any, kind: str, micro: int, bounds: list[int]) -> dict | None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed import pipelining

    rank, stages = comm.rank, comm.size
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(784, HIDDEN[0]), nn.ReLU(), nn.Linear(*HIDDEN), nn.ReLU()]
    layers.append(nn.Linear(HIDDEN[1], CLASSES))
    module = nn.Sequential(*layers[bounds[rank] : bounds[rank + 1]])
    stage = pipelining.PipelineStage(module, rank, stages, torch.device("cpu"), group=dist.group.WORLD)
    loss = nn.CrossEntropyLoss()
    try:
        schedule = getattr(pipelining, TORCH_SCHEDULES[kind])(stage, n_microbatches=micro, loss_fn=loss)
    except (ValueError, RuntimeError) as exc:
        return {"framework": "torch", "schedule": kind, "stages": stages, "micro": micro, "refused": str(exc)[:120]}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(args.batch, *INPUT)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, CLASSES, args.batch))

    def step() -> None:
        optimizer.zero_grad()
        if rank == 0:
            schedule.step(x)
        elif rank == stages - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        optimizer.step()

    try:
        step_s = _time_steps(step, args.warmup, args.steps)
    except (ValueError, RuntimeError) as exc:
        return {"framework": "torch", "schedule": kind, "stages": stages, "micro": micro, "refused": str(exc)[:120]}
    return {"framework": "torch", "mode": "compute", "schedule": kind, "stages": stages, "micro": micro,
            "chunks": 1, "step_ms": step_s * 1e3}  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    """Inside an ``mpiexec -n P`` job: every configuration, in rounds; one RESULT line per measurement."""
    from mpi4py import MPI

    from mpitrain import threads
    from mpitrain.comm import Communicator

    world = MPI.COMM_WORLD
    nthreads = threads.limit_threads(world.Get_size(), args.threads)
    comm = Communicator(world, checked=False, timeout=300)
    with_torch = False
    if world.Get_size() == 2 and not args.no_torch:
        from gloo import init_gloo

        with_torch = init_gloo(world, nthreads)
    bounds = None
    if with_torch:  # the same cut as ours
        from mpitrain.parallel import Pipeline
        from mpitrain.parallel.pipeline import PipelineOptions

        probe = Pipeline(_job(args.batch), comm, PipelineOptions(2, 1))
        bounds = probe.bounds
        probe.close()
    micros = [int(m) for m in args.micro.split(",")]
    for round_index in range(args.repeat):
        for micro in micros:
            for kind in SCHEDULES:
                for record in (_ours(args, comm, kind, micro, False), _ours(args, comm, kind, micro, True)):
                    if record is not None and comm.rank == 0:
                        print("RESULT " + json.dumps({**record, "round": round_index}), flush=True)
                if with_torch and kind in TORCH_SCHEDULES:
                    record = _torch(args, comm, kind, micro, bounds)
                    if comm.rank == 0:
                        print("RESULT " + json.dumps({**record, "round": round_index}), flush=True)


def driver(args: argparse.Namespace) -> int:
    """One worker job per P; the table, the targets, and the JSON."""
    records = []
    for stages in [int(p) for p in args.stages.split(",")]:
        flags = ["--batch", str(args.batch), "--micro", args.micro, "--steps", str(args.steps), "--warmup",
                 str(args.warmup), "--repeat", str(args.repeat), "--sleep-ms", str(args.sleep_ms),
                 "--sleep-steps", str(args.sleep_steps),
                 "--threads", str(args.threads)] + (["--no-torch"] if args.no_torch else [])  # fmt: skip
        command = mpiexec_command(stages, sys.executable, os.path.abspath(__file__), "--worker", *flags)
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, check=False, env=child_environment()
        )
        found = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not found:
            print(f"# the job at P = {stages} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            return 1
        records += found
    rows = summarise(records)
    print_table(rows, args)
    missed = targets(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "runs": records, "targets": missed}, f, indent=1)
    return 0


def formula(kind: str, stages: int, micro: int, chunks: int) -> float:
    """The published bubble share of a step (equal stages)."""
    return (stages - 1) / ((chunks if kind == "interleaved" else 1) * micro + stages - 1)


def summarise(records: list[dict]) -> list[dict]:
    """Per (framework, mode, schedule, P, M): the median step time over rounds with its range."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(
            (r["framework"], r.get("mode", "compute"), r["schedule"], r["stages"], r["micro"]), []
        ).append(r)
    rows = []
    for (framework, mode, kind, stages, micro), runs in groups.items():
        if "refused" in runs[0]:
            rows.append({**runs[0], "mode": mode, "step_ms": float("nan"), "runs": 0})
            continue
        steps = sorted(r["step_ms"] for r in runs)
        median = runs[[r["step_ms"] for r in runs].index(steps[(len(steps) - 1) // 2])]
        row = {
            **median,
            "step_ms": float(np.median(steps)),
            "low_ms": steps[0],
            "high_ms": steps[-1],
            "runs": len(runs),
        }
        if framework == "mpitrain":
            row["bubble"] = float(np.median([r["bubble"] for r in runs]))
            row["formula"] = formula(kind, stages, micro, row["chunks"])
        rows.append(row)
    order = {"compute": 0, "sleep": 1}
    return sorted(rows, key=lambda r: (order[r["mode"]], r["stages"], r["micro"], r["schedule"], r["framework"]))


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"# pipeline schedules: MLP 784-1024-1024-10 float32, batch {args.batch} per pipeline, {args.threads} "
          f"thread(s) per rank; sleep stages: {args.sleep_ms} ms forward / {2 * args.sleep_ms} ms backward per "
          f"micro-batch per rank; medians of {args.repeat} round(s) of {args.steps} steps "
          f"({args.sleep_steps} with sleep stages)")  # fmt: skip
    print(f"# {'mode':>7} {'framework':>9} {'schedule':>11} {'P':>2} {'M':>2} {'V':>2} {'step_ms':>8} "
          f"{'range_ms':>15} {'vs_torch':>8} {'bubble':>7} {'formula':>7} {'off%':>6} {'live/stage':>12} "
          f"{'act_KiB/stage':>22}")  # fmt: skip
    torch = {
        (r["schedule"], r["stages"], r["micro"], r["mode"]): r["step_ms"] for r in rows if r["framework"] == "torch"
    }
    for r in rows:
        if "refused" in r:
            print(f"  {r['mode']:>7} {r['framework']:>9} {r['schedule']:>11} {r['stages']:>2} {r['micro']:>2}   - "
                  f"refused: {r['refused']}")  # fmt: skip
            continue
        versus = r["step_ms"] / torch.get((r["schedule"], r["stages"], r["micro"], r["mode"]), float("nan"))
        bubble = f"{r['bubble']:>7.3f} {r['formula']:>7.3f} {100 * (r['bubble'] / r['formula'] - 1):>6.1f}" if (
            "bubble" in r and r["formula"]) else f"{'':>7} {'':>7} {'':>6}"  # fmt: skip
        live = ",".join(map(str, r.get("peak_live", []))) or "-"
        held = ",".join(f"{b / 1024:.0f}" for b in r.get("activation_bytes", [])) or "-"
        print(f"  {r['mode']:>7} {r['framework']:>9} {r['schedule']:>11} {r['stages']:>2} {r['micro']:>2} "
              f"{r['chunks']:>2} {r['step_ms']:>8.2f} {r.get('low_ms', 0):>7.2f}-{r.get('high_ms', 0):<7.2f} "
              f"{versus:>8.2f} {bubble} {live:>12} {held:>22}")  # fmt: skip


def targets(rows: list[dict]) -> list[str]:
    """Print the issue's targets with the measured figures; return the missed ones."""
    missed, lines = [], []
    for r in rows:
        if r["mode"] == "sleep" and r["stages"] == 4 and r["micro"] == 8 and "bubble" in r:
            off = abs(r["bubble"] / r["formula"] - 1)
            ok = off <= 0.10
            lines.append(f"#   bubble {r['schedule']} P=4 M=8 within 10% of the formula: {100 * off:.1f}% off "
                         f"{'ok' if ok else 'MISSED'}")  # fmt: skip
            missed += [] if ok else [f"bubble {r['schedule']}"]
    ours = {(r["micro"]): r for r in rows if r["framework"] == "mpitrain" and r["mode"] == "compute"
            and r["schedule"] == "1f1b" and r["stages"] == 2}  # fmt: skip
    for r in rows:
        if r["framework"] == "torch" and r["schedule"] == "1f1b" and r["micro"] in ours and "refused" not in r:
            mine = ours[r["micro"]]
            ratio = mine["step_ms"] / r["step_ms"]
            ok = ratio <= 1.0
            lines.append(f"#   1f1b P=2 M={r['micro']} step no slower than torch Schedule1F1B: {mine['step_ms']:.1f} "
                         f"vs {r['step_ms']:.1f} ms = {ratio:.2f}x {'ok' if ok else 'MISSED'}")  # fmt: skip
            missed += [] if ok else [f"torch 1f1b M={r['micro']}"]
    for mine in ours.values():
        worth = mine["stages"] * mine["micro_bytes"][0]
        ok = mine["activation_bytes"][0] <= worth
        lines.append(f"#   1f1b P=2 M={mine['micro']} stage 0 holds <= P micro-batches: {mine['peak_live'][0]} live, "
                     f"{mine['activation_bytes'][0] / 1024:.0f} KiB {'ok' if ok else 'MISSED'}")  # fmt: skip
        missed += [] if ok else [f"activations M={mine['micro']}"]
    print("# targets:")
    print("\n".join(lines))
    return missed


def main(argv: list[str] | None = None) -> int:
    """Parse options; ``--worker`` runs inside an MPI job, otherwise this is the driver."""
    parser = argparse.ArgumentParser(prog="benchmarks/pipeline.py", description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default="2,4", help="pipeline sizes P, one mpiexec job each")
    parser.add_argument("--micro", default="1,4,8", help="micro-batch counts M")
    parser.add_argument("--batch", type=int, default=256, help="per-pipeline batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every configuration, interleaved")
    parser.add_argument("--sleep-ms", type=float, default=40.0, help="sleep stages: forward ms per micro-batch")
    parser.add_argument("--sleep-steps", type=int, default=4, help="timed steps of sleep stages (after 1 untimed)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS / torch threads per rank")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.repeat, args.steps, args.sleep_steps) < 1:
        parser.error("--repeat, --steps and --sleep-steps must be at least 1")
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
