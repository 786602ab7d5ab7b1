"""The examples/ scripts, each run at 2 ranks the way the README shows, with a tiny configuration."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from mpitrain.jobs import child_environment, mpiexec_command

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    command = mpiexec_command(2, sys.executable, os.path.join(EXAMPLES, script), *args)
    return subprocess.run(command, capture_output=True, text=True, env=child_environment(120), timeout=130, check=False)


def test_custom_loop_trains_with_the_library_api() -> None:
    done = _run("custom_loop.py", "--epochs", "3")
    assert done.returncode == 0, done.stderr
    accuracies = [float(a) for a in re.findall(r"test accuracy (\S+)", done.stdout)]
    assert len(accuracies) == 3 and accuracies[-1] > 0.8, done.stdout  # printed once (rank 0), and it learns
