"""Checkpoints: one folder per checkpoint, one shard per rank, written atomically as a whole.

A checkpoint ``ckpt-000000020/`` (the global step) holds

- ``replicated.npz``: state that is the same on every rank, written once by rank 0;
- ``rank-00003.npz``: each rank's own state (random streams' positions,
  error-feedback residuals, a server's parameter range, its epoch totals);
- ``manifest.json``: the format version, the run's id, the world size,
  JSON metadata, and the sha256 of every file, written last.

Every rank writes its shard into a hidden temporary folder (a file system
all ranks see, as for any multi-rank checkpoint), each file fsynced; rank 0
then writes the manifest and renames the folder into place, so a reader
sees the whole checkpoint or none of it, and the newest folder whose files
all match the manifest wins. ``.npz`` files never hold pickles. Pruning
removes only the checkpoints of the run that writes (its ``run_id``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpitrain.comm import Communicator, mark_all_ranks, raised_on_all_ranks
from mpitrain.nn import Module
from mpitrain.parallel.base import State

FORMAT_VERSION = 2
PATTERN = "ckpt-{step:09d}"
MANIFEST = "manifest.json"
REPLICATED = "replicated.npz"
_NAME = re.compile(r"ckpt-(\d{9})$")
_OLD_NAME = re.compile(r"ckpt-(\d{9})\.npz$")  # format 1: one file per checkpoint


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(f: Any) -> str:
    h = hashlib.sha256()
    while block := f.read(1 << 20):
        h.update(block)
    return h.hexdigest()


def atomic_save_npz(path: str, arrays: dict[str, np.ndarray]) -> str:
    """Write ``arrays`` to ``path`` as .npz via a temporary file in the same folder, fsync, rename;
    return the file's sha256.

    Raises:
        FileNotFoundError: the destination folder does not exist.
    """
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_write_json(path: str, value: Any) -> str:
    """Write ``value`` to ``path`` as JSON, atomically as ``atomic_save_npz``; return the file's sha256."""
    return atomic_write(path, lambda f: f.write(json.dumps(value, indent=1, default=str).encode()))


def atomic_write(path: str, write: Any) -> str:
    """Write ``path`` through ``write(file)`` into a temporary file in the same folder, fsync, rename;
    return the file's sha256 (a reader sees the old file or the whole new one)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            checksum = _sha256(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_folder(folder)  # make the rename itself durable
    return checksum


@dataclass
class Found:
    """A checkpoint read back: this rank's State, the manifest's meta, where it was, what was skipped."""

    state: State
    meta: dict[str, Any]
    path: str
    world_size: int
    run_id: str
    skipped: list[str]


def checkpoints(folder: str) -> list[str]:
    """Complete checkpoint folders (with a manifest) in ``folder``, newest (highest step) first."""
    found = [p for p in glob.glob(os.path.join(folder, "ckpt-*")) if _NAME.search(p) and _has_manifest(p)]
    return sorted(found, key=lambda p: int(_NAME.search(p).group(1)), reverse=True)


def _has_manifest(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def runs(folder: str) -> dict[str, int]:
    """The run ids of the complete checkpoints in ``folder``, each with its newest step."""
    newest: dict[str, int] = {}
    for path in checkpoints(folder):
        try:
            run = _manifest(path)["run_id"]
        except ValueError:
            continue
        newest.setdefault(run, int(_NAME.search(path).group(1)))
    return newest


def save(comm: Communicator, folder: str, step: int, state: State, run_id: str, keep: int) -> str:
    """Write checkpoint ``step`` of run ``run_id`` into ``folder`` (collective) and keep this run's
    newest ``keep``; returns the checkpoint's path.

    Raises (on every rank) when any rank cannot write its part, a full disk
    say: the partial checkpoint is removed and the earlier ones stay, and the
    message names the step, the folder and what went wrong on which rank.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    final = os.path.join(folder, PATTERN.format(step=step))
    tmp = os.path.join(folder, f".tmp-{os.path.basename(final)}-{run_id}")
    try:
        _write(comm, folder, tmp, step, state, run_id)
    except Exception as exc:
        if not raised_on_all_ranks(exc):
            raise
        if comm.rank == 0:  # every rank is past writing: the agreement that raised this was collective
            shutil.rmtree(tmp, ignore_errors=True)
        raise mark_all_ranks(
            type(exc)(f"checkpoint {step} was not written to {folder} (the checkpoints before it stay): {exc}")
        ) from exc
    with comm.agreement():
        if comm.rank == 0:
            if os.path.exists(final):  # the same step written again (a resumed run): the new one wins
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_folder(folder)
            mine = [p for p in checkpoints(folder) if _run_of(p) == run_id]
            for old in mine[keep:]:
                shutil.rmtree(old)
    return final


def _write(comm: Communicator, folder: str, tmp: str, step: int, state: State, run_id: str) -> None:
    """Every rank's shard, the replicated state and the manifest into the folder ``tmp`` (collective)."""
    with comm.agreement():
        if comm.rank == 0:
            os.makedirs(folder, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a crash's leftover of this very checkpoint
            os.makedirs(tmp)
    with comm.agreement():
        files = {
            f"rank-{comm.rank:05d}.npz": atomic_save_npz(os.path.join(tmp, f"rank-{comm.rank:05d}.npz"), state.local)
        }
        if comm.rank == 0:
            files[REPLICATED] = atomic_save_npz(os.path.join(tmp, REPLICATED), state.replicated)
    everything = {name: digest for part in comm.gather_object(files) or [] for name, digest in part.items()}
    with comm.agreement():
        if comm.rank == 0:
            manifest = {
                "format": FORMAT_VERSION,
                "run_id": run_id,
                "step": step,
                "world_size": comm.size,
                "meta": state.meta,
                "files": everything,
            }
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(manifest, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_folder(tmp)


def _run_of(path: str) -> str | None:
    try:
        return _manifest(path)["run_id"]
    except ValueError:
        return None


def _manifest(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from exc
    if manifest.get("format", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {manifest['format']} is newer than this mpitrain reads ({FORMAT_VERSION})"
        )
    return manifest


def _read(path: str, name: str, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """One file of a checkpoint, verified against the manifest's sha256."""
    file = os.path.join(path, name)
    expected = manifest["files"].get(name)
    if expected is None:
        raise ValueError(f"{path}: the manifest lists no {name}")
    try:
        with open(file, "rb") as f:
            if _sha256(f) != expected:
                raise ValueError(f"{file}: checksum mismatch, the file is corrupted")
        with np.load(file, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except OSError as exc:
        raise ValueError(f"{file}: unreadable ({type(exc).__name__}: {exc})") from exc


def load_newest(comm: Communicator, source: str) -> Found:
    """The newest checkpoint in ``source`` (a folder of them, or one checkpoint folder) that every rank
    reads intact (collective); damaged newer ones are skipped and reported in ``Found.skipped``.

    Raises (on every rank):
        FileNotFoundError: no checkpoint there.
        ValueError: every checkpoint is damaged, or the folder holds only format-1 files.
    """
    paths = [source] if _has_manifest(source) else checkpoints(source)
    if not paths:
        old = [p for p in glob.glob(os.path.join(source, "ckpt-*.npz")) if _OLD_NAME.search(p)]
        if old:
            raise mark_all_ranks(
                ValueError(
                    f"{source} holds format-1 checkpoints (ckpt-*.npz files, written by mpitrain 0.1); this "
                    f"version reads format {FORMAT_VERSION} (one folder per checkpoint): resume them with the "
                    "version that wrote them"
                )
            )
        raise mark_all_ranks(FileNotFoundError(f"{source}: no checkpoint (ckpt-*/{MANIFEST}) to resume from"))
    skipped: list[str] = []
    for path in paths:
        problem, found = None, None
        try:
            manifest = _manifest(path)
            same_world = manifest["world_size"] == comm.size
            local = _read(path, f"rank-{comm.rank:05d}.npz", manifest) if same_world else {}
            state = State(_read(path, REPLICATED, manifest), local, manifest["meta"])
            found = Found(state, manifest["meta"], path, manifest["world_size"], manifest["run_id"], skipped)
        except (ValueError, KeyError) as exc:
            problem = f"rank {comm.rank}: {exc}"
        problems = [p for p in comm.allgather_object(problem) if p is not None]
        if not problems:
            return found
        skipped.append(problems[0])
    raise mark_all_ranks(ValueError("no valid checkpoint to resume from: " + "; ".join(skipped)))


def read_parameters(path: str, model: Module) -> dict[str, np.ndarray]:
    """A whole model's parameters by dotted name, for ``--init-from``: from a ``.npz`` that ``--save``
    wrote, or from the newest checkpoint in ``path`` (a folder of them, or one), whose replicated flat
    ``params`` (any strategy that holds the whole model there: data parallel, parameter servers,
    local replicas' consensus, a pipeline) is cut by ``model``'s layout (``Module.flat_layout``).

    Raises:
        FileNotFoundError: nothing there. ValueError: the file holds no whole model of this size.
    """
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--init-from {path}: no such file or checkpoint folder")
        with np.load(path, allow_pickle=False) as f:
            return {name: f[name] for name in f.files}
    paths = [path] if _has_manifest(path) else checkpoints(path)
    if not paths:
        raise FileNotFoundError(f"--init-from {path}: no checkpoint (ckpt-*/{MANIFEST}) there")
    flat = _read(paths[0], REPLICATED, _manifest(paths[0])).get("params")
    layout = model.flat_layout()
    size = layout[-1][2] if layout else 0
    if flat is None or flat.size != size:
        held = "no whole-model parameters" if flat is None else f"{flat.size} parameters"
        raise ValueError(f"--init-from {paths[0]}: holds {held}; this model has {size}")
    shapes = {name: p.shape for name, p in model.named_parameters()}
    return {name: flat[a:b].reshape(shapes[name]) for name, a, b in layout}
