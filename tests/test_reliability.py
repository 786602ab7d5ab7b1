"""Exact resume, non-finite guard, watchdog, call-order fingerprints, and faults injected into real jobs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain import checkpoint, faults, report
from mpitrain.comm import Communicator, raised_on_all_ranks
from mpitrain.comm.watchdog import ABORT_WAIT, EXIT_PEER_EXITED, EXIT_TIMEOUT, FINISHED, Peer, Watchdog, process_start
from mpitrain.jobs import child_environment, mpiexec_command
from mpitrain.train import TrainConfig, train, train_config
from tests.conftest import WORLD, run_mpitrain, shared_folder


def config(folder: str, **options) -> TrainConfig:
    base = {"epochs": 2, "progress": False, "hidden": (32,), "batch_size": 16, "checkpoint_dir": folder}
    return train_config(**{**base, **options})


@pytest.mark.mpi
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"optimizer": "adamw", "lr": 0.003, "schedule": "cosine", "warmup_steps": 5, "compression": "topk:0.2"},
        {"dropout": 0.3},  # the masks' random streams are part of the checkpoint
        {"optimizer": "adamw", "lr": 0.003, "shard_optimizer": True},  # the state is consolidated for the checkpoint
    ],
)
def test_resume_mid_epoch_is_bit_identical(comm: Communicator, tmp_path, options: dict) -> None:
    folder = shared_folder(tmp_path)
    whole = train(config(None, **options), comm)
    stopped = train(config(folder, checkpoint_every=5, max_steps=13, **options), comm)  # killed after step 13
    resumed = train(config(folder, resume=folder, **options), comm)
    assert stopped.history == []
    assert resumed.model.flat_params.tobytes() == whole.model.flat_params.tobytes()
    assert resumed.history[-1]["loss"] == whole.history[-1]["loss"]  # epoch metrics carried over exactly


@pytest.mark.mpi
def test_resume_refuses_another_model(comm: Communicator, tmp_path) -> None:
    folder = shared_folder(tmp_path)
    train(config(folder, epochs=1), comm)
    with pytest.raises(ValueError) as info:
        train(config(folder, resume=folder, hidden=(16,)), comm)
    assert "this run has hidden=[16]" in str(info.value) and raised_on_all_ranks(info.value)


@pytest.mark.mpi
def test_resume_on_another_world_size_carries_parameters(comm: Communicator, tmp_path) -> None:
    folder = shared_folder(tmp_path)
    stopped = train(config(folder, checkpoint_every=7, max_steps=7), comm).model.flat_params.copy()
    ok = True
    if comm.rank == 0:  # one rank alone picks up what the whole world wrote
        alone = Communicator(MPI.COMM_SELF)
        found = checkpoint.load_newest(alone, folder)
        resumed = train(config(folder, resume=folder, max_steps=7), alone).model.flat_params
        ok = found.world_size == comm.size and np.array_equal(resumed, stopped)
    assert WORLD.allreduce(ok, op=MPI.LAND)


@pytest.mark.mpi
@pytest.mark.parametrize("shard", [False, True])
@pytest.mark.parametrize("policy", ["abort", "skip"])
def test_nonfinite_gradients(comm: Communicator, monkeypatch, policy: str, shard: bool) -> None:
    culprit = comm.size - 1
    monkeypatch.setenv(faults.VARIABLE, f"nan:{culprit}:3")
    faults.planned.cache_clear()
    try:
        if policy == "abort":
            with pytest.raises(FloatingPointError) as info:
                train(config(None, nonfinite="abort", shard_optimizer=shard), comm)
            assert "step 3: non-finite gradients" in str(info.value) and f"ranks [{culprit}]" in str(info.value)
            assert raised_on_all_ranks(info.value)
        else:
            result = train(config(None, nonfinite="skip", epochs=1, shard_optimizer=shard), comm)
            assert result.history[-1]["skipped_steps"] == 1
            assert np.isfinite(result.model.flat_params).all()
    finally:
        faults.planned.cache_clear()


class _FullFile:
    """A --metrics file on a full disk: every write fails."""

    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


def _full(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.mpi
@pytest.mark.parametrize(
    "option,module,writer,fake",
    [
        ("metrics", report, "open_metrics", lambda config: _FullFile()),
        ("save", checkpoint, "atomic_save_npz", _full),
        ("timeline", checkpoint, "atomic_write", _full),
    ],
)
def test_an_output_rank_0_cannot_write_is_one_error_on_every_rank(
    comm: Communicator, tmp_path, monkeypatch, option: str, module, writer: str, fake
) -> None:
    path = os.path.join(shared_folder(tmp_path), f"out.{option}")
    if comm.rank == 0:  # rank 0 writes every one of them; its disk is full
        monkeypatch.setattr(module, writer, fake)
    with pytest.raises(OSError) as info:
        train(config(None, epochs=1, batch_size=64, **{option: path}), comm)
    monkeypatch.undo()
    assert raised_on_all_ranks(info.value)
    assert str(info.value) == f"rank 0: --{option} {path}: No space left on device", info.value


@pytest.mark.mpi(min_size=2)
def test_collectives_in_a_different_order_name_both_calls(comm: Communicator) -> None:
    buf = np.zeros(8)
    with pytest.raises(ValueError) as info:
        if comm.rank == 0:
            comm.broadcast(buf)
        else:
            comm.allreduce(buf)
    message = str(info.value)
    assert "ranks disagree" in message and "collective=broadcast" in message and "collective=allreduce" in message
    assert f"seq={comm.sequence}" in message


def test_watchdog_reports_what_it_waited_in_and_aborts() -> None:
    codes: list[int] = []
    progress = [np.zeros(2, np.int64) for _ in range(3)]
    dog = Watchdog(0, 0.3, progress[0], [Peer(r, a) for r, a in enumerate(progress)], abort=codes.append, grace=0)
    progress[1][0] = 7  # rank 1 entered collective 7, rank 2 did not
    with dog.watch("allreduce #7 (100 x float32)", 7):
        deadline = time.monotonic() + 5
        while not codes and time.monotonic() < deadline:
            time.sleep(0.05)
    assert codes == [EXIT_TIMEOUT]
    assert "allreduce #7" in dog.fired and "have not entered it: [2]" in dog.fired
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Watchdog(0, 0)


def _fired_after(dog: Watchdog, codes: list[int]) -> float:
    began = time.monotonic()
    while not codes and time.monotonic() - began < 5:
        time.sleep(0.01)
    return time.monotonic() - began


@pytest.mark.parametrize("waiting", [False, True])
def test_a_wait_on_other_ranks_is_reported_after_a_stuck_rank_would_be(waiting: bool) -> None:
    # Defect: a rank waiting on a stalled peer could report first, naming the wrong rank. Waits get
    # two polls' grace (poll: timeout / 4 here), and inside a step only the innermost region counts.
    codes: list[int] = []
    dog = Watchdog(0, 0.4, abort=codes.append, grace=0)
    with dog.watch("training step 3"), dog.watch("recv from rank 2", waiting=waiting):
        seconds = _fired_after(dog, codes)
    assert codes == [EXIT_TIMEOUT] and "recv from rank 2" in dog.fired  # the inner region, not the step
    assert seconds >= (0.4 + 2 * 0.1 if waiting else 0.4), seconds
    dog.stop()


@pytest.mark.parametrize("case", ["unfinished", "finished", "another process"])
def test_watchdog_names_a_peer_that_exits_unfinished(case: str) -> None:
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfds on this platform")
    codes: list[int] = []
    progress = [np.zeros(2, np.int64) for _ in range(2)]
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    finished = case != "unfinished"  # the third case is not the rank's process: nothing to report either
    # "another process": the pid as seen here started at another time (another process, or another pid namespace).
    start = process_start(peer.pid) + (1 if case == "another process" else 0)
    try:
        peers = [Peer(0, progress[0], os.getpid(), process_start()), Peer(1, progress[1], peer.pid, start)]
        dog = Watchdog(0, 60, progress[0], peers, abort=codes.append, grace=0)
        progress[1][FINISHED] = int(case == "finished")
        peer.kill()
        peer.wait()
        deadline = time.monotonic() + (1 if finished else 10)
        while not codes and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        peer.kill()
    if finished:  # a peer that finished cleanly may leave
        assert codes == [] and dog.fired is None
    else:
        assert codes == [EXIT_PEER_EXITED]
        assert f"rank 1 (pid {peer.pid} on this node) exited before the job finished" in dog.fired
    dog.stop()
    assert progress[0][FINISHED] == 1


def test_fault_variable_is_validated(monkeypatch) -> None:
    monkeypatch.setenv(faults.VARIABLE, "explode:1:2")
    faults.planned.cache_clear()
    with pytest.raises(ValueError, match="ACTION:RANK:STEP"):
        faults.planned()
    faults.planned.cache_clear()


ATTEMPTS = 3  # runs of a job with a killed rank, when the launcher silenced every survivor


def _rerun_while_only_the_launcher_spoke(run: Callable[[int], tuple[subprocess.CompletedProcess, float]]):
    """``run(attempt)``, a job in which a rank is killed, again while only the launcher reported the
    death, at most ``ATTEMPTS`` times; (the finished process, its seconds) of the last run.

    MPICH's Hydra SIGKILLs the survivors about a millisecond after a rank
    dies, ``-disable-auto-cleanup`` or not (strace on its proxy), and their
    watchdog thread first needs the GIL: about 1 run in 10 here ends with
    Hydra's ``Killed (signal 9)`` alone, before any survivor's line is out.
    Only such a run is tried again; the caller's assertions are unchanged.
    """
    for attempt in range(ATTEMPTS):
        done, seconds = run(attempt)
        output = done.stdout + done.stderr
        if "EXIT STRING: Killed (signal 9)" not in output or "exited before the job finished" in output:
            break
    return done, seconds


def _timed_run(fault: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """A 3-rank ``python -m mpitrain`` job with ``fault`` injected; (the finished process, its seconds)."""
    start = time.monotonic()
    done = run_mpitrain(3, *args, timeout=120, extra_env={faults.VARIABLE: fault})
    return done, time.monotonic() - start


def _faulty_run(folder, fault: str, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    return _timed_run(
        fault, "--no-progress", "--epochs", "3", "--checkpoint-dir", str(folder), "--checkpoint-every", "10", *extra
    )


@pytest.mark.parametrize(
    "fault,message",
    [
        ("raise:1:25", r"\[rank 1\] unexpected error"),
        ("kill:2:25", r"rank 2 \(pid \d+ on this node\) exited before the job finished|rank 2 with PID"),
        ("hang:1:25", r"\[rank 1\] watchdog: training step 25|have not entered it: \[1\]"),
    ],
)
def test_injected_fault_ends_the_job_and_leaves_a_resumable_checkpoint(tmp_path, fault: str, message: str) -> None:
    folders = []

    def run(attempt: int) -> tuple[subprocess.CompletedProcess, float]:
        folders.append(tmp_path / f"run{attempt}")
        return _faulty_run(folders[-1], fault, "--timeout", "3")

    done, seconds = _rerun_while_only_the_launcher_spoke(run) if fault.startswith("kill") else run(0)
    assert done.returncode != 0
    assert seconds < 60, f"the job took {seconds:.0f} s to end"
    # Whichever rank reports first, it names the failing rank (Open MPI's launcher names a killed rank itself).
    assert re.search(message, done.stdout + done.stderr), (done.stdout + done.stderr)[-2000:]
    saved = checkpoint.checkpoints(str(folders[-1]))
    # 15 steps/epoch at 3 ranks x 32: checkpoints at steps 10, 15 (epoch end) and 20, the fault before 25.
    assert [os.path.basename(p) for p in saved] == ["ckpt-000000020", "ckpt-000000015", "ckpt-000000010"]
    resumed = run_mpitrain(3, "--no-progress", "--epochs", "3", "--checkpoint-dir", str(folders[-1]), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "epoch   3" in resumed.stdout


@pytest.mark.parametrize("strategy", ["ps-sync", "ps-async"])
@pytest.mark.parametrize("fault,rank", [("kill", 1), ("hang", 1), ("kill", 2), ("hang", 2)])  # rank 2: the server
def test_a_dead_or_stalled_worker_or_server_ends_the_job_naming_it(strategy: str, fault: str, rank: int) -> None:
    args = ["--no-progress", "--epochs", "3", "--strategy", strategy, "--timeout", "3"]

    def run(_: int) -> tuple[subprocess.CompletedProcess, float]:
        return _timed_run(f"{fault}:{rank}:25", *args)

    done, seconds = _rerun_while_only_the_launcher_spoke(run) if fault == "kill" else run(0)
    output = done.stdout + done.stderr
    named = (
        rf"rank {rank} \(pid \d+ on this node\) exited before the job finished|rank {rank} with PID"
        if fault == "kill"
        else rf"\[rank {rank}\] watchdog: training step|from rank {rank} \(|have not entered it: \[{rank}\]"
    )
    assert done.returncode != 0 and seconds < 60, (done.returncode, seconds)
    assert re.search(named, output), output[-2000:]


def _processes_running(marker: str) -> list[int]:
    """The pids of this machine's processes whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.skipif("-disable-auto-cleanup" not in mpiexec_command(1), reason="Hydra's SIGUSR1 makes the orphans")
def test_no_rank_outlives_a_launcher_that_is_gone(tmp_path) -> None:
    """Ranks started through a shell script that does not exec: when rank 1 dies, Hydra's SIGUSR1 ends
    the scripts, the launcher takes the job for over and done, and a survivor whose MPI_Abort then finds no
    launcher to carry it out would wait on its dead peer forever. Its abort's timer ends it."""
    script = tmp_path / "rank.sh"
    script.write_text('#!/bin/bash\n"$@"\n')
    script.chmod(0o755)
    marker = str(tmp_path / "checkpoints")
    args = ["--no-progress", "--epochs", "3", "--strategy", "ps-sync", "--timeout", "3", "--checkpoint-dir", marker]
    command = mpiexec_command(3, str(script), sys.executable, "-m", "mpitrain", *args)
    environment = child_environment(60) | {faults.VARIABLE: "kill:1:25"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=70, check=False)
        assert done.returncode != 0, done.stdout[-2000:]
        deadline = time.monotonic() + ABORT_WAIT + 15
        while _processes_running(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _processes_running(marker), (done.stdout + done.stderr)[-2000:]
    finally:
        for pid in _processes_running(marker):
            os.kill(pid, 9)


def _straggle(monkeypatch, fault: str, rank: int, steps: list[float], reads_data: bool = True) -> list[float]:
    """What ``after_step`` sleeps on ``rank`` for steps of these seconds under ``fault``."""
    monkeypatch.setenv(faults.VARIABLE, fault)
    faults.planned.cache_clear()
    faults._straggler.cache_clear()
    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    for seconds in steps:
        faults.after_step(rank, seconds, reads_data)
    faults.planned.cache_clear()
    faults._straggler.cache_clear()
    return slept


def test_a_slow_rank_sleeps_in_proportion_to_its_own_step_time(monkeypatch) -> None:
    steps = [0.01] * 8 + [0.5]  # the last step waited on a peer: its own time is still 0.01
    assert _straggle(monkeypatch, "slow:1:3", 1, steps) == [pytest.approx(0.02)] * 9
    assert _straggle(monkeypatch, "slow:1:3", 0, steps) == []  # another rank is not slowed


def test_random_pauses_are_seeded_and_only_on_ranks_with_data(monkeypatch) -> None:
    first = _straggle(monkeypatch, "pause:0.3:5:7", 2, [0.01] * 400)
    assert first == _straggle(monkeypatch, "pause:0.3:5:7", 2, [0.01] * 400)  # the same draws again
    assert first != _straggle(monkeypatch, "pause:0.3:5:7", 3, [0.01] * 400)  # each rank its own
    assert first == [pytest.approx(0.05)] * len(first) and 0.2 < len(first) / 400 < 0.4
    assert _straggle(monkeypatch, "pause:0.3:5", 2, [0.01] * 50, reads_data=False) == []  # a server


@pytest.mark.parametrize("text", ["slow:1:0.5", "slow:x:2", "pause:1.5:2", "pause:0.1:-1", "pause:0.1"])
def test_malformed_straggler_faults_are_refused(monkeypatch, text: str) -> None:
    monkeypatch.setenv(faults.VARIABLE, text)
    faults.planned.cache_clear()
    with pytest.raises(ValueError, match="slow:RANK:FACTOR"):
        faults.planned()
    faults.planned.cache_clear()
