"""Command line: ``python -m mpitrain [train|info|bench] ...`` (train is the default).

Every rank parses the same arguments; only rank 0 prints, and a bad argument
makes every rank exit with the same non-zero code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import runpy
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import mpi4py
from mpi4py import MPI

from mpitrain import __version__, backend, checkpoint, faults, inference, log, plot, threads
from mpitrain.cli_types import fraction, hidden, nonneg_float, nonneg_int, positive_float, positive_int, steps_window
from mpitrain.comm import Communicator, Tuning, cuda_aware, mark_all_ranks, raised_on_all_ranks
from mpitrain.comm.watchdog import GRACE, abort_job
from mpitrain.config_file import config_arguments
from mpitrain.nn import MODELS
from mpitrain.optim import OPTIMIZERS, SCHEDULES
from mpitrain.parallel import STRATEGIES, options_for, strategy_class
from mpitrain.train import STATUS, TrainConfig, train, train_config

EXIT_USAGE = 2
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # as a shell reports a program ended by Ctrl-C
EXIT_TERMINATED = 143  # as a shell reports a program ended by SIGTERM

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


def _train_parser(prog: str) -> _Parser:
    d = TrainConfig()
    p = _Parser(
        prog=f"{prog} train",
        description="Train a model over MPI with a strategy (the default subcommand).",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, metavar="RUN.toml", help="train options from a TOML file (flags override)")
    p.add_argument("--model", choices=MODELS, default=d.model, help="model (default %(default)s)")
    p.add_argument("--hidden", type=hidden, default=d.hidden, help="hidden sizes, e.g. 128,64")
    p.add_argument("--dropout", type=fraction, default=d.dropout, help="dropout after hidden layers (default 0)")
    p.add_argument("--dataset", default=d.dataset, help="digits (default), synthetic, or a Keras-layout .npz path")
    p.add_argument("--standardize", action="store_true",
                   help="centre, scale features by the training split's mean, deviation (kept by --save)")  # fmt: skip
    p.add_argument("--synthetic-samples", type=positive_int, default=d.synthetic_samples, help="size of synthetic")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="default %(default)s")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="per rank (default %(default)s)")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="learning rate (default %(default)s)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="default %(default)s")
    p.add_argument("--momentum", type=fraction, default=d.momentum, help="SGD momentum (default %(default)s)")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    p.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay, help="default %(default)s")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="LR schedule (default %(default)s)")
    p.add_argument("--warmup-steps", type=nonneg_int, default=d.warmup_steps, help="linear LR warm-up steps")
    p.add_argument("--scale-lr", action="store_true",
                   help="lr x data-parallel ranks, warmed up over the first 5 epochs (Goyal et al.)")  # fmt: skip
    p.add_argument("--clip-grad-norm", type=nonneg_float, default=d.clip_grad_norm, metavar="MAX",
                   help="clip the averaged gradients' global L2 norm to MAX (0: off; allreduce, pipeline)")  # fmt: skip
    p.add_argument("--step-size", type=nonneg_int, default=d.step_size, help="steps between decays (step schedule)")
    p.add_argument("--gamma", type=positive_float, default=d.gamma, help="decay factor (step schedule)")
    p.add_argument("--seed", type=nonneg_int, default=d.seed, help="default %(default)s")
    p.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype, help="default %(default)s")
    p.add_argument("--backend", choices=backend.BACKENDS, default=d.backend, help="array backend")
    p.add_argument("--strategy", choices=tuple(STRATEGIES), default=d.strategy,
                   help="how ranks train together (default %(default)s); each has its options below")  # fmt: skip
    p.add_argument("--check-collectives", action="store_true", help="ranks agree on every collective call first")
    p.add_argument("--timeout", type=positive_float, default=300.0, help="seconds before a stuck job is aborted")
    p.add_argument("--log-level", choices=log.LEVELS, default="WARNING",
                   help="stderr records at this level and above, each with its rank (default %(default)s)")  # fmt: skip
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="write checkpoints here")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=d.checkpoint_every,
                   help="steps between checkpoints (and every epoch end)")  # fmt: skip
    p.add_argument("--keep", type=positive_int, default=d.keep, help="checkpoints kept (default %(default)s)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from the newest valid checkpoint in PATH (default: --checkpoint-dir); "
                        "'auto': from --checkpoint-dir if it holds one, else start fresh")  # fmt: skip
    p.add_argument(
        "--init-from",
        default=None,
        metavar="PATH",
        help="start from a --save .npz or a checkpoint's whole model (any strategy)",
    )
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps in all")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="BLAS threads per rank (default: its cores / the ranks sharing them)",
    )
    p.add_argument("--metrics", default=None, metavar="FILE.jsonl", help="one JSON line per epoch")
    p.add_argument("--save", default=None, metavar="FILE.npz", help="write the final parameters")
    p.add_argument("--timeline", default=None, metavar="FILE.json",
                   help="Chrome trace of every rank's steps (Perfetto, chrome://tracing)")  # fmt: skip
    p.add_argument("--timeline-steps", type=steps_window, default=d.timeline_steps, metavar="A:B",
                   help="record steps A to B-1, counted from 0 (default %(default)s): a bounded file")  # fmt: skip
    p.add_argument("--breakdown", action="store_true",
                   help="epoch lines show seconds of data, forward, backward, exposed_comm, optimizer")  # fmt: skip
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    # Strategies that share their flags (one add_arguments) share a group: argparse takes each flag once.
    families: dict[Any, list[str]] = {}
    for name, cls in STRATEGIES.items():
        families.setdefault(cls.add_arguments.__func__, []).append(name)
    for add_arguments, names in families.items():
        doc = (STRATEGIES[names[0]].__doc__ or "").split("\n")[0]
        add_arguments(STRATEGIES[names[0]], p.add_argument_group("--strategy " + " / ".join(names), doc))
    return p


def _strategy_flags(parser: _Parser) -> dict[str, set[str]]:
    """The option strings each strategy takes: a flag of a group belongs to the group's strategies whose
    Options have its dest (to all of them when none has: a flag is never nobody's)."""
    flags: dict[str, set[str]] = {name: set() for name in STRATEGIES}
    for group in parser._action_groups:
        title = group.title or ""
        if not title.startswith("--strategy "):
            continue
        names = title.removeprefix("--strategy ").split(" / ")
        for action in group._group_actions:
            owners = [n for n in names if action.dest in {f.name for f in dataclasses.fields(STRATEGIES[n].Options)}]
            for name in owners or names:
                flags[name].update(action.option_strings)
    return flags


def _check_strategy_flags(parser: _Parser, argv: Sequence[str], args: argparse.Namespace) -> None:
    """A flag that the chosen strategy does not take is a usage error, as are options that conflict."""
    given = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    flags = _strategy_flags(parser)
    stray = sorted((given & set().union(*flags.values())) - flags[args.strategy])
    if stray:
        owners = sorted({name for name, own in flags.items() if own & set(stray)})
        parser.error(
            f"{', '.join(stray)} belong(s) to --strategy {' / '.join(owners)}; this run uses --strategy {args.strategy}"
        )
    try:
        options = options_for(args.strategy, vars(args))
        strategy_class(args.strategy).validate(options, args.batch_size, MPI.COMM_WORLD.Get_size())
    except ValueError as exc:
        parser.error(str(exc))


def _with_config(parser: _Parser, argv: list[str]) -> list[str]:
    """``argv`` after the flags its ``--config`` file stands for (so the command line's own come last and win)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return argv
    tokens: list[str] = []
    try:
        tokens = config_arguments(parser, path)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))  # raises the usage error
    return tokens + argv


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
    sys.path.insert(0, os.path.dirname(path))  # the benchmarks import their shared helpers (gloo.py)
    module = runpy.run_path(path, run_name="mpitrain_bench")
    status = module["main"](args.options)
    if status:
        raise mark_all_ranks(RuntimeError(f"benchmark {args.name} found wrong results (exit status {status})"))


def _run_train(args: argparse.Namespace, comm: Communicator) -> None:
    count = threads.limit_threads(threads.ranks_sharing_cores(comm), args.threads)
    if args.resume in ("", "auto"):
        if not args.checkpoint_dir:
            needs = (
                "--resume auto needs --checkpoint-dir" if args.resume else "--resume needs a PATH or --checkpoint-dir"
            )
            raise UsageError(f"python -m mpitrain train: error: {needs}")
        if args.resume == "auto":  # a requeued batch job: go on where a checkpoint is, else start fresh
            found = comm.bcast_object(bool(checkpoint.checkpoints(args.checkpoint_dir)) if comm.rank == 0 else None)
            args.resume = args.checkpoint_dir if found else None
        else:
            args.resume = args.checkpoint_dir
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    known = own | {f.name for f in dataclasses.fields(strategy_class(args.strategy).Options)}
    config = train_config(**{k: v for k, v in vars(args).items() if k in known})
    gpus = gpu_header(comm) if config.backend == "cupy" else []  # before any other CUDA work
    # Which process is which rank, so a launcher's "process PID ... killed" names a rank.
    places = comm.allgather_object(f"{MPI.Get_processor_name()}:{os.getpid()}")
    if comm.rank == 0:
        print(f"# mpitrain: {comm.size} rank(s), {count} BLAS thread(s) per rank", flush=True)
        print("# ranks (host:pid): " + " ".join(f"{r}={place}" for r, place in enumerate(places)), flush=True)
        for line in gpus:
            print(line, flush=True)
    STATUS.update(step=0, checkpoint=None, checkpoint_dir=config.checkpoint_dir)
    log.LOGGER.debug("host:pid %s, %d BLAS thread(s)", places[comm.rank], count)
    train(config, comm)


def _run_info(args: argparse.Namespace, comm: Communicator) -> None:
    sharing = threads.ranks_sharing_cores(comm)
    count = threads.limit_threads(sharing)
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
    for line in device_report(comm):
        print(line)
    print(f"threads:       {count} per rank ({threads.cores_available()} core(s) visible, shared by {sharing} rank(s))")
    print(f"collectives:   {comm.tuning.describe()} (override with MPITRAIN_<NAME> variables)")
    for line in threads.thread_pools():
        print(f"thread pool:   {line}")


def device_report(comm: Communicator) -> list[str]:
    """``info``'s lines on GPUs: which are visible, whether MPI is CUDA-aware, the path each collective
    takes for a device array (rank 0's view)."""
    names = backend.device_names()
    lines = [f"GPUs:          {len(names)}: {', '.join(names)}" if names else "GPUs:          none visible"]
    lines.append(f"CUDA-aware:    {comm.cuda_aware.describe()}")
    nccl = backend.nccl_module() is not None
    for name in ("allreduce", "broadcast", "reduce_scatter", "allgather", "send/recv"):
        others = [o for o, ok in (("staged-gpu", comm.single_node and name == "allreduce"),
                                  ("nccl", nccl and name in ("allreduce", "broadcast"))) if ok]  # fmt: skip
        also = f" (also: {', '.join(others)})" if others else ""
        lines.append(f"device path:   {name}: {comm.device_path()}{also}")
    return lines


def gpu_header(comm: Communicator) -> list[str]:
    """Give each rank its GPU by its node-local rank (collective); the run header's lines about it.

    More ranks on a node than GPUs share them round-robin, and the header says so.
    """
    with comm.agreement():  # no cupy or no GPU on some rank: one error on every rank
        gpu, count = backend.select_device(comm.local_rank)
    chosen = comm.allgather_object((MPI.Get_processor_name(), gpu, count))
    lines = ["# GPUs (rank=host:GPU): " + " ".join(f"{r}={h}:{g}" for r, (h, g, _) in enumerate(chosen))]
    crowded = {host: n for host, _, n in chosen if sum(1 for h, _, _ in chosen if h == host) > n}
    for host, n in crowded.items():
        ranks = sum(1 for h, _, _ in chosen if h == host)
        lines.append(f"# note: {ranks} ranks share {n} GPU(s) on {host}, round-robin")
    lines.append(f"# CUDA-aware MPI: {comm.cuda_aware.describe()}; device collectives: {comm.device_path()}")
    return lines


def _evaluate_parser(prog: str) -> _Parser:
    p = _Parser(prog=f"{prog} evaluate", description="Loss, accuracy and confusion matrix of a --save file.")
    p.add_argument("--model-file", required=True, metavar="FILE.npz", help="what train --save wrote")
    p.add_argument("--dataset", default="digits", help="digits (default), synthetic, or a Keras-layout .npz")
    return p


def _run_evaluate(args: argparse.Namespace, comm: Communicator) -> None:
    threads.limit_threads(threads.ranks_sharing_cores(comm))
    result = inference.evaluate(comm, args.model_file, args.dataset)
    if result is not None:
        print(f"{args.model_file} on {args.dataset}: loss {result['loss']:.4f}  accuracy {result['accuracy']:.4f}  "
              f"({result['samples']} test samples)")  # fmt: skip
        confusion = result["confusion"]
        width = max(5, len(str(confusion.max())) + 1)
        print("confusion (rows: true class, columns: predicted)")
        print("     " + "".join(f"{c:>{width}}" for c in range(len(confusion))))
        for c, row in enumerate(confusion):
            print(f"{c:>5}" + "".join(f"{v:>{width}}" for v in row))


def _predict_parser(prog: str) -> _Parser:
    p = _Parser(prog=f"{prog} predict", description="Predicted labels of a --save file's model for new samples.")
    p.add_argument("--model-file", required=True, metavar="FILE.npz", help="what train --save wrote")
    p.add_argument("--input", required=True, metavar="X.npz", help="samples: an array named x (or the only one)")
    p.add_argument("--output", required=True, metavar="LABELS.npy", help="written by rank 0")
    return p


def _run_predict(args: argparse.Namespace, comm: Communicator) -> None:
    threads.limit_threads(threads.ranks_sharing_cores(comm))
    count = inference.predict(comm, args.model_file, args.input, args.output)
    if comm.rank == 0:
        print(f"# {count} labels written to {args.output}")


def _plot_parser(prog: str) -> _Parser:
    p = _Parser(prog=f"{prog} plot", description="Loss and accuracy curves of --metrics files, one line per run.")
    p.add_argument("runs", nargs="+", metavar="RUN.jsonl", help="what train --metrics wrote")
    p.add_argument("-o", "--output", default="curves.png", help="the image (default %(default)s)")
    return p


def _run_plot(args: argparse.Namespace, comm: Communicator) -> None:
    with comm.agreement():
        if comm.rank == 0:
            plot.plot(args.runs, args.output)
    if comm.rank == 0:
        print(f"# {len(args.runs)} run(s) drawn in {args.output}")


COMMANDS = {
    "train": (_train_parser, _run_train),
    "evaluate": (_evaluate_parser, _run_evaluate),
    "predict": (_predict_parser, _run_predict),
    "plot": (_plot_parser, _run_plot),
    "info": (_info_parser, _run_info),
    "bench": (_bench_parser, _run_bench),
}
BENCHMARKS = ("collectives", "training", "strategies", "pipeline", "timeline")


def parse(argv: Sequence[str], prog: str = "python -m mpitrain") -> argparse.Namespace:
    """Parse a command line; a missing or option-first command means ``train``.

    Raises:
        UsageError: on every rank, for any bad argument.
    """
    argv = list(argv)
    if argv[:1] in (["--version"], ["-V"]):
        if MPI.COMM_WORLD.Get_rank() == 0:
            print(f"mpitrain {__version__} (mpi4py {mpi4py.__version__}, {MPI.Get_library_version().splitlines()[0]})")
        raise SystemExit(0)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if command == "train" and argv[:1] in (["-h"], ["--help"]) and MPI.COMM_WORLD.Get_rank() == 0:
        print(f"usage: {prog} [{'|'.join(COMMANDS)}] [options]; the options of train follow\n")
    parser = COMMANDS[command][0](prog)
    if command == "train":
        argv = _with_config(parser, argv)
    args = parser.parse_args(argv)
    args.command = command
    if command == "train":
        _check_strategy_flags(parser, argv, args)
    return args


def _environment() -> Tuning:
    """Read the MPITRAIN_* variables (the same on every rank); a bad one is a usage error."""
    try:
        faults.planned()
        cuda_aware.detect(libraries=[])  # only MPITRAIN_CUDA_AWARE's value is checked here
        return Tuning.from_env()
    except ValueError as exc:
        raise UsageError(f"error in the environment: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (the same on every rank for known errors)."""
    rank = MPI.COMM_WORLD.Get_rank()
    _keep_running_when_a_peer_fails()
    _end_like_ctrl_c_on_sigterm()
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        log.setup(rank, MPI.COMM_WORLD.Get_size(), getattr(args, "log_level", "WARNING"))
        checked, timeout = getattr(args, "check_collectives", True), getattr(args, "timeout", None)
        COMMANDS[args.command][1](args, Communicator(checked=checked, tuning=_environment(), timeout=timeout))
    except UsageError as exc:
        if rank == 0:
            print(exc, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except KeyboardInterrupt as exc:
        _interrupted(rank, isinstance(exc, Terminated))
    except Exception as exc:  # noqa: BLE001 - decide between a clean exit and an abort
        if raised_on_all_ranks(exc):
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        # Raised on this rank alone: the others may be waiting on it, so end the whole job.
        print(f"[rank {rank}] unexpected error:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        abort_job(EXIT_ERROR)
    return 0


def _keep_running_when_a_peer_fails() -> None:
    """Ignore SIGUSR1 unless something handles it: with ``-disable-auto-cleanup`` MPICH's launcher
    sends it to every survivor when a rank dies, and its default action would end them at once,
    silently, before the watchdog names the dead rank (the job still ends: the watchdog aborts it,
    or the launcher's SIGKILL that follows)."""
    if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: a batch system's time limit or preemption (Slurm sends it to every task, then
    SIGKILL after its KillWait), ``scancel``, ``kill``. The run ends as on Ctrl-C."""


def _end_like_ctrl_c_on_sigterm() -> None:
    """Unless something handles SIGTERM, make it raise ``Terminated`` in the main thread, so the run ends
    with one message saying where it stood and which checkpoint to resume from, not silently."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:

        def terminate(signum: int, frame: object) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: a second would cut the message short
            raise Terminated

        signal.signal(signal.SIGTERM, terminate)


def _interrupted(rank: int, terminated: bool = False) -> None:
    """Ctrl-C or SIGTERM (``terminated``): one message from rank 0 (where the run stood and how to
    resume), then the whole job ends with EXIT_INTERRUPTED or EXIT_TERMINATED; no rank prints a
    traceback, none is left waiting in a collective."""
    if rank == 0:
        step, saved = STATUS.get("step", 0), STATUS.get("checkpoint")
        event = "terminated (SIGTERM)" if terminated else "interrupted"
        where = f"{event} at step {step}" if step else event
        if saved:
            hint = f"; newest checkpoint {saved}: add --resume to the same command to go on from it"
        elif STATUS.get("checkpoint_dir"):
            hint = "; no checkpoint was written yet"
        else:
            hint = "; no checkpoints were asked for (--checkpoint-dir DIR --checkpoint-every N keeps progress)"
        print(where + hint, file=sys.stderr, flush=True)
    # Rank 0 ends the job; the others only if it cannot (so the library reports one abort, not one per rank).
    abort_job(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED, GRACE if rank == 0 else 3 * GRACE)


def console_main() -> None:
    """Console-script entry point (``mpitrain``): exit with ``main()``'s code."""
    sys.exit(main())
