"""Command line: ``python -m mpitrain [train|info|bench] ...`` (train is the default).

Every rank parses the same arguments; only rank 0 prints, and a bad argument
makes every rank exit with the same non-zero code.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from mpi4py import MPI

from mpitrain import backend, faults, threads
from mpitrain.comm import Communicator, Tuning, mark_all_ranks, raised_on_all_ranks
from mpitrain.comm.communicator import ALLREDUCE_ALGORITHMS
from mpitrain.comm.watchdog import abort_job
from mpitrain.nn import MODELS
from mpitrain.optim import OPTIMIZERS, SCHEDULES
from mpitrain.train import TrainConfig, train

EXIT_USAGE = 2
EXIT_ERROR = 1

TRAIN_EXAMPLES = """examples:
  mpirun -np 4 python -m mpitrain                      # MLP on digits, 4 ranks
  mpirun -np 2 python -m mpitrain train --model cnn --epochs 10
  mpirun -np 4 python -m mpitrain train --dataset mnist.npz --hidden 256,256 --batch-size 64
  mpirun -np 8 --hostfile hostfile python -m mpitrain train --metrics run.jsonl --save model.npz
"""


class UsageError(Exception):
    """A bad command line; raised identically on every rank."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting and prints on rank 0 only."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}\n(try '{self.prog} --help')")

    def _print_message(self, message: str, file: Any = None) -> None:
        if MPI.COMM_WORLD.Get_rank() == 0:
            super()._print_message(message, file)


def _bounded(kind: Callable[[str], Any], low: float, what: str, inclusive: bool = True) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (value >= low if inclusive else value > low) or value != value:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}")
        return value

    return parse


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive sizes, e.g. 128,64")
    return sizes


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number in [0, 1)")
    return value


def _compression(text: str) -> str:
    if text in ("none", "fp16", "bf16"):
        return text
    ratio = text[5:] if text.startswith("topk:") else ""
    try:
        valid = 0.0 < float(ratio) <= 1.0
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"{text!r}: expected none, fp16, bf16 or topk:RATIO with RATIO in (0, 1]")
    return text


positive_int = _bounded(int, 1, "an integer >= 1")
nonneg_int = _bounded(int, 0, "an integer >= 0")
positive_float = _bounded(float, 0.0, "a number > 0", inclusive=False)
nonneg_float = _bounded(float, 0.0, "a number >= 0")


def _train_parser(prog: str) -> _Parser:
    d = TrainConfig()
    p = _Parser(
        prog=f"{prog} train",
        description="Synchronous data-parallel training over MPI (the default subcommand).",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=MODELS, default=d.model, help="model (default %(default)s)")
    p.add_argument("--hidden", type=_hidden, default=d.hidden, help="hidden sizes, e.g. 128,64")
    p.add_argument("--dropout", type=_fraction, default=d.dropout, help="dropout after hidden layers (default 0)")
    p.add_argument("--dataset", default=d.dataset, help="digits (default), synthetic, or a Keras-layout .npz path")
    p.add_argument("--synthetic-samples", type=positive_int, default=d.synthetic_samples, help="size of synthetic")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="default %(default)s")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="per rank (default %(default)s)")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="learning rate (default %(default)s)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="default %(default)s")
    p.add_argument("--momentum", type=_fraction, default=d.momentum, help="SGD momentum (default %(default)s)")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    p.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay, help="default %(default)s")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="LR schedule (default %(default)s)")
    p.add_argument("--warmup-steps", type=nonneg_int, default=d.warmup_steps, help="linear LR warm-up steps")
    p.add_argument("--step-size", type=nonneg_int, default=d.step_size, help="steps between decays (step schedule)")
    p.add_argument("--gamma", type=positive_float, default=d.gamma, help="decay factor (step schedule)")
    p.add_argument("--seed", type=nonneg_int, default=d.seed, help="default %(default)s")
    p.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype, help="default %(default)s")
    p.add_argument("--backend", choices=backend.BACKENDS, default=d.backend, help="array backend")
    p.add_argument("--algorithm", choices=ALLREDUCE_ALGORITHMS, default=d.algorithm, help="gradient all-reduce")
    p.add_argument("--bucket-mb", type=positive_float, default=d.bucket_mb, help="MiB per gradient all-reduce")
    p.add_argument("--no-overlap", dest="overlap", action="store_false", help="all-reduce only after backward")
    p.add_argument("--compression", type=_compression, default=d.compression, help="none, fp16, bf16, topk:RATIO")
    p.add_argument("--accumulate", type=positive_int, default=d.accumulate, help="micro-batches per step")
    p.add_argument("--shard-optimizer", action="store_true",
                   help="reduce-scatter gradients, update own chunks, all-gather parameters")  # fmt: skip
    p.add_argument("--micro-batch", type=nonneg_int, default=d.micro_batch,
                   help="at most N samples per forward/backward (0: automatic, ~4 MiB of layer outputs)")  # fmt: skip
    p.add_argument("--nonfinite", choices=("abort", "skip"), default=d.nonfinite, help="NaN/Inf gradients")
    p.add_argument("--check-replicas-every", type=nonneg_int, default=d.check_replicas_every,
                   help="steps between replica digest checks (and every epoch end; 0: epoch ends only)")  # fmt: skip
    p.add_argument("--check-collectives", action="store_true", help="ranks agree on every collective call first")
    p.add_argument("--timeout", type=positive_float, default=300.0, help="seconds before a stuck job is aborted")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="write checkpoints here")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=d.checkpoint_every,
                   help="steps between checkpoints (and every epoch end)")  # fmt: skip
    p.add_argument("--keep", type=positive_int, default=d.keep, help="checkpoints kept (default %(default)s)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from the newest valid checkpoint in PATH (default: --checkpoint-dir)")  # fmt: skip
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps in all")
    p.add_argument("--threads", type=positive_int, default=None, help="BLAS threads per rank (default cores/ranks)")
    p.add_argument("--metrics", default=None, metavar="FILE.jsonl", help="one JSON line per epoch")
    p.add_argument("--save", default=None, metavar="FILE.npz", help="write the final parameters")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _info_parser(prog: str) -> _Parser:
    return _Parser(prog=f"{prog} info", description="Print the MPI library, world, hosts and array backends.")


def _bench_parser(prog: str) -> _Parser:
    p = _Parser(
        prog=f"{prog} bench",
        description="Run a benchmark from the source checkout's benchmarks/ folder (options follow its name).",
    )
    p.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    p.add_argument("options", nargs=argparse.REMAINDER, help="passed on, e.g. -b 4K -e 64M --op broadcast")
    return p


def _run_bench(args: argparse.Namespace, comm: Communicator) -> None:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{args.name}.py")
    with comm.agreement():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: the benchmarks ship with the source checkout, not the installed package")
    module = runpy.run_path(path, run_name="mpitrain_bench")
    status = module["main"](args.options)
    if status:
        raise mark_all_ranks(RuntimeError(f"benchmark {args.name} found wrong results (exit status {status})"))


def _run_train(args: argparse.Namespace, comm: Communicator) -> None:
    count = threads.limit_threads(comm.comm, args.threads)
    if args.resume == "":
        if not args.checkpoint_dir:
            raise UsageError("python -m mpitrain train: error: --resume needs a PATH or --checkpoint-dir")
        args.resume = args.checkpoint_dir
    options = {k: v for k, v in vars(args).items() if k not in ("command", "threads", "timeout", "check_collectives")}
    # Which process is which rank, so a launcher's "process PID ... killed" names a rank.
    places = comm.allgather_object(f"{MPI.Get_processor_name()}:{os.getpid()}")
    if comm.rank == 0:
        print(f"# mpitrain: {comm.size} rank(s), {count} BLAS thread(s) per rank", flush=True)
        print("# ranks (host:pid): " + " ".join(f"{r}={place}" for r, place in enumerate(places)), flush=True)
    train(TrainConfig(**options), comm)


def _run_info(args: argparse.Namespace, comm: Communicator) -> None:
    import mpi4py

    count = threads.limit_threads(comm.comm)
    hosts = comm.allgather_object(MPI.Get_processor_name())
    if comm.rank != 0:
        return
    per_host: dict[str, int] = {}
    for host in hosts:
        per_host[host] = per_host.get(host, 0) + 1
    library = MPI.Get_library_version().strip().splitlines()[0]
    print(f"MPI library:   {library} (MPI standard {'.'.join(map(str, MPI.Get_version()))})")
    print(f"mpi4py:        {mpi4py.__version__}")
    print(f"world size:    {comm.size}")
    print("hosts:         " + ", ".join(f"{h} ({n} rank(s))" for h, n in per_host.items()))
    for name, text in backend.available_backends().items():
        print(f"backend:       {name}: {text}")
    print(f"threads:       {count} per rank ({threads.cores_available()} core(s) visible)")
    print(f"collectives:   {comm.tuning.describe()} (override with MPITRAIN_<NAME> variables)")
    for line in threads.thread_pools():
        print(f"thread pool:   {line}")


COMMANDS = {
    "train": (_train_parser, _run_train),
    "info": (_info_parser, _run_info),
    "bench": (_bench_parser, _run_bench),
}
BENCHMARKS = ("collectives", "training")


def parse(argv: Sequence[str], prog: str = "python -m mpitrain") -> argparse.Namespace:
    """Parse a command line; a missing or option-first command means ``train``.

    Raises:
        UsageError: on every rank, for any bad argument.
    """
    argv = list(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if command == "train" and argv[:1] in (["-h"], ["--help"]) and MPI.COMM_WORLD.Get_rank() == 0:
        print(f"usage: {prog} [train|info|bench] [options]; the options of train follow\n")
    args = COMMANDS[command][0](prog).parse_args(argv)
    args.command = command
    return args


def _environment() -> Tuning:
    """Read the MPITRAIN_* variables (the same on every rank); a bad one is a usage error."""
    try:
        faults.planned()
        return Tuning.from_env()
    except ValueError as exc:
        raise UsageError(f"error in the environment: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (the same on every rank for known errors)."""
    rank = MPI.COMM_WORLD.Get_rank()
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        checked, timeout = getattr(args, "check_collectives", True), getattr(args, "timeout", None)
        COMMANDS[args.command][1](args, Communicator(checked=checked, tuning=_environment(), timeout=timeout))
    except UsageError as exc:
        if rank == 0:
            print(exc, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - decide between a clean exit and an abort
        if raised_on_all_ranks(exc):
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        # Raised on this rank alone: the others may be waiting on it, so end the whole job.
        print(f"[rank {rank}] unexpected error:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        abort_job(EXIT_ERROR)
    return 0


def console_main() -> None:
    """Console-script entry point (``mpitrain``): exit with ``main()``'s code."""
    sys.exit(main())
