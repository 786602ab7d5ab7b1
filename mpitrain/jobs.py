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


def _launcher() -> tuple[str, str]:
    """The mpiexec beside this Python, else the one on PATH, and what its ``--version`` says."""
    launcher = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(launcher):
        launcher = shutil.which("mpiexec") or "mpiexec"
    probe = subprocess.run([launcher, "--version"], capture_output=True, text=True, check=False)
    return launcher, probe.stdout + probe.stderr


def mpiexec_command(ranks: int, *command: str, hosts: str | None = None) -> list[str]:
    """``mpiexec -n ranks command...``, using the mpiexec beside this Python, else the one on PATH.

    Open MPI gets ``--oversubscribe`` so more ranks than cores start, as with MPICH.
    MPICH's Hydra gets ``-disable-auto-cleanup``: when a rank dies, the
    survivors' watchdogs can name it before the launcher kills them (Hydra
    still does, about a millisecond later: see ``comm.watchdog``), instead of
    the launcher alone reporting whichever process it reaped. ``hosts``:
    a hostfile in the launcher's own format (``write_hostfile``), passed as
    the README's multi-node commands do (``--hostfile`` / ``-f``).
    """
    launcher, version = _launcher()
    extra = ["--oversubscribe"] if "Open MPI" in version else ["-disable-auto-cleanup"] if "HYDRA" in version else []
    if hosts is not None:
        extra += ["--hostfile", hosts] if "Open MPI" in version else ["-f", hosts]
    return [launcher, *extra, "-n", str(ranks), *command]


def write_hostfile(path: str, slots: dict[str, int]) -> str:
    """Write a hostfile for this installation's launcher: ``host slots=N`` lines for Open MPI, ``host:N``
    for MPICH (hostfile.example); returns ``path``."""
    openmpi = "Open MPI" in _launcher()[1]
    with open(path, "w") as f:
        for host, count in slots.items():
            f.write(f"{host} slots={count}\n" if openmpi else f"{host}:{count}\n")
    return path


def child_environment(timeout_s: float | None = None) -> dict[str, str]:
    """This environment without the current job's variables; ``timeout_s`` sets MPICH's MPIEXEC_TIMEOUT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_JOB_VARIABLES)}
    if timeout_s is not None:
        env["MPIEXEC_TIMEOUT"] = str(int(timeout_s))
    return env
