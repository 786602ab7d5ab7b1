"""The one place where numpy or cupy is chosen.

Everything else receives an array module ``xp`` from here and never imports
cupy itself. cupy is optional: without it only ``"numpy"`` is available.
The collectives' device path needs a handful of primitives more (is this a
device array, page-locked host memory, asynchronous copies on a side
stream, waiting for them, which GPU a rank uses): they are here too, so
the collectives' code has no cupy in it.
"""

from __future__ import annotations

import contextlib
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


def is_device_array(array: Any) -> bool:
    """Whether ``array`` lives in GPU memory (a cupy array, or anything else with ``__cuda_array_interface__``)."""
    return not isinstance(array, np.ndarray) and hasattr(type(array), "__cuda_array_interface__")


def device_scope(array: Any) -> contextlib.AbstractContextManager[Any]:
    """A context in which device work goes to ``array``'s GPU: cupy's current device is per thread, so a
    worker thread starts on GPU 0 whatever its caller chose. A no-op for host arrays."""
    if not is_device_array(array):
        return contextlib.nullcontext()
    return device_module().cuda.Device(array.device.id)  # a fresh one: each keeps its own stack of devices


def device_module() -> ModuleType:
    """The cupy module, for device arrays met outside a job that chose its backend (the collectives).

    Raises:
        RuntimeError: cupy is not importable or sees no GPU.
    """
    return get_array_module("cupy")


def select_device(local_rank: int) -> tuple[int, int]:
    """Make GPU ``local_rank % count`` this process's current device; (that GPU, the count).

    Call it before any other CUDA work, with the rank's index on its node,
    so the ranks of a node spread over its GPUs (round-robin when there are
    more ranks than GPUs).
    """
    cupy = device_module()
    count = cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(local_rank % count).use()
    return local_rank % count, count


def current_device() -> int:
    """The index of this process's current GPU."""
    return int(device_module().cuda.runtime.getDevice())


def current_stream() -> Any:
    """The stream device work is queued on now (cupy's current stream)."""
    return device_module().cuda.get_current_stream()


def nccl_module() -> ModuleType | None:
    """cupy's NCCL bindings (``cupy.cuda.nccl``) when cupy, a GPU and NCCL are all there, else None."""
    cupy = _import_cupy()
    if cupy is None:
        return None
    try:
        module = importlib.import_module("cupy.cuda.nccl")
    except Exception:  # noqa: BLE001 - cupy built or installed without NCCL
        return None
    return module if getattr(module, "available", True) else None


def device_names() -> list[str]:
    """The name of each visible GPU (empty without cupy or a GPU)."""
    cupy = _import_cupy()
    if cupy is None:
        return []
    names = []
    for index in range(cupy.cuda.runtime.getDeviceCount()):
        name = cupy.cuda.runtime.getDeviceProperties(index)["name"]
        names.append(name.decode() if isinstance(name, bytes) else str(name))
    return names


class Transfers:
    """Copies between device arrays and page-locked host memory, on side streams of their own.

    What the collectives' staged path is built from: one instance per
    Communicator, its host memory allocated once (grown to the largest
    buffer seen) and reused by every call. Device-to-host and host-to-device
    copies run on two streams, so the copy-in of one segment, the copy-out
    of another and the host's MPI work on a third all overlap.
    """

    def __init__(self) -> None:
        self.cupy = device_module()
        cuda = self.cupy.cuda
        self._in = cuda.Stream(non_blocking=True)
        self._out = cuda.Stream(non_blocking=True)
        self._host: np.ndarray = np.empty(0, np.uint8)
        self._spare: list[np.ndarray] = []  # message buffers not in use
        # Events made once and recorded again: ``begin``'s, and two for device-to-host copies in turn.
        self._mark = cuda.Event(disable_timing=True)
        self._arrivals = [cuda.Event(disable_timing=True) for _ in range(2)]
        self._turn = 0

    def host(self, nbytes: int) -> np.ndarray:
        """At least ``nbytes`` of page-locked host memory (uint8), the same memory until a larger call."""
        if self._host.size < nbytes:
            self._host = self._page_locked(nbytes)
        return self._host[:nbytes]

    def message(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory of at least ``nbytes`` (uint8) for one message, from a pool of buffers
        that ``release`` gives back to."""
        for index, spare in enumerate(self._spare):
            if spare.size >= nbytes:
                return self._spare.pop(index)
        return self._page_locked(nbytes)

    def _page_locked(self, nbytes: int) -> np.ndarray:
        """A new page-locked uint8 array of the power of two at or above ``nbytes`` (it keeps the memory)."""
        size = 1 << max(nbytes - 1, 1).bit_length()
        return np.frombuffer(self.cupy.cuda.alloc_pinned_memory(size), np.uint8, size)

    def release(self, host: np.ndarray) -> None:
        """Give a buffer from ``message`` back to the pool."""
        self._spare.append(host)

    def pin(self, host: np.ndarray) -> bool:
        """Page-lock host memory allocated elsewhere (a node-shared window), so copies to and from it run
        asynchronously; False where CUDA refuses (copies then still work, the driver staging them)."""
        try:
            self.cupy.cuda.runtime.hostRegister(host.ctypes.data, host.nbytes, 0)
        except Exception:  # noqa: BLE001 - cupy raises its own CUDARuntimeError; any refusal means "not pinned"
            return False
        return True

    def unpin(self, host: np.ndarray) -> None:
        """Undo ``pin`` (before the memory is freed)."""
        self.cupy.cuda.runtime.hostUnregister(host.ctypes.data)

    def begin(self) -> None:
        """Order the side streams after the work queued so far on the current stream (it wrote the data)."""
        self._mark.record(self.cupy.cuda.get_current_stream())
        self._in.wait_event(self._mark)
        self._out.wait_event(self._mark)

    def to_host(self, device: Any, host: np.ndarray) -> Any:
        """Queue a copy of contiguous ``device`` into ``host`` (same byte length); an event that marks its
        end, good until the next call but one (so two such copies can be in flight)."""
        self._copy(host.ctypes.data, device.data.ptr, device.nbytes, self._in, "memcpyDeviceToHost")
        event, self._turn = self._arrivals[self._turn], 1 - self._turn
        event.record(self._in)
        return event

    def to_device(self, host: np.ndarray, device: Any) -> None:
        """Queue a copy of ``host`` into contiguous ``device``; ``end`` waits for it."""
        self._copy(device.data.ptr, host.ctypes.data, device.nbytes, self._out, "memcpyHostToDevice")

    def _copy(self, dst: int, src: int, nbytes: int, stream: Any, kind: str) -> None:
        runtime = self.cupy.cuda.runtime
        runtime.memcpyAsync(dst, src, nbytes, getattr(runtime, kind), stream.ptr)

    @staticmethod
    def wait(event: Any) -> None:
        """Block until the copy that ``event`` marks is done."""
        event.synchronize()

    def end(self) -> None:
        """Block until every queued host-to-device copy is done (the collective's results are in place)."""
        self._out.synchronize()


def to_device(array: np.ndarray, xp: ModuleType) -> Any:
    """Copy a host array into the memory of ``xp`` (no copy for numpy)."""
    return array if xp is np else xp.asarray(array)


def to_host(array: Any) -> np.ndarray:
    """Return a numpy array with the contents of ``array`` (no copy for numpy)."""
    if isinstance(array, np.ndarray):
        return array
    return array.get()


def copy_to_host(device: Any, host: np.ndarray) -> None:
    """Copy contiguous ``device`` into the host array ``host`` of the same shape and dtype (waits for it)."""
    device.get(out=host)


def copy_to_device(host: np.ndarray, device: Any) -> None:
    """Copy the host array ``host`` into contiguous ``device`` of the same shape and dtype."""
    device.set(host)


def synchronize(xp: ModuleType) -> None:
    """Wait until queued device work has finished (a no-op for numpy)."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def synchronize_device() -> None:
    """Wait until the current stream's queued work is done: before MPI reads a device array directly."""
    synchronize(device_module())


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
