"""The one place where numpy or cupy is chosen.

Everything else receives an array module ``xp`` from here and never imports
cupy itself. cupy is optional: without it only ``"numpy"`` is available.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

BACKENDS = ("numpy", "cupy")


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
