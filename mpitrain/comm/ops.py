"""Reduction ops and the dtypes the collectives take, bfloat16 included.

bfloat16 is ``ml_dtypes.bfloat16`` (the numpy dtype JAX and TensorFlow use):
it must be asked for by dtype, never guessed from ``uint16``, which is an
unsigned integer like any other. MPI has no bfloat16, so such a buffer
travels as its 16-bit patterns (``wire``) and is reduced here, in float32
arithmetic per hop; float16 likewise reduces in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
from mpi4py import MPI

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
HALF = (np.dtype(np.float16), BFLOAT16)  # 16-bit floats: reduced in float32, slow or impossible in MPI


def is_half(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is float16 or bfloat16 (by identity first: dtype equality costs a microsecond, and
    this runs in every collective's ``auto`` choice)."""
    return dtype is HALF[0] or dtype is HALF[1] or (dtype.itemsize == 2 and dtype in HALF)


INTEGERS = tuple(
    np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
)
DTYPES = (*HALF, np.dtype(np.float32), np.dtype(np.float64), *INTEGERS)
OPS = ("sum", "mean", "max", "min")
UFUNCS = {"sum": np.add, "mean": np.add, "max": np.maximum, "min": np.minimum}
NATIVE_OPS = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

Inspect = Callable[[np.ndarray], None] | None


def is_floating(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is one of the floating types (``mean`` needs one)."""
    return dtype.kind == "f" or dtype is BFLOAT16 or dtype == BFLOAT16


def wire(flat: np.ndarray) -> np.ndarray:
    """What MPI moves for ``flat``: a bfloat16 buffer's bit patterns (uint16), anything else as it is."""
    dtype = flat.dtype
    return flat.view(np.uint16) if dtype is BFLOAT16 or (dtype.kind == "V" and dtype == BFLOAT16) else flat


def combiner(op: str, dtype: np.dtype) -> Callable[..., Any]:
    """The in-place reduction ``f(a, b, out=...)`` for an op on wire arrays of logical ``dtype``."""
    ufunc = UFUNCS[op]
    if dtype == np.float16:
        return lambda a, b, out: ufunc(a, b, out=out, dtype=np.float32)
    if dtype == BFLOAT16:
        return lambda a, b, out: ufunc(a.view(BFLOAT16), b.view(BFLOAT16), out=out.view(BFLOAT16))
    return ufunc


def finisher(op: str, dtype: np.dtype, size: int, inspect: Inspect = None) -> Inspect:
    """What to do to each fully reduced wire chunk: divide by ``size`` for "mean", then ``inspect`` it
    (with the logical dtype)."""
    if op != "mean" and inspect is None:
        return None
    logical = (lambda chunk: chunk.view(BFLOAT16)) if dtype == BFLOAT16 else (lambda chunk: chunk)

    def finish(chunk: np.ndarray) -> None:
        values = logical(chunk)
        if op == "mean":
            values /= size  # np.divide in place on a host array; the same on a device array
        if inspect is not None:
            inspect(values)

    return finish
