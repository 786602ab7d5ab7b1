"""Every training strategy side by side, without and with stragglers, in one invocation.

    python benchmarks/strategies.py --ranks 4 --repeat 2 --json build/strategies.json --plot build/strategies.png

For each data set (digits, and an MLP on synthetic MNIST-shaped data), each
scenario (no straggler; rank 1 slowed 2x for the whole run, ``slow:1:2``;
every worker pausing at random, ``pause:0.1:5``: probability 0.1 per step,
5 of its step times) and each strategy, one ``mpiexec -n RANKS python -m
mpitrain train`` job, the strategies interleaved inside each scenario and
whole rounds repeated ``--repeat`` times. Parameter servers run with one
server, so RANKS - 1 workers. Reported per job from its ``--metrics``
records: wall time to the accuracy target (or the best accuracy reached),
the final accuracy, samples/s (median over epochs), bytes rank 0 sent per
step of its own (``Communicator.sent_bytes``: messages exactly, collectives
by their bandwidth-optimal volume; for parameter servers rank 0 is a
worker): ``B/step`` inside the training steps, ``B/all`` with the start and
each epoch end's synchronisation too (the consensus average of gossip and
local SGD, a parameter server's broadcast), per step; the share of rank 0's epoch time spent waiting on communication,
and for gossip and local SGD the consensus distance at the end; medians
over the repeats with their ranges, and each strategy's samples/s relative
to its own straggler-free run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from mpitrain.jobs import child_environment, mpiexec_command

STRATEGIES = {
    "allreduce": [],
    "ps-sync": [],
    "ps-ssp": ["--staleness", "4"],
    "ps-async": [],
    "gossip": ["--topology", "ring"],
    "local-sgd": ["--sync-every", "8"],
}
SCENARIOS = {"none": None, "slow": "slow:1:2", "pauses": "pause:0.1:5"}
DATASETS = {
    "digits": ["--dataset", "digits"],
    "synthetic": ["--dataset", "synthetic", "--synthetic-samples", "8192", "--hidden", "256,256", "--epochs", "8"],
}
TARGET = 0.95


def run_job(args: argparse.Namespace, dataset: str, scenario: str, strategy: str) -> dict:
    """One training job; its per-epoch records and the figures drawn from them."""
    with tempfile.TemporaryDirectory() as folder:
        metrics = os.path.join(folder, "metrics.jsonl")
        train = ["-m", "mpitrain", "train", "--no-progress", "--metrics", metrics, "--strategy", strategy]
        command = mpiexec_command(args.ranks, sys.executable, *train, *DATASETS[dataset], *STRATEGIES[strategy])
        environment = child_environment(args.timeout)
        if SCENARIOS[scenario]:
            environment["MPITRAIN_FAULT"] = SCENARIOS[scenario]
        began = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=args.timeout + 30)
        if done.returncode != 0:
            raise RuntimeError(f"{dataset}/{scenario}/{strategy} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        with open(metrics) as lines:
            records = [json.loads(line) for line in lines]
    wall = np.cumsum([r["time_s"] for r in records])
    accuracy = [r["test_acc"] for r in records]
    reached = next((float(t) for t, a in zip(wall, accuracy, strict=True) if a >= TARGET), None)
    last = records[-1]
    return {
        "dataset": dataset,
        "scenario": scenario,
        "strategy": strategy,
        "job_s": time.monotonic() - began,
        "curve": [[float(t), a] for t, a in zip(wall, accuracy, strict=True)],
        "time_to_target_s": reached,
        "best_acc": max(accuracy),
        "final_acc": accuracy[-1],
        "samples_per_s": float(np.median([r["samples_per_s"] for r in records])),
        "bytes_per_step": float(np.mean([r["sent_per_step"] for r in records])),
        "bytes_per_step_all": last["sent_bytes"] / max(1, last["steps"]),
        "wait_fraction": last["wait_s"] / float(wall[-1]),
        "consensus_distance": last.get("consensus_distance"),
    }


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (dataset, scenario, strategy): medians over the repeats and the samples/s range."""
    rows = []
    keys = sorted({(r["dataset"], r["scenario"], r["strategy"]) for r in runs}, key=_order)
    for key in keys:
        group = [r for r in runs if (r["dataset"], r["scenario"], r["strategy"]) == key]
        speeds = [r["samples_per_s"] for r in group]
        median_run = sorted(group, key=lambda r: r["samples_per_s"])[len(group) // 2]
        reached = [r["time_to_target_s"] for r in group if r["time_to_target_s"] is not None]
        row = {
            "dataset": key[0],
            "scenario": key[1],
            "strategy": key[2],
            "runs": len(group),
            "samples_per_s": float(np.median(speeds)),
            "samples_per_s_range": [min(speeds), max(speeds)],
            "time_to_target_s": float(np.median(reached)) if len(reached) == len(group) else None,
            "best_acc": float(np.median([r["best_acc"] for r in group])),
            "final_acc": float(np.median([r["final_acc"] for r in group])),
            "bytes_per_step": float(np.median([r["bytes_per_step"] for r in group])),
            "bytes_per_step_all": float(np.median([r["bytes_per_step_all"] for r in group])),
            "wait_fraction": float(np.median([r["wait_fraction"] for r in group])),
            "consensus_distance": median_run["consensus_distance"],
            "curve": median_run["curve"],
        }
        rows.append(row)
    for row in rows:
        base = next(
            r for r in rows if (r["dataset"], r["strategy"], r["scenario"]) == (row["dataset"], row["strategy"], "none")
        )
        row["vs_no_straggler"] = row["samples_per_s"] / base["samples_per_s"]
    return rows


def _order(key: tuple[str, str, str]) -> tuple[int, int, int]:
    return list(DATASETS).index(key[0]), list(SCENARIOS).index(key[1]), list(STRATEGIES).index(key[2])


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"# strategies at {args.ranks} ranks (parameter servers: {args.ranks - 1} workers + 1 server), "
        f"{args.repeat} interleaved run(s) each; medians (samples/s range); target {TARGET:.0%}"
    )
    head = (
        f"{'data':>9} {'scenario':>8} {'strategy':>10} {'samples/s':>10} {'range':>15} {'vs none':>7} "
        f"{'to 95% s':>8} {'best':>6} {'final':>6} {'B/step':>9} {'B/all':>9} {'wait':>5} {'consensus':>9}"
    )
    print("#" + head[1:])
    for r in rows:
        low, high = r["samples_per_s_range"]
        reach = f"{r['time_to_target_s']:.2f}" if r["time_to_target_s"] is not None else "-"
        distance = f"{r['consensus_distance']:.3g}" if r["consensus_distance"] is not None else "-"
        print(
            f"{r['dataset']:>9} {r['scenario']:>8} {r['strategy']:>10} {r['samples_per_s']:>10,.0f} "
            f"{f'{low:,.0f}-{high:,.0f}':>15} {r['vs_no_straggler']:>7.2f} {reach:>8} {r['best_acc']:>6.3f} "
            f"{r['final_acc']:>6.3f} {r['bytes_per_step']:>9,.0f} "
            f"{r['bytes_per_step_all']:>9,.0f} {r['wait_fraction']:>5.0%} {distance:>9}"
        )
    if any(r["dataset"] == "digits" for r in rows):
        print("# targets (digits):")
        for line in targets(rows):
            print(f"#   {line}")


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, each with its measured figure and whether it is met."""

    def get(strategy: str, scenario: str, dataset: str = "digits") -> dict:
        return next(r for r in rows if (r["dataset"], r["scenario"], r["strategy"]) == (dataset, scenario, strategy))

    lines = []
    for name in STRATEGIES:
        need = 0.93 if name in ("ps-async", "gossip") else 0.95
        best = get(name, "none")["best_acc"]
        lines.append(
            f"{name} reaches {need:.0%} without a straggler: best {best:.3f} {'ok' if best >= need else 'MISSED'}"
        )
    kept = get("ps-async", "slow")["vs_no_straggler"]
    lines.append(
        f"ps-async keeps >= 75% of its samples/s with a 2x straggler: {kept:.0%} {'ok' if kept >= 0.75 else 'MISSED'}"
    )
    for name in ("allreduce", "ps-sync", "ps-ssp"):
        lines.append(f"{name} with a 2x straggler: {get(name, 'slow')['vs_no_straggler']:.0%} of its own samples/s")
    ssp = get("ps-ssp", "pauses")["samples_per_s"] / get("ps-async", "pauses")["samples_per_s"]
    lines.append(
        f"ps-ssp (K=4) under pauses >= 85% of ps-async's samples/s: {ssp:.0%} {'ok' if ssp >= 0.85 else 'MISSED'}"
    )
    for name in ("allreduce", "ps-sync"):
        kept = get(name, "pauses")["vs_no_straggler"]
        lines.append(f"{name} under pauses < 60% of its own samples/s: {kept:.0%} {'ok' if kept < 0.6 else 'MISSED'}")
    share = get("local-sgd", "none")["bytes_per_step"] / get("allreduce", "none")["bytes_per_step"]
    lines.append(
        f"local-sgd (H=8) sends <= 1/8 of allreduce's bytes per step: {share:.3f} "
        f"{'ok' if share <= 0.125 else 'MISSED'}"
    )
    return lines


def plot(rows: list[dict], path: str) -> None:
    """Test accuracy against wall time, one line per strategy, one panel per (data set, scenario)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in rows)]
    fig, axes = plt.subplots(len(datasets), len(SCENARIOS), figsize=(15, 4 * len(datasets)), squeeze=False)
    for i, dataset in enumerate(datasets):
        for j, scenario in enumerate(SCENARIOS):
            ax = axes[i][j]
            for r in (r for r in rows if (r["dataset"], r["scenario"]) == (dataset, scenario)):
                t, acc = zip(*r["curve"], strict=True)
                ax.plot(t, acc, marker=".", label=r["strategy"])
            ax.axhline(TARGET, color="grey", linewidth=0.5)
            final = min(r["final_acc"] for r in rows if r["dataset"] == dataset)
            low = max(0.0, min(0.5, final - 0.15))  # the synthetic set ends far below the target
            ax.set(title=f"{dataset}, {scenario}", xlabel="wall time (s)", ylabel="test accuracy", ylim=(low, 1.0))
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpitrain bench strategies", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4, help="ranks per job (default 4)")
    p.add_argument("--repeat", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of digits,synthetic")
    p.add_argument("--timeout", type=float, default=300, help="seconds per job")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--plot", default=None, help="write the accuracy-against-time PNG here")
    args = p.parse_args(argv)
    chosen = [d for d in args.datasets.split(",") if d]
    unknown = sorted(set(chosen) - set(DATASETS))
    if unknown or args.ranks < 2 or args.repeat < 1:
        p.error(f"--datasets from {', '.join(DATASETS)}, --ranks >= 2 and --repeat >= 1 (got {args})")
    runs = []
    for _ in range(args.repeat):
        for dataset in chosen:
            for scenario in SCENARIOS:
                for strategy in STRATEGIES:
                    runs.append(run_job(args, dataset, scenario, strategy))
                    print(
                        f"# done {dataset} {scenario} {strategy}: {runs[-1]['samples_per_s']:,.0f} samples/s",
                        file=sys.stderr,
                        flush=True,
                    )
    rows = summarise(runs)
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"ranks": args.ranks, "repeat": args.repeat, "rows": rows, "runs": runs}, out, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
