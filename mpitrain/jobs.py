"""Child MPI jobs for benchmark drivers and tests, through the installation's own mpiexec.

Nothing here launches ranks itself: it only builds the ``mpiexec`` command
line and an environment free of the variables of a job this process may
itself run in (a child ``mpiexec`` started from inside an MPI job would
otherwise try to join it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

_JOB_VARIABLES = ("PMI_", "PMIX_", "HYDRA_", "MPIR_", "MPI_LOCAL", "OMPI_COMM", "OMPI_MCA_ess", "PRTE_")


def mpiexec_command(ranks: int, *command: str) -> list[str]:
    """``mpiexec -n ranks command...``, using the mpiexec beside this Python, else the one on PATH.

    Open MPI gets ``--oversubscribe`` so more ranks than cores start, as with MPICH.
    MPICH's Hydra gets ``-disable-auto-cleanup``: when a rank dies, the
    survivors' watchdogs name it and abort the job, instead of the launcher
    killing them first and reporting whichever process it reaped.
    """
    launcher = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(launcher):
        launcher = shutil.which("mpiexec") or "mpiexec"
    probe = subprocess.run([launcher, "--version"], capture_output=True, text=True, check=False)
    version = probe.stdout + probe.stderr
    extra = ["--oversubscribe"] if "Open MPI" in version else ["-disable-auto-cleanup"] if "HYDRA" in version else []
    return [launcher, *extra, "-n", str(ranks), *command]


def child_environment(timeout_s: float | None = None) -> dict[str, str]:
    """This environment without the current job's variables; ``timeout_s`` sets MPICH's MPIEXEC_TIMEOUT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_JOB_VARIABLES)}
    if timeout_s is not None:
        env["MPIEXEC_TIMEOUT"] = str(int(timeout_s))
    return env
