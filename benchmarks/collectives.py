"""Collective benchmark in the style of nccl-tests: ours against MPI's native collective.

    mpiexec -n 2 python benchmarks/collectives.py -b 4K -e 64M -f 4 --op allreduce --json out.json

For each size, every iteration runs each algorithm once in turn (interleaved,
so drift in machine speed hits all alike; the order rotates every iteration),
all on one buffer per kind, refilled before each call: with an array each,
MPICH's own all-reduce at 4 MiB ran 1.3x slower on whichever array came
first. Each rank takes the median of its
timed iterations after warm-up; time is the max over ranks of that median,
and min/avg/max over ranks are printed beside it (OSU style). busbw = algbw *
2(p-1)/p for all-reduce, (p-1)/p for reduce-scatter and all-gather, 1 for
broadcast. #wrong counts elements that differ from the native result beyond
round-off, summed over ranks; any makes the exit status non-zero.

``--buffers`` says where the buffers live: ``shared`` (from
``Communicator.allocate``, node-shared memory, as the trainer's gradient
buffer), ``private`` (plain numpy arrays, what a user's own array gets), or
both (the default), each row labelled. vs_native compares with the native
row on the same kind of buffer. ``mpi4py`` is MPI's in-place call made
directly on the Communicator's duplicate communicator, so native / mpi4py
is the Communicator's own per-call overhead (checks, watchdog bookkeeping;
``--checked`` includes the cross-rank agreement). When torch is importable,
PyTorch's gloo backend (initialised from the MPI rank and size) runs in the
same loop for all-reduce and broadcast.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable

import numpy as np
from gloo import init_gloo
from mpi4py import MPI

from mpitrain import threads
from mpitrain.comm import Communicator

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
GLOO_OPS = ("allreduce", "broadcast")
OURS = {"allreduce": "ring", "broadcast": "tree", "reduce_scatter": "ring", "allgather": "ring"}
BUS_FACTOR = {"allreduce": lambda p: 2 * (p - 1) / p, "broadcast": lambda p: 1.0}
BUS_FACTOR["reduce_scatter"] = BUS_FACTOR["allgather"] = lambda p: (p - 1) / p


def parse_size(text: str) -> int:
    """'4K' -> 4096, '64M' -> 67108864, '100' -> 100."""
    match = re.fullmatch(r"(\d+)([KMG]?)B?", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 4096, 4K, 64M or 1G")
    return int(match.group(1)) * UNITS[match.group(2)]


def sizes(begin: int, end: int, factor: int) -> list[int]:
    """begin, begin*factor, ... up to end."""
    out, size = [], begin
    while size <= end:
        out.append(size)
        size *= factor
    return out


def copy_bandwidth(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Single-core numpy copy bandwidth in GB/s, counting bytes read plus written (best of repeats)."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def operation(comm: Communicator, op: str, buf: np.ndarray, alg: str, root: int) -> Callable[[], object]:
    """The call to time for one collective and algorithm on ``buf``."""
    if alg == "gloo":
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(buf)  # shares buf's memory: results land in buf
        if op == "allreduce":
            return lambda: dist.all_reduce(tensor)
        return lambda: dist.broadcast(tensor, src=root)
    if alg == "mpi4py":
        return raw_operation(comm.comm, op, buf, root, comm.chunk_bounds(buf.size))
    if op == "allreduce":
        return lambda: comm.allreduce(buf, op="sum", algorithm=alg)
    if op == "reduce_scatter":
        return lambda: comm.reduce_scatter(buf, op="sum", algorithm=alg)
    if op == "allgather":
        return lambda: comm.allgather(buf, algorithm=alg)
    return lambda: comm.broadcast(buf, root=root, algorithm=alg)


def raw_operation(
    raw: MPI.Comm, op: str, buf: np.ndarray, root: int, bounds: list[tuple[int, int]]
) -> Callable[[], object]:
    """MPI's own call, as a user of mpi4py writes it, with what the Communicator's "native" passes."""
    if op == "allreduce":
        return lambda: raw.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    if op == "broadcast":
        return lambda: raw.Bcast(buf, root=root)
    counts, displs = [b - a for a, b in bounds], [a for a, _ in bounds]
    if op == "allgather":
        return lambda: raw.Allgatherv(MPI.IN_PLACE, [buf, (counts, displs)])
    a, b = bounds[raw.Get_rank()]
    result = np.empty(b - a, buf.dtype)

    def reduce_scatter() -> None:
        raw.Reduce_scatter(buf, result, counts, op=MPI.SUM)
        buf[a:b] = result

    return reduce_scatter


def expected_result(
    world: MPI.Comm, op: str, source: np.ndarray, root: int, bounds: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """(reference values, mask of the elements the operation defines on this rank); ``bounds``: the chunks."""
    rank = world.Get_rank()
    mask = np.ones(source.size, bool)
    if op == "broadcast":
        out = source.copy()
        world.Bcast(out, root=root)
        return out, mask
    if op == "allgather":
        gathered = world.allgather(source)
        out = np.concatenate([gathered[r][a:b] for r, (a, b) in enumerate(bounds)])
        return out, mask
    out = source.astype(np.float64)
    world.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
    if op == "reduce_scatter":
        mask[:] = False
        a, b = bounds[rank]
        mask[a:b] = True
    return out, mask


def run(args: argparse.Namespace) -> int:
    """Run the benchmark on COMM_WORLD; rank 0 prints; returns the exit status (same on every rank)."""
    world = MPI.COMM_WORLD
    rank, p = world.Get_rank(), world.Get_size()
    comm = Communicator(checked=args.checked)
    nthreads = threads.limit_threads(comm.local_size, 1)
    dtype = np.dtype(args.dtype)
    algorithms = (
        args.algorithms.split(",") if args.algorithms else [OURS[args.op], "shm", "auto", "native", "mpi4py", "gloo"]
    )
    if "gloo" in algorithms and (args.op not in GLOO_OPS or not init_gloo(world, 1)):
        algorithms.remove("gloo")  # torch missing, or gloo lacks the operation
    factor = BUS_FACTOR[args.op](p)
    bandwidth = copy_bandwidth()
    if rank == 0:
        print(f"# mpitrain collective benchmark: {args.op}, {p} rank(s), {dtype}, checked={args.checked}")
        print(f"# MPI: {MPI.Get_library_version().splitlines()[0].strip()}; {nthreads} BLAS thread(s)/rank")
        print(f"# single-core copy bandwidth (read+write): {bandwidth:.1f} GB/s; tuning: {comm.tuning.describe()}")
        print(f"# iterations {args.iters}, warm-up {args.warmup}; time = max over ranks of the per-rank median")
        print(f"# buffers: {', '.join(args.buffers)} (shared: Communicator.allocate; private: a plain numpy array)")
        print(
            f"#{'size(B)':>11} {'count':>10} {'type':>7} {'redop':>5} {'root':>4} {'buffers':>7} {'algorithm':>9} "
            f"{'time(us)':>10} "
            f"{'min(us)':>9} {'avg(us)':>9} {'algbw':>7} {'busbw':>7} {'#wrong':>6} {'vs_native':>9}"
        )
    cases = [(kind, alg) for kind in args.buffers for alg in algorithms if not (alg == "gloo" and kind == "shared")]
    rows, wrong_total = [], 0
    rng = np.random.default_rng(rank)
    for nbytes in sizes(args.begin, args.end, args.factor):
        count = max(nbytes // dtype.itemsize, 1)
        source = (rng.standard_normal(count) * (rank + 1)).astype(dtype)
        # One buffer per kind, shared by its algorithms: a call's speed here depends on the buffer's address
        # (MPICH's native all-reduce at 4 MiB ran 1.3x slower on one of two arrays, whichever it was given).
        kinds = dict.fromkeys(kind for kind, _ in cases)
        buffers = {kind: comm.allocate(count, dtype) if kind == "shared" else np.zeros(count, dtype) for kind in kinds}
        times: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
        for it in range(args.warmup + args.iters):
            for case in cases[it % len(cases) :] + cases[: it % len(cases)]:  # rotated: no case always first
                np.copyto(buffers[case[0]], source)
                call = operation(comm, args.op, buffers[case[0]], case[1], args.root)
                world.Barrier()
                start = MPI.Wtime()
                call()
                elapsed = MPI.Wtime() - start
                if it >= args.warmup:
                    times[case].append(elapsed)
        reference, mask = expected_result(world, args.op, source, args.root, comm.chunk_bounds(count))
        scale = world.allreduce(float(np.abs(source.astype(np.float64)).max(initial=0.0)), op=MPI.MAX)
        bound = p * p * np.finfo(dtype).eps * scale if dtype.kind == "f" else 0.0
        spread = {case: world.allgather(float(np.median(t))) for case, t in times.items()}
        for kind, alg in cases:
            np.copyto(buffers[kind], source)  # one more call of each, to check its result
            operation(comm, args.op, buffers[kind], alg, args.root)()
            diff = np.abs(buffers[kind].astype(np.float64) - reference)[mask]
            wrong = world.allreduce(int((diff > bound).sum()))
            wrong_total += wrong
            seconds = max(spread[kind, alg])
            algbw = nbytes / seconds / 1e9
            ratio = max(spread[kind, "native"]) / seconds if (kind, "native") in spread else float("nan")
            row = {
                "size": nbytes, "count": count, "type": str(dtype), "op": args.op, "buffers": kind, "algorithm": alg,
                "time_us": seconds * 1e6, "min_us": min(spread[kind, alg]) * 1e6,
                "avg_us": float(np.mean(spread[kind, alg])) * 1e6, "max_us": seconds * 1e6,
                "algbw": algbw, "busbw": algbw * factor, "wrong": wrong, "ratio_vs_native": ratio,
            }  # fmt: skip
            rows.append(row)
            if rank == 0:
                redop = "-" if args.op in ("broadcast", "allgather") else "sum"
                root = args.root if args.op == "broadcast" else -1
                print(
                    f" {nbytes:>11} {count:>10} {row['type']:>7} {redop:>5} {root:>4} {kind:>7} {alg:>9} "
                    f"{row['time_us']:>10.1f} {row['min_us']:>9.1f} {row['avg_us']:>9.1f} {algbw:>7.3f} "
                    f"{row['busbw']:>7.3f} {wrong:>6} {ratio:>9.2f}"
                )
        comm.release(*buffers.values())
    if rank == 0:
        print(f"# Out of bounds values : {wrong_total} {'OK' if wrong_total == 0 else 'FAILED'}")
        summary(rows, cases)
        meta = {"op": args.op, "ranks": p, "dtype": str(dtype), "copy_bandwidth_gbs": bandwidth}
        meta["mpi"] = " ".join(MPI.Get_library_version().splitlines()[0].split())
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**meta, "tuning": comm.tuning.describe(), "rows": rows}, f, indent=1)
        if args.plot:
            plot(rows, meta, args.plot)
    return 1 if wrong_total else 0


def summary(rows: list[dict], cases: list[tuple[str, str]]) -> None:
    """Footer lines: auto against native per kind of buffer (worst and best size), the Communicator's
    overhead over mpi4py from 1 MiB, auto against gloo, and each case's mean bus bandwidth."""

    def ratios(kind: str, top: str, bottom: str, least: int = 0) -> list[float]:
        by = {(r["size"], r["algorithm"]): r["time_us"] for r in rows if r["buffers"] == kind}
        return [by[size, bottom] / by[size, top] for size, alg in by if alg == top and (size, bottom) in by
                and size >= least]  # fmt: skip

    for kind in dict.fromkeys(k for k, _ in cases):
        for top, bottom, least, label in (("auto", "native", 0, "auto / native speed"),
                                          ("mpi4py", "native", 1 << 20, "native / mpi4py time, >= 1 MiB")):  # fmt: skip
            found = ratios(kind, top, bottom, least)
            if found:
                print(f"# {label:<31}: {min(found):.2f}x to {max(found):.2f}x ({kind} buffers)")
    found = ratios("private", "auto", "gloo")
    if found:
        print(f"# {'auto / gloo speed':<31}: {min(found):.2f}x to {max(found):.2f}x (private buffers)")
    for kind, alg in cases:
        busbw = [r["busbw"] for r in rows if r["algorithm"] == alg and r["buffers"] == kind]
        print(f"# Avg bus bandwidth    : {np.mean(busbw):.3f} GB/s ({kind} {alg})")


def plot(rows: list[dict], meta: dict, path: str) -> None:
    """busbw against size, one line per kind of buffer and algorithm, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, alg in dict.fromkeys((r["buffers"], r["algorithm"]) for r in rows):
        mine = [r for r in rows if r["algorithm"] == alg and r["buffers"] == kind]
        ax.plot([r["size"] for r in mine], [r["busbw"] for r in mine], marker="o", label=f"{kind} {alg}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("size (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(f"{meta['op']}, {meta['ranks']} ranks, {meta['dtype']} ({meta['mpi']})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    """Parse options (nccl-tests names: -b -e -f -n -w) and run; returns the exit status."""
    parser = argparse.ArgumentParser(prog="benchmarks/collectives.py", description=__doc__.split("\n")[0])
    parser.add_argument("-b", "--begin", type=parse_size, default=parse_size("4K"), help="smallest size (bytes)")
    parser.add_argument("-e", "--end", type=parse_size, default=parse_size("64M"), help="largest size (bytes)")
    parser.add_argument("-f", "--factor", type=int, default=4, help="size multiplier between rows")
    parser.add_argument("-n", "--iters", type=int, default=20, help="timed iterations")
    parser.add_argument("-w", "--warmup", type=int, default=5, help="warm-up iterations")
    parser.add_argument("--op", choices=tuple(OURS), default="allreduce")
    parser.add_argument("--dtype", choices=("float16", "float32", "float64", "int32", "int64"), default="float32")
    parser.add_argument("--root", type=int, default=0, help="broadcast root")
    parser.add_argument("--algorithms", default=None, help="comma-separated (default: ours, auto, native, gloo)")
    parser.add_argument("--checked", action="store_true", help="checked mode (measures its cost)")
    parser.add_argument(
        "--buffers", type=lambda text: text.split(","), default=["private", "shared"],
        help="private (plain numpy arrays), shared (Communicator.allocate) or both, comma-separated (default both)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument("--plot", default=None, help="write busbw against size to this PNG")
    args = parser.parse_args(argv)
    if args.factor < 2 or args.begin < 1 or args.end < args.begin:
        parser.error("need -f >= 2 and 1 <= -b <= -e")
    if not args.buffers or set(args.buffers) - {"private", "shared"}:
        parser.error(f"--buffers {','.join(args.buffers)}: expected private, shared or private,shared")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
