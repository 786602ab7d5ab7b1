"""The one place where numpy or cupy is chosen.

Everything else receives an array module ``xp`` from here and never imports
cupy itself. cupy is optional: without it only ``"numpy"`` is available.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

# Loaded with numpy, before any thread limit is set (threads.py), so the limit reaches its BLAS too.
from scipy.linalg import blas as host_blas

BACKENDS = ("numpy", "cupy")
HOST_GEMM = {np.dtype(np.float32): host_blas.sgemm, np.dtype(np.float64): host_blas.dgemm}
GEMM_ADD_MIN_ELEMENTS = 1 << 18  # matmul_into adds with one gemm from here (1 MiB of float32)


def _import_cupy() -> ModuleType | None:
    """Return the cupy module when it imports and sees a GPU, else None."""
    try:
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # noqa: BLE001 - any failure means "no usable cupy"
        return None
    return cupy


def available_backends() -> dict[str, str]:
    """Map each usable backend name to a one-line description of it."""
    found = {"numpy": f"numpy {np.__version__}"}
    cupy = _import_cupy()
    if cupy is not None:
        count = cupy.cuda.runtime.getDeviceCount()
        found["cupy"] = f"cupy {cupy.__version__}, {count} GPU(s)"
    return found


def get_array_module(name: str = "numpy") -> ModuleType:
    """Return the array module for ``name`` ("numpy" or "cupy").

    Raises:
        ValueError: unknown name.
        RuntimeError: cupy asked for but not importable or no GPU present.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "numpy":
        return np
    cupy = _import_cupy()
    if cupy is None:
        raise RuntimeError("backend 'cupy' needs cupy installed and a visible GPU (pip install '.[gpu]')")
    return cupy


def array_module_of(array: Any) -> ModuleType:
    """Return numpy or cupy, whichever owns ``array``."""
    if isinstance(array, np.ndarray):
        return np
    cupy = _import_cupy()
    if cupy is not None and isinstance(array, cupy.ndarray):
        return cupy
    raise TypeError(f"expected a numpy or cupy array, got {type(array).__name__}")


def to_device(array: np.ndarray, xp: ModuleType) -> Any:
    """Copy a host array into the memory of ``xp`` (no copy for numpy)."""
    return array if xp is np else xp.asarray(array)


def to_host(array: Any) -> np.ndarray:
    """Return a numpy array with the contents of ``array`` (no copy for numpy)."""
    if isinstance(array, np.ndarray):
        return array
    return array.get()


def synchronize(xp: ModuleType) -> None:
    """Wait until queued device work has finished (a no-op for numpy)."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def matmul_into(a: Any, b: Any, out: Any, add: bool, scratch: Callable[[], Any] | None = None) -> None:
    """out = a @ b, or out += a @ b with ``add``, for 2-D arrays.

    Adding into a large host array (``GEMM_ADD_MIN_ELEMENTS``, float32 or
    float64, each operand C- or Fortran-contiguous) is one BLAS gemm with
    beta 1, which adds the product into ``out`` as it goes; a matmul and then
    an add would write a temporary and read it back with ``out``. Smaller
    arrays take the matmul and the add: scipy's BLAS is a second library,
    and going back and forth costs more than it saves on small products
    (README, "Speed on a core"). Their product goes to ``scratch()`` (an array
    shaped like ``out``) when given, else to a new array.
    """
    xp = array_module_of(out)
    if not add:
        xp.matmul(a, b, out=out)
        return
    gemm = HOST_GEMM.get(out.dtype) if xp is np and out.size >= GEMM_ADD_MIN_ELEMENTS else None
    if gemm is None or a.dtype != out.dtype or b.dtype != out.dtype or not all(map(_blas_ready, (a, b, out))):
        out += xp.matmul(a, b) if scratch is None else xp.matmul(a, b, out=scratch())
        return
    # BLAS works in Fortran order: out, or out.T = b.T @ a.T for a C-ordered out.
    c, first, second = (out, a, b) if out.flags.f_contiguous else (out.T, b.T, a.T)
    (x, trans_x), (y, trans_y) = _fortran(first), _fortran(second)
    result = gemm(1.0, x, y, beta=1.0, c=c, trans_a=trans_x, trans_b=trans_y, overwrite_c=1)
    if result.ctypes.data != c.ctypes.data:  # the wrapper had to copy: put the sum in place
        c[...] = result


def _blas_ready(m: np.ndarray) -> bool:
    return m.ndim == 2 and m.size > 0 and (m.flags.c_contiguous or m.flags.f_contiguous)


def _fortran(m: np.ndarray) -> tuple[np.ndarray, int]:
    """(a Fortran-ordered array, transpose flag) for BLAS to read ``m`` as it is."""
    return (m, 0) if m.flags.f_contiguous else (m.T, 1)
