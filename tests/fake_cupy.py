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
REGISTERED: set[int] = set()  # host memory page-locked through hostRegister, by address


class _Flags:
    def __init__(self, a: np.ndarray) -> None:
        self.c_contiguous = a.flags.c_contiguous
        self.f_contiguous = a.flags.f_contiguous


def _unwrap(x: Any) -> Any:
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):  # cupy refuses host arrays where it wants device ones
        raise TypeError(f"Unsupported type {type(x)} (a host array given to a device function)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _wrap(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return ndarray(x)
    if isinstance(x, np.generic):  # cupy's reductions return 0-d device arrays
        return ndarray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


class _DeviceFunction:
    """A numpy function (or namespace) made to take and return "device" arrays, as cupy's do."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self._target(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
        return _wrap(result)

    def __getattr__(self, name: str) -> Any:
        return _lift(getattr(self._target, name))


def _lift(obj: Any) -> Any:
    if isinstance(obj, type) or not (callable(obj) or isinstance(obj, types.ModuleType)):
        return obj  # dtypes and constants are numpy's own, as in cupy
    return _DeviceFunction(obj)


class ndarray:
    """A "device" array: a numpy array reachable only through the CUDA array interface."""

    def __init__(self, host: np.ndarray) -> None:
        self._a = host

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    ndim = property(lambda self: self._a.ndim)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    T = property(lambda self: ndarray(self._a.T))
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
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, np.ndarray) and value.ndim:  # cupy copies host data in: count it
            COPIES["to_device"] += 1
            self._a[_unwrap(key)] = value
            return
        self._a[_unwrap(key)] = _unwrap(value)

    def _scalar(self, kind: type) -> Any:
        COPIES["to_host"] += 1  # a device scalar read on the host is a copy
        return kind(self._a)

    def __float__(self) -> float:
        return self._scalar(float)

    def __int__(self) -> int:
        return self._scalar(int)

    def __bool__(self) -> bool:
        return self._scalar(bool)

    def item(self) -> Any:
        COPIES["to_host"] += 1
        return self._a.item()

    def get(self, stream: Any = None, out: Any = None) -> np.ndarray:
        COPIES["to_host"] += 1
        if out is None:
            return self._a.copy()
        out[...] = self._a
        return out

    def set(self, host: np.ndarray, stream: Any = None) -> None:
        COPIES["to_device"] += 1
        self._a[...] = host

    def __getattr__(self, name: str) -> Any:  # reshape, view, sum, max, astype, fill, ... as numpy's
        if name.startswith("__"):  # no __dlpack__ or __array_interface__: memory only through the CAI
            raise AttributeError(name)
        return _lift(getattr(self._a, name))


def _operator(name: str) -> Any:
    def apply(self: ndarray, *args: Any) -> Any:
        return _wrap(getattr(self._a, name)(*_unwrap(args)))

    return apply


def _in_place(name: str) -> Any:
    def apply(self: ndarray, other: Any) -> ndarray:
        getattr(self._a, name)(_unwrap(other))
        return self

    return apply


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift",
              "rshift"):  # fmt: skip
    for _form in (f"__{_name}__", f"__r{_name}__"):
        setattr(ndarray, _form, _operator(_form))
    setattr(ndarray, f"__i{_name}__", _in_place(f"__i{_name}__"))
for _form in ("__neg__", "__pos__", "__abs__", "__invert__", "__lt__", "__le__", "__gt__", "__ge__", "__eq__",
              "__ne__"):  # fmt: skip
    setattr(ndarray, _form, _operator(_form))
ndarray.__hash__ = None  # type: ignore[assignment]


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
    cupy.__getattr__ = lambda name: _lift(getattr(np, name))  # every other name: numpy's, on "device" arrays
    cupy.__version__ = "0-stand-in"
    cupy.ndarray = ndarray

    def asarray(a: Any, dtype: Any = None) -> ndarray:
        if isinstance(a, ndarray):
            return a if dtype is None else ndarray(a._a.astype(dtype))
        COPIES["to_device"] += 1
        return ndarray(np.array(a, dtype=dtype))

    cupy.asarray = asarray
    cupy.asnumpy = lambda a: a.get()
    cupy.array = lambda a, order="K", copy=True: ndarray(np.array(asarray(a)._a, order=order, copy=copy))
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        getDevice=lambda: _Device.current,
        getDeviceProperties=lambda i: {"name": b"stand-in GPU"},
        memcpyAsync=_memcpy,
        hostRegister=_host_register,
        hostUnregister=REGISTERED.remove,
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


def _pointer_array(pointer: int, count: int, dtype: Any) -> np.ndarray:
    """The ``count`` elements at a "device" pointer (host memory here) as a numpy array."""
    nbytes = count * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * nbytes).from_address(pointer), dtype, count) if count else np.empty(0, dtype)


def _host_register(pointer: int, nbytes: int, flags: int) -> None:
    """As cudaHostRegister: refuses memory this process has registered already."""
    if pointer in REGISTERED:
        raise RuntimeError("cudaErrorHostMemoryAlreadyRegistered: part or all of the range was registered")
    REGISTERED.add(pointer)


def _nccl_module() -> types.ModuleType:
    """cupy.cuda.nccl's calls that ``comm.nccl`` makes, carried out by MPI over COMM_WORLD on host memory."""
    from mpi4py import MPI

    nccl = types.ModuleType("cupy.cuda.nccl")
    types_ = {"NCCL_FLOAT16": np.float16, "NCCL_FLOAT32": np.float32, "NCCL_FLOAT64": np.float64,
              "NCCL_INT8": np.int8, "NCCL_UINT8": np.uint8, "NCCL_INT32": np.int32, "NCCL_UINT32": np.uint32,
              "NCCL_INT64": np.int64, "NCCL_UINT64": np.uint64}  # fmt: skip
    dtypes = {}
    for code, (name, dtype) in enumerate(types_.items()):
        setattr(nccl, name, code)
        dtypes[code] = dtype
    ops = {0: MPI.SUM, 1: MPI.MAX, 2: MPI.MIN}
    nccl.NCCL_SUM, nccl.NCCL_MAX, nccl.NCCL_MIN = 0, 1, 2
    nccl.available = True
    nccl.calls = []  # (name, count, dtype) of each call, for the tests
    nccl.get_unique_id = lambda: tuple(range(128))

    class NcclCommunicator:
        def __init__(self, ndev: int, uid: tuple, rank: int) -> None:
            if (ndev, rank) != (MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()) or len(uid) != 128:
                raise RuntimeError(f"NCCL stand-in: bad communicator arguments {ndev}, {rank}")
            self.comm = MPI.COMM_WORLD

        def allReduce(self, send: int, recv: int, count: int, datatype: int, op: int, stream: int) -> None:
            nccl.calls.append(("allReduce", count, datatype))
            into = _pointer_array(recv, count, dtypes[datatype])
            source = MPI.IN_PLACE if send == recv else _pointer_array(send, count, dtypes[datatype])
            if dtypes[datatype] == np.float16:  # MPI has no float16 sum: in float32, as NCCL accumulates
                wide = into.astype(np.float32)
                self.comm.Allreduce(MPI.IN_PLACE, wide, op=ops[op])
                into[...] = wide
            else:
                self.comm.Allreduce(source, into, op=ops[op])

        def bcast(self, buff: int, count: int, datatype: int, root: int, stream: int) -> None:
            nccl.calls.append(("bcast", count, datatype))
            self.comm.Bcast(_pointer_array(buff, count, dtypes[datatype]), root=root)

    nccl.NcclCommunicator = NcclCommunicator
    return nccl


def install(monkeypatch: Any, nccl: bool = False) -> types.ModuleType:
    """Make ``import cupy`` give the stand-in for the rest of the test (with a stand-in NCCL if ``nccl``,
    else none); the module."""
    module = _module()
    monkeypatch.setitem(sys.modules, "cupy", module)
    # None: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", _nccl_module() if nccl else None)
    INTERFACE_READS[0] = 0
    COPIES.update(to_host=0, to_device=0)
    return module
