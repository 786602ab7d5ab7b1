"""The examples/ scripts, each run at 2 ranks the way the README shows, with a tiny configuration."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from mpitrain.jobs import child_environment, mpiexec_command, write_hostfile

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    command = mpiexec_command(2, sys.executable, os.path.join(EXAMPLES, script), *args)
    return subprocess.run(command, capture_output=True, text=True, env=child_environment(120), timeout=130, check=False)


def test_custom_loop_trains_with_the_library_api() -> None:
    done = _run("custom_loop.py", "--epochs", "3")
    assert done.returncode == 0, done.stderr
    accuracies = [float(a) for a in re.findall(r"test accuracy (\S+)", done.stdout)]
    assert len(accuracies) == 3 and accuracies[-1] > 0.8, done.stdout  # printed once (rank 0), and it learns


def test_own_arrays_with_the_distributed_sampler(tmp_path) -> None:
    done = _run("own_arrays.py", "--samples", "1000", "--epochs", "4")
    assert done.returncode == 0, done.stderr
    accuracies = [float(a) for a in re.findall(r"accuracy (\S+)", done.stdout)]
    assert len(accuracies) == 4 and accuracies[-1] > 0.9, done.stdout


def test_accumulation_and_compression(tmp_path) -> None:
    done = _run("accumulate_compress.py", "--passes", "3", "--compression", "bf16", "--epochs", "3")
    assert done.returncode == 0, done.stderr
    assert re.findall(r"steps of 3 x 16 x 2 samples", done.stdout) and "test accuracy" in done.stdout


def test_a_script_launched_on_a_hostfile(tmp_path) -> None:
    hosts = write_hostfile(str(tmp_path / "hostfile"), {"localhost": 2})  # the README's multi-node command
    command = mpiexec_command(2, sys.executable, os.path.join(EXAMPLES, "custom_loop.py"), "--epochs", "1", hosts=hosts)
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment(120), timeout=130, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("epoch 1: test accuracy") == 1
