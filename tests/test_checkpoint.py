"""Checkpoint folders: round trip, per-rank shards, checksums, damaged files, atomicity, runs, format versions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain import checkpoint
from mpitrain.comm import Communicator, raised_on_all_ranks
from mpitrain.parallel import State
from tests.conftest import shared_folder


def state(step: int, rank: int) -> State:
    replicated = {"params": np.arange(10, dtype=np.float32) + step, "opt/momentum": np.full(10, step, np.float64)}
    return State(replicated, {"residual": np.full(4, rank + 100 * step, np.float32)}, {"epoch": step})


@pytest.fixture
def self_comm() -> Communicator:
    return Communicator(MPI.COMM_SELF)


@pytest.mark.mpi
def test_round_trip_gives_every_rank_its_own_shard(comm: Communicator, tmp_path) -> None:
    folder = shared_folder(tmp_path)
    for step in (5, 10, 15, 20):
        checkpoint.save(comm, folder, step, state(step, comm.rank), "run-a", keep=3)
    names = [os.path.basename(p) for p in checkpoint.checkpoints(folder)]
    found = checkpoint.load_newest(comm, folder)
    hidden = [p for p in os.listdir(folder) if p.startswith(".")]
    shards = sorted(os.listdir(os.path.join(folder, "ckpt-000000020")))
    assert names == ["ckpt-000000020", "ckpt-000000015", "ckpt-000000010"]
    assert found.path.endswith("ckpt-000000020") and not found.skipped and found.meta == {"epoch": 20}
    assert found.run_id == "run-a" and found.world_size == comm.size
    np.testing.assert_array_equal(found.state.replicated["params"], state(20, 0).replicated["params"])
    np.testing.assert_array_equal(found.state.local["residual"], state(20, comm.rank).local["residual"])
    assert shards == sorted(["manifest.json", "replicated.npz", *[f"rank-{r:05d}.npz" for r in range(comm.size)]])
    assert hidden == []


@pytest.mark.mpi
def test_a_shard_that_cannot_be_written_fails_the_checkpoint_on_every_rank_and_leaves_the_earlier_ones(
    comm: Communicator, tmp_path, monkeypatch
) -> None:
    folder = shared_folder(tmp_path)
    checkpoint.save(comm, folder, 5, state(5, comm.rank), "run-a", keep=3)
    failing = comm.size - 1
    if comm.rank == failing:  # this rank's disk is full

        def full(path: str, arrays: dict) -> str:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(checkpoint, "atomic_save_npz", full)
    try:
        checkpoint.save(comm, folder, 10, state(10, comm.rank), "run-a", keep=3)
        error = None
    except Exception as exc:  # noqa: BLE001 - checked below, on every rank
        error = exc
    monkeypatch.undo()
    comm.allreduce(np.zeros(1))  # every rank is past the failed save before rank 0 looks at the folder
    found = checkpoint.load_newest(comm, folder)
    assert error is not None and raised_on_all_ranks(error), error
    assert f"checkpoint 10 was not written to {folder}" in str(error), error
    assert f"rank {failing}: [Errno 28] No space left on device" in str(error), error
    assert sorted(os.listdir(folder)) == ["ckpt-000000005"]  # no partial checkpoint left behind
    assert found.path.endswith("ckpt-000000005") and not found.skipped


def test_another_world_reads_only_the_replicated_part(tmp_path, self_comm: Communicator) -> None:
    checkpoint.save(self_comm, str(tmp_path), 1, state(1, 0), "run", keep=1)
    manifest = tmp_path / "ckpt-000000001" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["world_size"] = 3  # as if written by 3 ranks: this one rank has no shard of its own to read
    manifest.write_text(json.dumps(data))
    found = checkpoint.load_newest(self_comm, str(tmp_path))
    assert found.world_size == 3 and found.state.local == {}
    np.testing.assert_array_equal(found.state.replicated["params"], state(1, 0).replicated["params"])


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "missing shard", "no manifest"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, self_comm, damage: str) -> None:
    checkpoint.save(self_comm, str(tmp_path), 1, state(1, 0), "run", keep=5)
    newest = Path(checkpoint.save(self_comm, str(tmp_path), 2, state(2, 0), "run", keep=5))
    target = newest / "replicated.npz"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        offset = data.index(np.float32(2.0).tobytes())  # inside the params payload
        data[offset] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "garbage":
        target.write_bytes(b"not a checkpoint at all")
    elif damage == "missing shard":
        (newest / "rank-00000.npz").unlink()
    else:
        (newest / "manifest.json").unlink()  # a half-written checkpoint has no manifest: not a checkpoint
    found = checkpoint.load_newest(self_comm, str(tmp_path))
    assert found.path.endswith("ckpt-000000001")
    np.testing.assert_array_equal(found.state.replicated["params"], state(1, 0).replicated["params"])
    if damage == "no manifest":
        assert found.skipped == []
    else:
        assert len(found.skipped) == 1 and "ckpt-000000002" in found.skipped[0], found.skipped


def test_every_checkpoint_damaged_or_none_at_all(tmp_path, self_comm) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load_newest(self_comm, str(tmp_path))
    only = Path(checkpoint.save(self_comm, str(tmp_path), 3, state(3, 0), "run", keep=2))
    (only / "replicated.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="no valid checkpoint") as info:
        checkpoint.load_newest(self_comm, str(tmp_path))
    assert raised_on_all_ranks(info.value)


def test_pruning_touches_only_this_runs_checkpoints(tmp_path, self_comm) -> None:
    for step in (100, 200, 300):
        checkpoint.save(self_comm, str(tmp_path), step, state(step, 0), "older-run", keep=5)
    for step in (1, 2, 3):
        checkpoint.save(self_comm, str(tmp_path), step, state(step, 0), "new-run", keep=2)
    names = [os.path.basename(p) for p in checkpoint.checkpoints(str(tmp_path))]
    assert names == ["ckpt-000000300", "ckpt-000000200", "ckpt-000000100", "ckpt-000000003", "ckpt-000000002"]
    assert checkpoint.runs(str(tmp_path)) == {"older-run": 300, "new-run": 3}


def test_newer_and_older_formats_are_refused_with_a_reason(tmp_path, self_comm) -> None:
    path = Path(checkpoint.save(self_comm, str(tmp_path / "new"), 1, state(1, 0), "run", keep=1))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format"] = checkpoint.FORMAT_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is newer than this mpitrain reads"):
        checkpoint.load_newest(self_comm, str(tmp_path / "new"))
    old = tmp_path / "old"
    old.mkdir()
    np.savez(old / "ckpt-000000010.npz", params=np.zeros(3))  # format 1: one file per checkpoint
    with pytest.raises(ValueError, match="format-1 checkpoints") as info:
        checkpoint.load_newest(self_comm, str(old))
    assert raised_on_all_ranks(info.value)
    with pytest.raises(ValueError, match="keep must be at least 1"):
        checkpoint.save(self_comm, str(tmp_path), 2, state(2, 0), "run", keep=0)


def test_atomic_save_leaves_no_temporary_files(tmp_path) -> None:
    digest = checkpoint.atomic_save_npz(str(tmp_path / "a.npz"), {"x": np.arange(3)})
    assert os.listdir(tmp_path) == ["a.npz"] and len(digest) == 64
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.atomic_save_npz(str(tmp_path / "nowhere" / "a.npz"), {"x": np.arange(3)})
