"""The command line, run as users run it: under a fresh mpiexec."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mpitrain.cli import UsageError, parse
from mpitrain.inference import ARCHITECTURE
from mpitrain.jobs import child_environment, mpiexec_command
from mpitrain.parallel.schedules import SCHEDULES
from tests.conftest import run_mpitrain


def test_default_job_at_two_ranks_trains_and_writes_outputs(tmp_path) -> None:
    metrics, saved = tmp_path / "m.jsonl", tmp_path / "model.npz"
    done = run_mpitrain(2, "--no-progress", "--metrics", str(metrics), "--save", str(saved))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("# mpitrain: 2 rank(s)") == 1  # rank 0 alone prints
    assert "# note:" not in done.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 21))
    assert {"epoch", "loss", "train_acc", "test_acc", "samples_per_s", "time_s"} <= set(records[-1])
    assert records[-1]["test_acc"] >= 0.95
    with np.load(saved) as params:
        names = ["1.bias", "1.weight", "3.bias", "3.weight", "5.bias", "5.weight"]
        assert sorted(params.files) == sorted([*names, ARCHITECTURE])  # the parameters and how to rebuild them
        assert params["1.weight"].shape == (64, 128)


def test_compression_on_one_node_is_pointed_out() -> None:
    done = run_mpitrain(2, "--epochs", "1", "--no-progress", "--compression", "bf16")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("# note: every rank is on this node") == 1, done.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lr", "-0.1"], "argument --lr: '-0.1': expected a number > 0"),
        (["--batch-size", "0"], "argument --batch-size: '0': expected an integer >= 1"),
        (["--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
        (["--hidden", "12,x"], "argument --hidden: '12,x': expected comma-separated positive sizes"),
        (["--momentum", "1.5"], "argument --momentum: '1.5': expected a number in [0, 1)"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_arguments_raise_usage_errors(args: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(args)
    assert message in str(info.value)


def test_bad_argument_prints_once_and_every_rank_exits_nonzero() -> None:
    done = run_mpitrain(3, "train", "--epochs", "0")
    assert done.returncode == 2
    assert done.stderr.count("argument --epochs: '0': expected an integer >= 1") == 1


def test_bad_data_file_is_one_clear_error(tmp_path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 3)), y_train=np.arange(4), x_test=np.zeros((2, 3)))
    done = run_mpitrain(2, "--dataset", str(bad), "--no-progress")
    assert done.returncode == 1
    assert done.stderr.count("missing key(s) y_test") == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_info_reports_world_hosts_and_backends() -> None:
    done = run_mpitrain(2, "info")
    assert done.returncode == 0, done.stderr
    for field in ("MPI library:", "mpi4py:", "world size:    2", "hosts:", "backend:       numpy", "threads:"):
        assert field in done.stdout
    # Every BLAS the core loads (numpy's and scipy's) runs under the per-rank limit.
    limit = re.search(r"threads: +(\d+) per rank", done.stdout).group(1)
    pools = [line for line in done.stdout.splitlines() if line.startswith("thread pool:")]
    assert pools and all(line.endswith(f": {limit} thread(s)") for line in pools), done.stdout
    assert done.stdout.count("world size") == 1
    aware = re.search(r"CUDA-aware: +(yes|no) \((.+)\)", done.stdout)
    assert aware, done.stdout
    path = "direct" if aware.group(1) == "yes" else "staged"
    assert f"device path:   allreduce: {path}" in done.stdout and "GPUs:" in done.stdout


def test_info_takes_the_users_word_on_cuda_awareness() -> None:
    done = run_mpitrain(1, "info", extra_env={"MPITRAIN_CUDA_AWARE": "1"})
    assert "CUDA-aware:    yes (MPITRAIN_CUDA_AWARE=1)" in done.stdout, done.stdout + done.stderr
    assert "device path:   send/recv: direct" in done.stdout
    bad = run_mpitrain(1, "info", extra_env={"MPITRAIN_CUDA_AWARE": "maybe"})
    assert bad.returncode != 0 and "MPITRAIN_CUDA_AWARE='maybe': expected 0 or 1" in bad.stderr + bad.stdout


def test_thread_limit_reaches_the_blas_libraries_loaded_after_it() -> None:
    # As the benchmark workers do: limit first, import the network core afterwards.
    script = (
        "from mpitrain import threads\n"
        "threads.limit_threads(1, 1)\n"
        "import mpitrain.nn\n"
        "print('\\n'.join(threads.thread_pools()))\n"
    )
    command = mpiexec_command(1, sys.executable, "-c", script)
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment(120), timeout=130, check=False)
    assert done.returncode == 0, done.stderr
    pools = done.stdout.splitlines()
    assert pools and all(line.endswith(": 1 thread(s)") for line in pools), done.stdout


def test_train_is_the_default_command() -> None:
    assert parse([]).command == "train" and parse(["--epochs", "3"]).epochs == 3
    assert parse(["info"]).command == "info"
    assert parse(["train", "--hidden", "64,32"]).hidden == (64, 32)


@pytest.mark.parametrize("op", ["allreduce", "broadcast", "reduce_scatter", "allgather"])
def test_collective_benchmark_checks_every_result(tmp_path, op: str) -> None:
    out = tmp_path / "bench.json"
    done = run_mpitrain(3, "bench", "collectives", "-b", "1K", "-e", "256K", "-f", "16", "-n", "2", "-w", "1",
                        "--op", op, "--dtype", "float64", "--json", str(out), "--checked")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "# Out of bounds values : 0 OK" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["size"] for r in rows} == {1024, 16384, 262144} and all(r["wrong"] == 0 for r in rows)
    assert {r["algorithm"] for r in rows} >= {"auto", "native"}


def test_training_benchmark_reports_throughput_and_breakdown(tmp_path) -> None:
    out = tmp_path / "training.json"
    done = run_mpitrain(1, "bench", "training", "--ranks", "1,2", "--models", "mlp,cnn", "--steps", "2",
                        "--warmup", "1", "--batch", "8", "--repeat", "2", "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    mine = [r for r in json.loads(out.read_text()) if r["framework"] == "mpitrain"]
    assert {(r["model"], r["ranks"]) for r in mine} == {("mlp", 1), ("mlp", 2), ("cnn", 1), ("cnn", 2)}
    for r in mine:
        assert r["samples_per_s"] > 0 and r["threads"] == 1
        assert len(r["runs_samples_per_s"]) == 2 and r["samples_per_s"] == min(r["runs_samples_per_s"])  # median
        parts = sum(r[f"{k}_ms"] for k in ("forward", "backward", "allreduce_wait", "optimizer"))
        assert 0 < parts <= r["step_ms"] * 1.05


def test_pipeline_benchmark_measures_every_schedule_against_its_formula(tmp_path) -> None:
    out = tmp_path / "pipeline.json"
    done = run_mpitrain(1, "bench", "pipeline", "--stages", "2", "--micro", "1,2", "--steps", "2", "--warmup", "1",
                        "--repeat", "2", "--batch", "16", "--sleep-ms", "2", "--sleep-steps", "2",
                        "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [r for r in json.loads(out.read_text())["rows"] if r["framework"] == "mpitrain"]
    found = {(r["mode"], r["schedule"], r["micro"]) for r in rows}
    assert found == {(mode, kind, m) for mode in ("compute", "sleep") for kind in SCHEDULES for m in (1, 2)}
    for r in rows:
        assert r["runs"] == 2 and r["low_ms"] <= r["step_ms"] <= r["high_ms"]
        assert 0 <= r["bubble"] < 1 and r["formula"] == pytest.approx(
            1 / ((r["chunks"] if r["schedule"] == "interleaved" else 1) * r["micro"] + 1)
        )
        assert len(r["peak_live"]) == 2 and all(b > 0 for b in r["activation_bytes"])
    assert "# targets:" in done.stdout


def test_soak_script_samples_memory_and_checks_growth() -> None:
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "soak.py")
    command = mpiexec_command(2, sys.executable, script, "--steps", "600", "--warmup", "200", "--every", "200")
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment(120), timeout=130, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "growth after warm-up (step 200 -> 600)" in done.stdout


@pytest.mark.parametrize(
    "variable,value,message",
    [
        ("MPITRAIN_SEGMENT_BYTES", "4k", "MPITRAIN_SEGMENT_BYTES='4k': expected an integer number of bytes"),
        ("MPITRAIN_FAULT", "explode:1:2", "MPITRAIN_FAULT='explode:1:2': expected ACTION:RANK:STEP"),
    ],
)
def test_bad_environment_variable_is_one_usage_error(variable: str, value: str, message: str) -> None:
    done = run_mpitrain(2, "--epochs", "1", "--no-progress", extra_env={variable: value})
    assert done.returncode == 2
    assert done.stderr.count(message) == 1, done.stderr


def test_outputs_are_checked_before_any_training(tmp_path) -> None:
    done = run_mpitrain(2, "--no-progress", "--save", str(tmp_path))
    assert done.returncode == 1 and "epoch   1" not in done.stdout
    assert done.stderr.count(f"--save {tmp_path}: is a directory; give a file name") == 1, done.stderr
    done = run_mpitrain(2, "--no-progress", "--metrics", str(tmp_path / "nowhere" / "m.jsonl"))
    assert done.returncode == 1 and done.stderr.count("--metrics ") == 1 and "does not exist" in done.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--backend", "cupy"], "backend 'cupy' needs cupy"),
        (["--dataset", "{tmp}"], "is a directory; expected a .npz file"),
        (["--dataset", "{tmp}/notes.txt"], "not a zip archive of arrays"),
        (["--batch-size", "100000000000"], "Unable to allocate"),
    ],
)
def test_setup_errors_are_one_line_not_a_traceback_per_rank(tmp_path, args: list[str], message: str) -> None:
    (tmp_path / "notes.txt").write_text("x_train\n")
    done = run_mpitrain(2, "--no-progress", *[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.count(message) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_global_batch_larger_than_the_data_is_warned_about() -> None:
    done = run_mpitrain(2, "--no-progress", "--epochs", "1", "--batch-size", "1000")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("WARNING mpitrain: 2 rank(s) x batch 1000 = 2000 exceeds the 1437 training samples") == 1
    assert "[rank 0/2] WARNING mpitrain: 2 rank(s) x batch 1000" in done.stderr  # once per job, from rank 0


@pytest.mark.parametrize(
    "sent,status,said",
    [(signal.SIGINT, 130, "interrupted at step"), (signal.SIGTERM, 143, "terminated (SIGTERM) at step")],
)
def test_ctrl_c_or_sigterm_is_one_message_and_the_shells_status(tmp_path, sent, status: int, said: str) -> None:
    # Defects: Ctrl-C under MPICH printed a KeyboardInterrupt traceback from every rank and exited 2; SIGTERM
    # (Slurm's time limit, scancel) ended every rank silently, without saying which checkpoint to resume.
    args = ["--no-progress", "--epochs", "500", "--checkpoint-dir", str(tmp_path), "--checkpoint-every", "20"]
    command = mpiexec_command(2, sys.executable, "-m", "mpitrain", *args)
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=child_environment(120), start_new_session=True)  # fmt: skip
    lines = []
    try:
        while not (lines and lines[-1].startswith("epoch   3")):
            lines.append(job.stdout.readline())
            assert lines[-1] or job.poll() is None, "".join(lines)
        os.killpg(job.pid, sent)  # what a terminal's Ctrl-C does (and Slurm's SIGTERM): the whole group
        err = job.communicate(timeout=60)[1]
    finally:
        job.kill()
    pids = [int(p.split(":")[1]) for p in re.search(r"# ranks \(host:pid\): (.*)", "".join(lines)).group(1).split()]
    deadline = time.monotonic() + 10  # the launcher has returned; its ranks must be gone too
    while (left := [pid for pid in pids if "zombie" not in _state(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.returncode == status, err
    assert err.count(said) == 1 and "newest checkpoint" in err and "--resume" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert left == []


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return f.read().lower()
    except OSError:
        return "zombie"


def test_checkpoints_of_another_run_are_refused_and_a_finished_resume_says_so(tmp_path) -> None:
    # Defect: a fresh run deleted its own new checkpoint at once (pruning by step across runs), and
    # --resume then silently resumed the other run.
    first = run_mpitrain(2, "--no-progress", "--epochs", "2", "--checkpoint-dir", str(tmp_path), "--keep", "1")
    assert first.returncode == 0, first.stderr
    fresh = run_mpitrain(2, "--no-progress", "--epochs", "1", "--checkpoint-dir", str(tmp_path))
    assert fresh.returncode == 1 and "epoch   1" not in fresh.stdout
    assert fresh.stderr.count("holds checkpoints of another run (newest at step 46); pass --resume") == 1
    again = run_mpitrain(2, "--no-progress", "--epochs", "2", "--checkpoint-dir", str(tmp_path), "--resume")
    assert again.returncode == 0, again.stderr
    assert "already at or past --epochs 2: nothing left to train" in again.stdout


def test_no_progress_bar_fragments_when_stderr_is_not_a_terminal() -> None:
    done = run_mpitrain(2, "--epochs", "2")  # progress on, stderr a pipe
    assert done.returncode == 0 and "epoch 1/2" not in done.stderr and "\r" not in done.stderr, done.stderr[-500:]


def test_version_is_one_line() -> None:
    done = run_mpitrain(2, "--version")
    assert done.returncode == 0 and done.stdout.count("mpitrain 0.") == 1, done.stdout + done.stderr


def test_resume_auto_starts_fresh_then_goes_on_and_the_run_ends_with_a_summary(tmp_path) -> None:
    folder, metrics = str(tmp_path / "ckpt"), str(tmp_path / "run.jsonl")
    args = (
        "--no-progress",
        "--epochs",
        "2",
        "--checkpoint-dir",
        folder,
        "--checkpoint-every",
        "10",
        "--resume",
        "auto",
    )
    first = run_mpitrain(2, *args, "--max-steps", "30", "--metrics", metrics)
    assert first.returncode == 0, first.stderr
    assert "resuming" not in first.stdout  # nothing to resume: a fresh start
    summary = first.stdout.strip().splitlines()[-1]
    assert summary.startswith("# done in") and "stopped by --max-steps 30 at step 30, inside epoch 2" in summary
    assert f"metrics {metrics}" in summary and "newest checkpoint " + folder in summary
    second = run_mpitrain(2, *args)
    assert second.returncode == 0, second.stderr
    assert "# resuming from" in second.stdout and "epoch 2, test_acc" in second.stdout.strip().splitlines()[-1]
    done = run_mpitrain(2, "--resume", "auto")
    assert done.returncode == 2 and done.stderr.count("--resume auto needs --checkpoint-dir") == 1


def test_a_toml_config_sets_options_and_flags_override_it(tmp_path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        'strategy = "pipeline"\nmicro-batches = 2\nepochs = 1\nhidden = [16, 8]\nlr = 0.5\nnesterov = true\n'
    )
    metrics = tmp_path / "run.jsonl"
    done = run_mpitrain(2, "--config", str(config), "--lr", "0.02", "--metrics", str(metrics))
    assert done.returncode == 0, done.stderr
    options = next(line for line in done.stdout.splitlines() if line.startswith("# options: "))
    for shown in ("epochs=1", "hidden=16,8", "lr=0.02", "nesterov=True", "micro_batches=2"):
        assert shown in options, options
    saved = json.loads((tmp_path / "run.config.json").read_text())
    assert saved["lr"] == 0.02 and saved["hidden"] == [16, 8] and saved["options"]["micro_batches"] == 2
    assert "strategy pipeline" in done.stdout
    record = json.loads(metrics.read_text().splitlines()[0])
    assert record["epoch"] == 1 and len(record["peak_live"]) == 1  # a pipeline's per-stage counts, as lists


@pytest.mark.parametrize(
    "text,message",
    [
        ("epoch = 3\n", "unknown option 'epoch'; the nearest option is 'epochs'"),
        ("nesterov = 1\n", "nesterov takes true or false, got 1"),
        ("epochs = [\n", "not valid TOML"),
    ],
)
def test_a_bad_config_file_is_one_usage_error(tmp_path, text: str, message: str) -> None:
    config = tmp_path / "run.toml"
    config.write_text(text)
    done = run_mpitrain(2, "--config", str(config))
    assert done.returncode == 2 and done.stderr.count(message) == 1, done.stderr
