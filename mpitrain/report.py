"""What a run tells and writes besides its checkpoints: the output checks made before training, the
header, one line (and --metrics record) per epoch, the closing summary, and the --timeline file.

Rank 0 prints and writes, except the timeline, which every rank's spans feed (a collective).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from mpitrain import checkpoint, log
from mpitrain.comm import Communicator
from mpitrain.data import Dataset, scale_spread
from mpitrain.parallel import Strategy
from mpitrain.timeline import MAX_EVENTS, SPANS, clock, parse_window, trace_document, trace_events

if TYPE_CHECKING:
    from mpitrain.train import TrainConfig

SPREAD_WARNING = 1e3  # feature deviations this many times apart: the header suggests --standardize
# The per-phase breakdown of each metrics record (seconds of this rank's steps in the epoch).
PHASES = ("data", "forward", "backward", "exposed_comm", "optimizer", "allreduce")


@contextlib.contextmanager
def output(comm: Communicator, option: str, path: str | None) -> Iterator[None]:
    """A block in which rank 0 writes the file of ``option`` (collective): an OSError there, a full disk
    say, is one error on every rank naming the option and the file, not a traceback and an abort."""
    with comm.agreement():
        try:
            yield
        except OSError as exc:
            raise OSError(f"{option} {path}: {exc.strerror or exc}") from exc


def check_outputs(config: TrainConfig, leader: bool = True) -> None:
    """Check every output destination before any training: a folder that exists for --save and
    --metrics (and not a folder as the file; rank 0, the ``leader``, writes them), a writable
    checkpoint folder (every rank writes its shard).

    Raises:
        ValueError / FileNotFoundError: naming the option and what is wrong.
    """
    for option, path in (("--save", config.save), ("--metrics", config.metrics), ("--timeline", config.timeline)):
        if not path or not leader:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise ValueError(f"{option} {path}: is a directory; give a file name")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{option} {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise ValueError(f"{option} {path}: not writable")
    if config.checkpoint_dir:
        folder = config.checkpoint_dir
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"--checkpoint-dir {folder}: exists and is not a directory")
        parent = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ValueError(f"--checkpoint-dir {folder}: cannot be created or written")


def changed_options(config: TrainConfig) -> dict[str, Any]:
    """The effective options that differ from the defaults (the loop's and the strategy's), by name."""
    mine, defaults = config.as_json(), type(config)(strategy=config.strategy).as_json()
    changed = {k: v for k, v in mine.items() if k != "options" and v != defaults[k] and k != "progress"}
    changed.update({k: v for k, v in mine["options"].items() if v != defaults["options"][k]})
    return changed


def header(config: TrainConfig, comm: Communicator, strategy: Strategy, data: Dataset, steps: int) -> None:
    """The run header (rank 0): model, data, layout over the ranks, options that differ from the defaults,
    and the job-wide warnings about the data and the batch."""
    shards = type(strategy).data_shards(config.options, comm.size)
    readers = f"{comm.size} rank(s)" if shards == comm.size else f"{comm.size} rank(s), {shards} data shard(s)"
    print(
        f"# {config.model} on {data.name}: {strategy.num_parameters()} parameters, {len(data.x_train)} train / "
        f"{len(data.x_test)} test samples, {readers} x batch {config.batch_size}, {steps} steps/epoch, "
        f"strategy {config.strategy}",
        flush=True,
    )
    if config.scale_lr:
        lr, warmup = config.scaled_lr(shards, steps)
        print(f"# --scale-lr: lr {config.lr:g} x {shards} data shard(s) = {lr:g}, warmed up over {warmup} steps",
              flush=True)  # fmt: skip
    changed = changed_options(config)
    if changed:
        shown = (f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in changed.items())
        print("# options: " + " ".join(shown), flush=True)
    layout = strategy.describe()
    if layout:
        print(f"# {layout}", flush=True)
    compression = getattr(config.options, "compression", "none")
    if compression != "none" and comm.size > 1 and comm.single_node:
        print(
            f"# note: every rank is on this node, so no gradient crosses a network: --compression "
            f"{compression} only adds work here (it pays between nodes)",
            flush=True,
        )
    spread = scale_spread(data.x_train) if not config.standardize else 1.0
    if spread >= SPREAD_WARNING:
        log.job_warning(
            f"the features' scales differ {spread:.0e}-fold (standard deviations); --standardize "
            "trains on them centred and scaled, and the saved model applies the same to evaluate / predict"
        )
    global_batch = config.batch_size * shards
    if global_batch > len(data.x_train):
        log.job_warning(
            f"{readers} x batch {config.batch_size} = {global_batch} exceeds the "
            f"{len(data.x_train)} training samples: each epoch repeats samples to fill one step"
        )


def open_metrics(config: TrainConfig) -> Any:
    """The --metrics file (appended to on a resume), or None; rank 0 writes it, and beside it
    ``FILE.config.json``: the run's whole effective configuration."""
    if not config.metrics:
        return None
    checkpoint.atomic_write_json(os.path.splitext(config.metrics)[0] + ".config.json", config.as_json())
    return open(config.metrics, "a" if config.resume else "w")  # closed at the end of _run


def _plain(value: Any) -> Any:
    """A record's value as JSON takes it: ints stay ints, lists (per-stage counts) stay lists, the rest floats."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, int) else float(value)


def epoch_line(record: dict[str, Any], metrics_file: Any, breakdown: bool = False) -> None:
    """Print an epoch's record as one line (with ``breakdown``, its phases too) and append it to the
    --metrics file, if any."""
    line = (
        f"epoch {record['epoch']:3d}  loss {record['loss']:.4f}  train_acc {record['train_acc']:.4f}  "
        f"test_acc {record['test_acc']:.4f}  {record['samples_per_s']:,.0f} samples/s  {record['time_s']:.2f} s"
    )
    if breakdown:  # what the main thread spent its steps on (allreduce: the overlapped worker's time)
        line += "  |" + "".join(f" {name} {record[name + '_s']:.3f}s" for name in PHASES)
    print(line, flush=True)
    if metrics_file is not None:
        metrics_file.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        metrics_file.flush()


def summary(
    config: TrainConfig, history: list[dict[str, Any]], seconds: float, stopped_at: Any, newest: str | None
) -> None:
    """The run's last line: where it ended, the final accuracy, its time and speed, and what it wrote."""
    parts = [f"# done in {seconds:.2f} s"]
    if history:
        last = history[-1]
        speed = float(np.median([r["samples_per_s"] for r in history]))
        parts[0] += f": epoch {last['epoch']}, test_acc {last['test_acc']:.4f}, {speed:,.0f} samples/s (median epoch)"
    if stopped_at is not None:
        parts.append(f"stopped by --max-steps {config.max_steps} at step {stopped_at[0]}, inside epoch {stopped_at[1]}")
    written = [("metrics", config.metrics), ("model", config.save), ("newest checkpoint", newest)]
    written.append(("timeline", config.timeline))
    parts += [f"{what} {path}" for what, path in written if path]
    print("; ".join(parts), flush=True)


def start_timeline(config: TrainConfig, comm: Communicator) -> tuple[int, int] | None:
    """Forget earlier spans; with --timeline, the window of steps to record, and every rank's clock zero
    taken right after one collective, so the ranks' tracks line up (to that collective's skew)."""
    SPANS.reset()
    if not config.timeline:
        return None
    comm.allreduce(np.zeros(1))
    SPANS.zero = clock()
    return parse_window(config.timeline_steps)


def write_timeline(config: TrainConfig, comm: Communicator) -> None:
    """Gather every rank's recorded spans to rank 0 and write the --timeline file (collective)."""
    SPANS.recording = False
    mine = trace_events(comm.rank, SPANS.zero, SPANS.events, threading.main_thread().ident)
    gathered = comm.gather_object((mine, SPANS.dropped))
    with output(comm, "--timeline", config.timeline):
        if gathered is not None:
            dropped = sum(d for _, d in gathered)
            meta = {"steps": config.timeline_steps, "ranks": comm.size, "dropped_events": dropped}
            document = trace_document([e for e, _ in gathered], meta)
            checkpoint.atomic_write(config.timeline, lambda f: f.write(document))
            if dropped:
                print(f"# timeline: {dropped} span(s) past {MAX_EVENTS} per rank not recorded: narrow "
                      "--timeline-steps", flush=True)  # fmt: skip
