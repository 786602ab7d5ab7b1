"""Whether the MPI library may be handed device (CUDA) pointers.

Giving a device pointer to an MPI built without CUDA support does not fail
cleanly: the library reads it as host memory and the process segfaults
(mpi4py's issue tracker is full of such reports). So the Communicator hands
device arrays to MPI directly only when the library has been shown to be
CUDA-aware, and stages them through host memory otherwise. The evidence,
in this order:

1. ``MPITRAIN_CUDA_AWARE=1`` or ``0``: the user says so (a cluster's MPI
   that cannot answer the query, or a test of the staged path);
2. the library's own answer, through ctypes on the library this process
   loaded: MPICH's ``MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &out)``
   (0 when built without CUDA or run with ``MPIR_CVAR_ENABLE_GPU=0``),
   else Open MPI's ``MPIX_Query_cuda_support()``;
3. otherwise: not aware.

mpi4py itself has no such query (4.1.2).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

ENV = "MPITRAIN_CUDA_AWARE"
MPIX_GPU_SUPPORT_CUDA = 0  # mpi.h of MPICH 4 and 5


@dataclass(frozen=True)
class CudaAwareness:
    """The verdict and where it came from (``source``: "environment", "query" or "none")."""

    aware: bool
    source: str
    detail: str

    def describe(self) -> str:
        """One line for ``info`` and the run header."""
        return f"{'yes' if self.aware else 'no'} ({self.detail})"


def detect(environ: dict[str, str] | None = None, libraries: list[str] | None = None) -> CudaAwareness:
    """The CUDA awareness of this process's MPI library (see the module docstring for the order).

    ``libraries``: paths of the MPI libraries to ask (default: the ones this
    process has loaded, see ``loaded_libraries``).

    Raises:
        ValueError: ``MPITRAIN_CUDA_AWARE`` set to something other than 0 or 1.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(ENV)
    if value is not None:
        if value.strip() not in ("0", "1"):
            raise ValueError(f"{ENV}={value!r}: expected 0 or 1")
        return CudaAwareness(value.strip() == "1", "environment", f"{ENV}={value.strip()}")
    paths = loaded_libraries() if libraries is None else libraries
    for path in paths:
        answer = query(path)
        if answer is not None:
            return answer
    where = ", ".join(os.path.basename(p) for p in paths) or "no MPI library found among the loaded ones"
    return CudaAwareness(False, "none", f"no CUDA-support query in {where}; set {ENV}=1 if it is CUDA-aware")


def query(path: str) -> CudaAwareness | None:
    """Ask the library at ``path`` (already loaded, or loadable); None when it has neither query."""
    try:
        library = ctypes.CDLL(path)
    except OSError:
        return None
    name = os.path.basename(path)
    gpu_query = getattr(library, "MPIX_GPU_query_support", None)
    if gpu_query is not None:  # MPICH: the run-time answer, MPIR_CVAR_ENABLE_GPU included
        gpu_query.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        gpu_query.restype = ctypes.c_int
        supported = ctypes.c_int(0)
        code = gpu_query(MPIX_GPU_SUPPORT_CUDA, ctypes.byref(supported))
        if code == 0:
            return CudaAwareness(
                bool(supported.value), "query", f"MPIX_GPU_query_support(CUDA) = {supported.value} in {name}"
            )
    cuda_query = getattr(library, "MPIX_Query_cuda_support", None)
    if cuda_query is not None:  # Open MPI
        cuda_query.argtypes = []
        cuda_query.restype = ctypes.c_int
        value = cuda_query()
        return CudaAwareness(bool(value), "query", f"MPIX_Query_cuda_support() = {value} in {name}")
    return None


def loaded_libraries() -> list[str]:
    """Paths of the MPI libraries mapped into this process (``libmpi*.so*``), else what the loader finds."""
    found: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if line.strip() else ""
                base = os.path.basename(path)
                if base.startswith("libmpi") and ".so" in base and path not in found:
                    found.append(path)
    except OSError:  # no /proc (macOS): ask the dynamic loader
        pass
    if not found:
        name = ctypes.util.find_library("mpi")
        found = [name] if name else []
    return found
