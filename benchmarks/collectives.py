"""Collective benchmark in the style of nccl-tests: ours against MPI's native collective.

    mpiexec -n 2 python benchmarks/collectives.py -b 4K -e 64M -f 4 --op allreduce --json out.json

For each size, every iteration runs each algorithm once in turn (interleaved,
so drift in machine speed hits all alike). Time = max over ranks of the
median over timed iterations after warm-up. busbw = algbw * 2(p-1)/p for
all-reduce, = algbw for broadcast. #wrong counts elements that differ from
the native result beyond round-off, summed over ranks; any makes the exit
status non-zero.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np
from mpi4py import MPI

from mpitrain import threads
from mpitrain.comm import Communicator

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


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


def _prepare(comm: Communicator, args: argparse.Namespace, buf: np.ndarray, source: np.ndarray, alg: str):
    """Refill ``buf`` from ``source`` and return the call to time."""
    np.copyto(buf, source)
    if args.op == "allreduce":
        return lambda: comm.allreduce(buf, op="sum", algorithm=alg)
    return lambda: comm.broadcast(buf, root=args.root, algorithm=alg)


def time_call(call, comm: MPI.Comm) -> float:
    """Seconds one call takes on this rank, starting together after a barrier."""
    comm.Barrier()
    start = MPI.Wtime()
    call()
    return MPI.Wtime() - start


def run(args: argparse.Namespace) -> int:
    world = MPI.COMM_WORLD
    rank, p = world.Get_rank(), world.Get_size()
    threads.limit_threads(world, 1)
    comm = Communicator(checked=False)
    dtype = np.dtype(args.dtype)
    default = {"allreduce": ("ring", "native"), "broadcast": ("tree", "native")}[args.op]
    algorithms = args.algorithms.split(",") if args.algorithms else list(default)
    bus_factor = 2 * (p - 1) / p if args.op == "allreduce" else 1.0
    if rank == 0:
        print(f"# mpitrain collective benchmark: {args.op}, {p} rank(s), {dtype}")
        print(f"# MPI: {MPI.Get_library_version().splitlines()[0].strip()}")
        print(f"# iterations {args.iters}, warm-up {args.warmup}; time = max over ranks of the median")
        print(
            f"#{'size(B)':>12} {'count':>11} {'type':>7} {'redop':>5} {'root':>4} {'algorithm':>9} "
            f"{'time(us)':>10} {'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'#wrong':>6} {'vs native':>9}"
        )
    rows, wrong_total = [], 0
    rng = np.random.default_rng(rank)
    for nbytes in sizes(args.begin, args.end, args.factor):
        count = max(nbytes // dtype.itemsize, 1)
        source = (rng.standard_normal(count) * (rank + 1)).astype(dtype)
        buffers = {alg: np.empty_like(source) for alg in algorithms}

        times: dict[str, list[float]] = {alg: [] for alg in algorithms}
        for it in range(args.warmup + args.iters):
            for alg in algorithms:
                elapsed = time_call(_prepare(comm, args, buffers[alg], source, alg), world)
                if it >= args.warmup:
                    times[alg].append(elapsed)
        reference = buffers["native"] if "native" in buffers else _native(source, args, world)
        bound = _tolerance(source, world, p)
        medians = {alg: world.allreduce(float(np.median(t)), op=MPI.MAX) for alg, t in times.items()}
        for alg in algorithms:
            wrong = world.allreduce(int((np.abs(buffers[alg].astype(np.float64) - reference) > bound).sum()))
            wrong_total += wrong
            seconds = medians[alg]
            algbw = nbytes / seconds / 1e9
            ratio = medians["native"] / seconds if "native" in medians else float("nan")
            row = {
                "size": nbytes, "count": count, "type": str(dtype), "redop": "sum" if args.op == "allreduce" else "-",
                "root": args.root if args.op == "broadcast" else -1, "algorithm": alg, "time_us": seconds * 1e6,
                "algbw": algbw, "busbw": algbw * bus_factor, "wrong": wrong, "ratio_vs_native": ratio,
            }  # fmt: skip
            rows.append(row)
            if rank == 0:
                print(
                    f" {nbytes:>12} {count:>11} {row['type']:>7} {row['redop']:>5} {row['root']:>4} {alg:>9} "
                    f"{row['time_us']:>10.1f} {algbw:>11.3f} {row['busbw']:>11.3f} {wrong:>6} {ratio:>9.2f}"
                )
    if rank == 0:
        print(f"# Out of bounds values : {wrong_total} {'OK' if wrong_total == 0 else 'FAILED'}")
        for alg in algorithms:
            busbw = [r["busbw"] for r in rows if r["algorithm"] == alg]
            print(f"# Avg bus bandwidth    : {alg} {np.mean(busbw):.3f} GB/s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"op": args.op, "ranks": p, "dtype": str(dtype), "rows": rows}, f, indent=1)
    return 1 if wrong_total else 0


def _native(source: np.ndarray, args: argparse.Namespace, world: MPI.Comm) -> np.ndarray:
    out = source.copy()
    if args.op == "allreduce":
        world.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
    else:
        world.Bcast(out, root=args.root)
    return out


def _tolerance(source: np.ndarray, world: MPI.Comm, p: int) -> float:
    total = world.allreduce(float(np.abs(source.astype(np.float64)).max(initial=0.0)), op=MPI.MAX)
    return p * p * np.finfo(source.dtype).eps * total if source.dtype.kind == "f" else 0.0


def main(argv: list[str] | None = None) -> int:
    """Parse options (nccl-tests names: -b -e -f -n -w) and run; returns the exit status."""
    parser = argparse.ArgumentParser(prog="benchmarks/collectives.py", description=__doc__.split("\n")[0])
    parser.add_argument("-b", "--begin", type=parse_size, default=parse_size("4K"), help="smallest size (bytes)")
    parser.add_argument("-e", "--end", type=parse_size, default=parse_size("64M"), help="largest size (bytes)")
    parser.add_argument("-f", "--factor", type=int, default=4, help="size multiplier between rows")
    parser.add_argument("-n", "--iters", type=int, default=10, help="timed iterations")
    parser.add_argument("-w", "--warmup", type=int, default=3, help="warm-up iterations")
    parser.add_argument("--op", choices=("allreduce", "broadcast"), default="allreduce")
    parser.add_argument("--dtype", choices=("float32", "float64", "int32", "int64"), default="float32")
    parser.add_argument("--root", type=int, default=0, help="broadcast root")
    parser.add_argument("--algorithms", default=None, help="comma-separated (default: ours and native)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
