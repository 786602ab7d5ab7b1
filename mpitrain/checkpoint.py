"""Checkpoints: atomic, checksummed ``.npz`` files (no pickle), the last K kept, the newest valid one found.

A checkpoint is one ``.npz`` holding named arrays plus ``meta``, a JSON
document stored as bytes, and ``sha256``, the hex digest of everything else
(names, dtypes, shapes and bytes, in name order). It is written to a
temporary file in the same folder, fsynced, renamed into place and the
folder fsynced: a reader sees the old set of files or the new one, never half
a file. Loading verifies the digest and the format version; a damaged newest
file is reported and the previous one used.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from typing import Any

import numpy as np

FORMAT_VERSION = 1
PATTERN = "ckpt-{step:09d}.npz"
_NAME = re.compile(r"ckpt-(\d{9})\.npz$")


def atomic_save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` as .npz via a temporary file in the same folder, fsync, rename.

    Raises:
        FileNotFoundError: the destination folder does not exist.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``arrays``, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(folder: str, step: int, arrays: dict[str, np.ndarray], meta: dict[str, Any], keep: int) -> str:
    """Write checkpoint ``step`` into ``folder`` and delete all but the newest ``keep``; return its path."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    os.makedirs(folder, exist_ok=True)
    payload = {**arrays, "meta": np.frombuffer(json.dumps({**meta, "format": FORMAT_VERSION}).encode(), np.uint8)}
    payload["sha256"] = np.frombuffer(digest(payload).encode(), np.uint8)
    path = os.path.join(folder, PATTERN.format(step=step))
    atomic_save_npz(path, payload)
    for old in checkpoints(folder)[keep:]:
        os.unlink(old)
    return path


def checkpoints(folder: str) -> list[str]:
    """Checkpoint files in ``folder``, newest (highest step) first."""
    found = [p for p in glob.glob(os.path.join(folder, "ckpt-*.npz")) if _NAME.search(p)]
    return sorted(found, key=lambda p: int(_NAME.search(p).group(1)), reverse=True)


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify one checkpoint; returns (arrays, meta).

    Raises:
        ValueError: unreadable, truncated, checksum mismatch, missing parts, or
            a format newer than this version understands.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as exc:
        raise ValueError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if "sha256" not in arrays or "meta" not in arrays:
        raise ValueError(f"{path}: not an mpitrain checkpoint (no meta or sha256)")
    stored = arrays.pop("sha256").tobytes().decode(errors="replace")
    if digest(arrays) != stored:
        raise ValueError(f"{path}: checksum mismatch, the file is corrupted")
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    if meta.get("format", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {meta['format']} is newer than this mpitrain reads ({FORMAT_VERSION})"
        )
    return arrays, meta


def load_newest(source: str) -> tuple[dict[str, np.ndarray], dict[str, Any], str, list[str]]:
    """The newest valid checkpoint from a folder (or the one file named); also the problems skipped on the way.

    Returns (arrays, meta, path, skipped) where ``skipped`` says, per newer
    file that failed, why it was passed over.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: every checkpoint there is damaged (the message lists why).
    """
    paths = [source] if os.path.isfile(source) else checkpoints(source)
    if not paths:
        raise FileNotFoundError(f"{source}: no checkpoint (ckpt-*.npz) to resume from")
    skipped = []
    for path in paths:
        try:
            arrays, meta = load(path)
        except ValueError as exc:
            skipped.append(str(exc))
            continue
        return arrays, meta, path, skipped
    raise ValueError("no valid checkpoint to resume from: " + "; ".join(skipped))
