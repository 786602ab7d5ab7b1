"""What ``--timeline`` costs a training run, measured inside each job: epochs recorded against epochs not.

    python benchmarks/timeline.py --ranks 2 --repeat 5 --json build/timeline.json

Job-to-job noise on a shared machine (10-20% here) hides a cost of a few
percent, so each ``mpiexec -n RANKS python -m mpitrain train --timeline``
job records only half of its epochs (``--timeline-steps`` over the first
half in one job, the second half in the next, so drift during a job
cancels), and the cost is read from its own per-epoch samples/s in
``--metrics`` (training time only): the median over recorded epochs against
the median over the others, the first epoch and the epoch where the window
changes left out. Per model (the small digits MLP, where a step is shortest
and a span's fixed cost shows most, and an MLP on synthetic MNIST-shaped
data): the median over jobs of that ratio, its range, and the trace's size
per recorded step. ``--spans`` also times one ``SPANS.add`` in this process,
recording and not (6-8 a step; the ones not recording are always on, for
the metrics' per-phase breakdown).
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

MODELS = {
    "digits-mlp": ["--dataset", "digits", "--epochs", "12"],
    "synthetic-mlp": ["--dataset", "synthetic", "--synthetic-samples", "4096", "--hidden", "256,256", "--epochs", "8"],
}


def run_job(args: argparse.Namespace, model: str, window: tuple[int, int] | None) -> tuple[list[dict], int]:
    """One training job, recording steps ``window`` (or none): its metrics records and trace size."""
    with tempfile.TemporaryDirectory() as folder:
        metrics, trace = os.path.join(folder, "m.jsonl"), os.path.join(folder, "t.json")
        train = ["-m", "mpitrain", "train", "--no-progress", "--metrics", metrics, *MODELS[model]]
        if window is not None:
            train += ["--timeline", trace, "--timeline-steps", f"{window[0]}:{window[1]}"]
        command = mpiexec_command(args.ranks, sys.executable, *train)
        done = subprocess.run(command, capture_output=True, text=True, env=child_environment(600), check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        with open(metrics) as f:
            records = [json.loads(line) for line in f]
        return records, os.path.getsize(trace) if window is not None else 0


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
    """Run the jobs, print the table, write JSON; exit status 0."""
    parser = argparse.ArgumentParser(prog="benchmarks/timeline.py", description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="job pairs per model (first half, second half)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--spans", action="store_true", help="also time one SPANS.add here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    print(f"# --timeline overhead: {args.ranks} rank(s), {args.repeat} job pairs per model, inside each job")
    print(f"# {'model':<15} {'steps/epoch':>11} {'overhead: median (range)':>28} {'KB/step':>8}")
    summary = []
    for model in args.models.split(","):
        calibration, _ = run_job(args, model, None)
        steps = calibration[0]["steps"]  # the allreduce strategy's count after the first epoch
        epochs = len(calibration)
        half = epochs // 2
        ratios, sizes = [], []
        for _ in range(args.repeat):
            for first in (True, False):
                recorded = range(1, half) if first else range(half + 1, epochs)  # epoch indices, 0-based
                window = (0, half * steps) if first else (half * steps, epochs * steps)
                records, size = run_job(args, model, window)
                speed = [r["samples_per_s"] for r in records]
                others = range(half + 1, epochs) if first else range(1, half)
                ratios.append(np.median([speed[i] for i in others]) / np.median([speed[i] for i in recorded]) - 1)
                sizes.append(size / (window[1] - window[0]))
        overhead = float(np.median(ratios))
        summary.append({"model": model, "steps_per_epoch": steps, "overhead": overhead, "ratios": ratios,
                        "bytes_per_step": float(np.median(sizes))})  # fmt: skip
        span = f"{overhead:+.1%} ({min(ratios):+.1%} to {max(ratios):+.1%})"
        print(f"  {model:<15} {steps:>11} {span:>28} {np.median(sizes) / 1e3:>8.1f}")
    if args.spans:
        off, on = span_cost(False), span_cost(True)
        print(f"# one SPANS.add: {off * 1e6:.2f} us (always on, for the metrics), {on * 1e6:.2f} us while recording;"
              f" a data-parallel step makes 6-8")  # fmt: skip
        summary.append({"span_add_us": off * 1e6, "span_add_recording_us": on * 1e6})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": args.ranks, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
