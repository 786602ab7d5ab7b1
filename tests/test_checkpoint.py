"""Checkpoint files: round trip, checksum, damaged files, format version, pruning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mpitrain import checkpoint


def arrays(step: int) -> dict[str, np.ndarray]:
    return {"params": np.arange(10, dtype=np.float32) + step, "opt/momentum": np.full(10, step, np.float64)}


def test_round_trip_and_keep_prunes_old_files(tmp_path) -> None:
    for step in (5, 10, 15, 20):
        checkpoint.save(str(tmp_path), step, arrays(step), {"epoch": step}, keep=3)
    assert [os.path.basename(p) for p in checkpoint.checkpoints(str(tmp_path))] == [
        "ckpt-000000020.npz", "ckpt-000000015.npz", "ckpt-000000010.npz",
    ]  # fmt: skip
    loaded, meta, path, skipped = checkpoint.load_newest(str(tmp_path))
    assert path.endswith("ckpt-000000020.npz") and not skipped and meta["epoch"] == 20
    assert meta["format"] == checkpoint.FORMAT_VERSION
    for name, value in arrays(20).items():
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].dtype == value.dtype
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_newest_file_falls_back_to_the_previous_one(tmp_path, damage: str) -> None:
    checkpoint.save(str(tmp_path), 1, arrays(1), {}, keep=5)
    newest = checkpoint.save(str(tmp_path), 2, arrays(2), {}, keep=5)
    data = bytearray(Path(newest).read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        offset = data.index(np.float32(2.0).tobytes())  # inside the params payload
        data[offset] ^= 0x01
    else:
        data = bytearray(b"not a checkpoint at all")
    Path(newest).write_bytes(bytes(data))
    loaded, _, path, skipped = checkpoint.load_newest(str(tmp_path))
    assert path.endswith("ckpt-000000001.npz")
    np.testing.assert_array_equal(loaded["params"], arrays(1)["params"])
    assert len(skipped) == 1 and "ckpt-000000002.npz" in skipped[0]
    assert "unreadable checkpoint" in skipped[0]  # the flipped bit trips the zip's own CRC


def test_consistent_zip_with_altered_payload_fails_the_checksum(tmp_path) -> None:
    path = checkpoint.save(str(tmp_path), 1, arrays(1), {}, keep=1)
    with np.load(path) as archive:
        payload = {name: archive[name] for name in archive.files}
    payload["params"] = payload["params"] + 1  # rewritten as a valid zip, old sha256 kept
    np.savez(path, **payload)
    with pytest.raises(ValueError, match="checksum mismatch"):
        checkpoint.load(path)


def test_every_file_damaged_or_none_at_all(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load_newest(str(tmp_path))
    only = checkpoint.save(str(tmp_path), 3, arrays(3), {}, keep=2)
    Path(only).write_bytes(b"x")
    with pytest.raises(ValueError, match="no valid checkpoint"):
        checkpoint.load_newest(str(tmp_path))


def test_newer_format_and_foreign_files_are_refused(tmp_path) -> None:
    path = checkpoint.save(str(tmp_path), 1, arrays(1), {}, keep=1)
    loaded, meta = checkpoint.load(path)
    meta["format"] = checkpoint.FORMAT_VERSION + 1
    payload = {**loaded, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    payload["sha256"] = np.frombuffer(checkpoint.digest(payload).encode(), np.uint8)
    checkpoint.atomic_save_npz(path, payload)
    with pytest.raises(ValueError, match="is newer than this mpitrain reads"):
        checkpoint.load(path)
    other = tmp_path / "plain.npz"
    np.savez(other, params=np.zeros(3))
    with pytest.raises(ValueError, match="not an mpitrain checkpoint"):
        checkpoint.load(str(other))
    with pytest.raises(ValueError, match="keep must be at least 1"):
        checkpoint.save(str(tmp_path), 2, arrays(2), {}, keep=0)
