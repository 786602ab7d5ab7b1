"""What ``--timeline`` costs a training run: the same job with and without it, interleaved.

    python benchmarks/timeline.py --ranks 2 --repeat 5 --json build/timeline.json

Each round runs one ``mpiexec -n RANKS python -m mpitrain train`` job without
a timeline and one recording every step (``--timeline-steps 0:``), in
alternating order, for each model (the small digits MLP, where a step is
shortest and a span's fixed cost shows most, and an MLP on synthetic
MNIST-shaped data). Reported: the median over rounds of each job's step
time (the global batch over its median epoch samples/s from ``--metrics``,
which counts training time only, the first epoch left out as warm-up), the
range, the overhead
(with / without - 1), and the trace's size. The spans behind the metrics'
per-phase breakdown are always on; ``--spans`` also times one ``SPANS.add``
in this process, recording and not: what they add to every step (6-8 a
step), which the job-to-job noise of the end-to-end figures can hide.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import timeit

import numpy as np

from mpitrain.jobs import child_environment, mpiexec_command

BATCH = 32  # the train command's default per-rank batch
MODELS = {
    "digits-mlp": ["--dataset", "digits", "--epochs", "6"],
    "synthetic-mlp": ["--dataset", "synthetic", "--synthetic-samples", "8192", "--hidden", "256,256", "--epochs", "4"],
}


def run_job(args: argparse.Namespace, model: str, timeline: bool) -> dict:
    """One training job: its mean step time and, with a timeline, the trace's size."""
    with tempfile.TemporaryDirectory() as folder:
        metrics, trace = os.path.join(folder, "m.jsonl"), os.path.join(folder, "t.json")
        train = ["-m", "mpitrain", "train", "--no-progress", "--metrics", metrics, *MODELS[model]]
        if timeline:
            train += ["--timeline", trace, "--timeline-steps", "0:"]
        command = mpiexec_command(args.ranks, sys.executable, *train)
        done = subprocess.run(command, capture_output=True, text=True, env=child_environment(600), check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        with open(metrics) as f:
            records = [json.loads(line) for line in f]
        size = os.path.getsize(trace) if timeline else 0
        speed = float(np.median([r["samples_per_s"] for r in records[1:] or records]))  # training time only
        return {"model": model, "timeline": timeline, "step_s": BATCH * args.ranks / speed, "trace_bytes": size}


def span_cost(recording: bool, repeats: int = 5, number: int = 100_000) -> float:
    """Seconds of one ``SPANS.add``, recording or not, best of ``repeats``."""
    from mpitrain.timeline import SPANS, clock

    start, best = clock(), float("inf")
    for _ in range(repeats):
        SPANS.reset()
        SPANS.recording = recording
        best = min(best, timeit.timeit(lambda: SPANS.add("forward", start, micro=0), number=number))
    SPANS.reset()
    return best / number


def main(argv: list[str] | None = None) -> int:
    """Run the rounds, print the table, write JSON; exit status 0."""
    parser = argparse.ArgumentParser(prog="benchmarks/timeline.py", description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="rounds (each: both jobs per model)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--spans", action="store_true", help="also time one SPANS.add here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    models = args.models.split(",")
    rows: list[dict] = []
    for round_ in range(args.repeat):
        for model in models:
            for timeline in (round_ % 2 == 1, round_ % 2 == 0):  # alternate which goes first
                rows.append(run_job(args, model, timeline) | {"round": round_})
    print(f"# --timeline overhead: {args.ranks} rank(s), {args.repeat} rounds, medians (ranges) of step time")
    print(f"# {'model':<15} {'without(ms)':>20} {'with(ms)':>20} {'overhead':>9} {'trace(MB)':>9}")
    summary = []
    for model in models:
        off = [r["step_s"] * 1e3 for r in rows if r["model"] == model and not r["timeline"]]
        on = [r["step_s"] * 1e3 for r in rows if r["model"] == model and r["timeline"]]
        size = np.median([r["trace_bytes"] for r in rows if r["model"] == model and r["timeline"]]) / 1e6
        overhead = np.median(on) / np.median(off) - 1
        summary.append({"model": model, "without_ms": float(np.median(off)), "with_ms": float(np.median(on)),
                        "overhead": float(overhead), "trace_mb": float(size)})  # fmt: skip
        print(f"  {model:<15} {np.median(off):>8.3f} ({min(off):.3f}-{max(off):.3f}) "
              f"{np.median(on):>8.3f} ({min(on):.3f}-{max(on):.3f}) {overhead:>+8.1%} {size:>9.2f}")  # fmt: skip
    if args.spans:
        off, on = span_cost(False), span_cost(True)
        print(f"# one SPANS.add: {off * 1e6:.2f} us (always on, for the metrics), {on * 1e6:.2f} us while recording;"
              f" a data-parallel step makes 6-8")  # fmt: skip
        summary.append({"span_add_us": off * 1e6, "span_add_recording_us": on * 1e6})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": args.ranks, "rows": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
