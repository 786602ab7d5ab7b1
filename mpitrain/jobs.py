"""Helpers for benchmark drivers and tests: child MPI jobs through the installation's own mpiexec,
and PyTorch's gloo process group as the baseline the benchmarks compare against.

Nothing here launches ranks itself: it only builds the ``mpiexec`` command
line and an environment free of the variables of a job this process may
itself run in (a child ``mpiexec`` started from inside an MPI job would
otherwise try to join it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from typing import Any

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


def init_gloo(world: Any, threads: int) -> bool:
    """Start torch.distributed's gloo process group from an MPI communicator's rank and size (the baseline
    of the benchmarks); False when torch is not importable.

    Rank 0 picks a free TCP port on its host (loopback when every rank is on
    one host) and tells the others over MPI; torch gets ``threads`` threads.
    """
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return False
    from mpi4py import MPI

    torch.set_num_threads(threads)
    hosts = world.allgather(MPI.Get_processor_name())
    address = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(hosts[0])
    port = None
    if world.Get_rank() == 0:
        with socket.socket() as probe:
            probe.bind((address, 0))
            port = probe.getsockname()[1]
    port = world.bcast(port, root=0)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{address}:{port}", rank=world.Get_rank(), world_size=world.Get_size()
    )
    return True
