"""A stand-in for cupy on machines without a GPU: "device" arrays that live in host memory.

Enough of cupy's API for ``backend``'s device primitives (streams, events,
page-locked memory, asynchronous copies) and for the collectives' device
path, so that path runs under mpiexec on a CPU. Its arrays expose their
memory only through ``__cuda_array_interface__`` (no buffer protocol, no
implicit conversion to numpy, as cupy's), and count how often it is read:
a test of the staged path asserts that MPI never saw it. ``install``
puts it in ``sys.modules`` as ``cupy`` for one test (monkeypatch).
"""

from __future__ import annotations

import ctypes
import sys
import types
from typing import Any

import numpy as np

INTERFACE_READS = [0]  # how often __cuda_array_interface__ was read (MPI reading "device" pointers)
COPIES = {"to_host": 0, "to_device": 0}


class _Flags:
    def __init__(self, a: np.ndarray) -> None:
        self.c_contiguous = a.flags.c_contiguous


class ndarray:
    """A "device" array: a numpy array reachable only through the CUDA array interface."""

    def __init__(self, host: np.ndarray) -> None:
        self._a = host

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    ndim = property(lambda self: self._a.ndim)
    flags = property(lambda self: _Flags(self._a))
    data = property(lambda self: types.SimpleNamespace(ptr=self._a.ctypes.data))
    device = property(lambda self: _Device(0))

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        INTERFACE_READS[0] += 1
        a = self._a
        return {
            "shape": a.shape,
            "typestr": a.dtype.str,
            "data": (a.ctypes.data, False),
            "version": 3,
            "strides": None if a.flags.c_contiguous else a.strides,
            "stream": None,
        }

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()`")

    def __len__(self) -> int:
        return len(self._a)

    def __getitem__(self, key: Any) -> ndarray:
        return ndarray(self._a[key])

    def __setitem__(self, key: Any, value: Any) -> None:
        self._a[key] = value._a if isinstance(value, ndarray) else value

    def __itruediv__(self, other: Any) -> ndarray:
        self._a /= other
        return self

    def reshape(self, *shape: Any) -> ndarray:
        return ndarray(self._a.reshape(*shape))

    def view(self, dtype: Any) -> ndarray:
        return ndarray(self._a.view(dtype))

    def get(self) -> np.ndarray:
        return self._a.copy()


class Stream:
    ptr = 0

    def __init__(self, non_blocking: bool = False) -> None:
        self.non_blocking = non_blocking

    def synchronize(self) -> None:
        pass

    def wait_event(self, event: Event) -> None:
        pass


class Event:
    def __init__(self, disable_timing: bool = False) -> None:
        self.recorded = False

    def record(self, stream: Stream | None = None) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        if not self.recorded:
            raise RuntimeError("synchronize on an event never recorded")


class _Device:
    current = 0

    def __init__(self, index: int) -> None:
        self.index = self.id = index

    def use(self) -> None:
        _Device.current = self.index

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _memcpy(dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
    COPIES["to_host" if kind == 2 else "to_device"] += 1
    ctypes.memmove(dst, src, nbytes)


def _module() -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "0-stand-in"
    cupy.ndarray = ndarray
    cupy.asarray = lambda a, dtype=None: ndarray(np.array(a, dtype=dtype))
    cupy.empty = lambda shape, dtype=np.float32: ndarray(np.empty(shape, dtype))
    cupy.asnumpy = lambda a: a.get()
    cupy.array = lambda a, order="K", copy=True: ndarray(np.array(a._a, order=order, copy=copy))
    cupy.concatenate = lambda parts: ndarray(np.concatenate([part._a for part in parts]))
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        getDevice=lambda: _Device.current,
        getDeviceProperties=lambda i: {"name": b"stand-in GPU"},
        memcpyAsync=_memcpy,
        memcpyHostToDevice=1,
        memcpyDeviceToHost=2,
    )
    current = Stream()
    cupy.cuda = types.SimpleNamespace(
        runtime=runtime,
        Stream=Stream,
        Event=Event,
        Device=_Device,
        get_current_stream=lambda: current,
        alloc_pinned_memory=lambda n: (ctypes.c_uint8 * n)(),
    )
    return cupy


def install(monkeypatch: Any) -> types.ModuleType:
    """Make ``import cupy`` give the stand-in for the rest of the test; the module."""
    module = _module()
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", None)  # importing it raises ImportError
    INTERFACE_READS[0] = 0
    COPIES.update(to_host=0, to_device=0)
    return module
