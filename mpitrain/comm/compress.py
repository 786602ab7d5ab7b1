"""Gradient compression for the all-reduce of a flat float32 gradient buffer.

Each compressor averages ``grads[start:stop]`` over the ranks in place,
sending fewer bytes than the float32 values:

- ``fp16``: scale by a power of two so that the largest magnitude on any
  rank, times the rank count, sits just under float16's maximum; cast to
  float16 (half the bytes), reduce (in float32 arithmetic per hop), cast
  back and unscale. Small gradients then stay normal float16 numbers
  instead of subnormals, which lose precision and which numpy converts
  many times more slowly.
- ``bf16``: round each float32 to bfloat16 (``ml_dtypes.bfloat16``, the
  same exponent range, so no scaling), reduce in float32 arithmetic per
  hop, widen back.
- ``topk:RATIO``: each rank sends only the largest RATIO of its entries
  (indices and values, through an all-gather) and keeps the rest as a
  residual that is added to its next gradient (error feedback), so nothing
  is lost, only delayed.

Wire buffers are allocated once (node-shared where possible) and reused;
``close`` gives them back. Device (cupy) gradients are compressed on the
device, their wire buffers and residuals there too. cupy has no bfloat16,
so bf16 rounds on the device into 16-bit patterns (as ml_dtypes rounds:
to nearest even), and those travel through a node-shared host wire buffer
that the host reduces as bfloat16: half the bytes cross PCIe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from mpitrain import backend
from mpitrain.comm.communicator import Communicator
from mpitrain.comm.ops import BFLOAT16

KINDS = ("none", "fp16", "bf16", "topk:RATIO")
Inspect = Callable[[np.ndarray], None] | None


class Compressor:
    """No compression: a plain mean all-reduce."""

    name = "none"

    def reduce_mean(
        self, comm: Communicator, grads: np.ndarray, start: int, stop: int, algorithm: str, inspect: Inspect = None
    ) -> None:
        """Average ``grads[start:stop]`` over the ranks, in place (same call on every rank).

        ``inspect`` is called with averaged values as ``Communicator.allreduce``
        calls it: the ranks' calls together see every element.
        """
        comm.allreduce(grads[start:stop], op="mean", algorithm=algorithm, inspect=inspect)

    def close(self, comm: Communicator) -> None:
        """Give back the wire buffers (collective)."""


class CastCompressor(Compressor):
    """fp16 or bf16 on the wire: half the bytes of float32."""

    def __init__(self, comm: Communicator, count: int, kind: str, xp: ModuleType = np) -> None:
        self.name = kind
        self.xp = xp
        if kind == "fp16":
            self.wire = comm.allocate(count, np.float16) if xp is np else xp.zeros(count, np.float16)
        else:  # the host reduces bfloat16; device gradients' bit patterns are rounded on the device
            self.wire = comm.allocate(count, BFLOAT16)
            self.bits = None if xp is np else xp.zeros(count, np.uint16)

    def reduce_mean(
        self, comm: Communicator, grads: np.ndarray, start: int, stop: int, algorithm: str, inspect: Inspect = None
    ) -> None:
        wire, values = self.wire[start:stop], grads[start:stop]
        if self.name == "bf16" and self.bits is None:
            np.copyto(wire, values, casting="unsafe")  # rounds to nearest
            comm.allreduce(wire, op="mean", algorithm=algorithm)
            np.copyto(values, wire)
        elif self.name == "bf16":
            bits, patterns = self.bits[start:stop], wire.view(np.uint16)
            _round_to_bfloat16(self.xp, values, bits)
            backend.copy_to_host(bits, patterns)
            comm.allreduce(wire, op="mean", algorithm=algorithm)
            backend.copy_to_device(patterns, bits)
            values[...] = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)  # exact: bfloat16 widens
        else:
            scale = self._scale(comm, values)
            self.xp.multiply(values, scale, out=wire, casting="same_kind")
            comm.allreduce(wire, op="mean", algorithm=algorithm)
            self.xp.multiply(wire, 1 / scale, out=values)  # exact: scale is a power of two
        if inspect is not None:
            inspect(values)

    @staticmethod
    def _scale(comm: Communicator, values: Any) -> Any:
        """The power of two that brings the largest magnitude on any rank to at most 65504 / ranks
        (so the float32 sum of the float16 values cannot overflow); 1 for zeros, NaN or Inf. A float32
        array of one element where the values are: on a GPU no scalar is read back for it. The
        exponent comes from frexp, exactly (a log2 rounded up near a power of two would overflow)."""
        xp = backend.array_module_of(values)
        peak = xp.zeros(1, np.float64)
        if values.size:
            peak[0] = xp.maximum(values.max(), -values.min())
        comm.allreduce(peak, op="max")
        usable = (peak > 0) & (peak < math.inf)
        ratio = float(np.finfo(np.float16).max) / (comm.size * xp.where(usable, peak, 1.0))
        _, exponent = xp.frexp(ratio)  # ratio = m * 2**exponent, m in [0.5, 1): floor(log2) = exponent - 1
        # At most 2**126: a larger power overflows float32 (gradients below about 1e-34 asked for one).
        power = xp.minimum(exponent - 1, 126)
        return xp.where(usable, xp.ldexp(xp.ones(1, np.float32), power), np.float32(1)).astype(np.float32)

    def close(self, comm: Communicator) -> None:
        comm.release(self.wire)


def _round_to_bfloat16(xp: ModuleType, values: Any, out: Any) -> None:
    """float32 ``values`` to bfloat16 bit patterns in uint16 ``out``: round to nearest, ties to even (the
    upper 16 bits plus the carry of the lower ones), NaN kept NaN; what ml_dtypes gives, bit for bit."""
    bits = values.view(np.uint32)
    u32 = np.uint32
    carry = (bits >> u32(16)) & u32(1)
    carry += u32(0x7FFF)
    rounded = (bits + carry) >> u32(16)
    nan = (bits & u32(0x7FFFFFFF)) > u32(0x7F800000)
    out[...] = xp.where(nan, (bits >> u32(16)) | u32(0x40), rounded).astype(np.uint16)


class TopKCompressor(Compressor):
    """Top-k sparsification with error feedback; every rank ends with the same averaged sparse sum."""

    def __init__(self, count: int, ratio: float, xp: ModuleType = np) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"top-k ratio must be in (0, 1], got {ratio}")
        self.name = f"topk:{ratio:g}"
        self.ratio = ratio
        self.xp = xp
        self.residual = xp.zeros(count, np.float32)

    def reduce_mean(
        self, comm: Communicator, grads: np.ndarray, start: int, stop: int, algorithm: str, inspect: Inspect = None
    ) -> None:
        xp = self.xp
        acc = self.residual[start:stop]
        acc += grads[start:stop]
        k = self._k(stop - start)
        keep = xp.sort(xp.argpartition(xp.abs(acc), acc.size - k)[acc.size - k :])
        indices = xp.empty(k * comm.size, np.int64)
        values = xp.empty(k * comm.size, np.float32)
        mine = slice(comm.rank * k, (comm.rank + 1) * k)
        indices[mine], values[mine] = keep, acc[keep]
        acc[keep] = 0.0  # what was sent leaves the residual; the rest waits for the next step
        comm.allgather(indices)
        comm.allgather(values)
        out = grads[start:stop]
        out.fill(0.0)
        for rank in range(comm.size):  # rank order, the same on every rank; a rank's indices are distinct
            part = slice(rank * k, (rank + 1) * k)
            out[indices[part]] += values[part]
        out /= comm.size
        if inspect is not None:
            inspect(out)

    def _k(self, count: int) -> int:
        return max(1, math.ceil(self.ratio * count))


def build_compressor(spec: str, comm: Communicator, count: int, xp: ModuleType = np) -> Compressor:
    """Compressor from a spec: "none", "fp16", "bf16" or "topk:RATIO" (e.g. topk:0.01), for gradients of
    the array module ``xp`` (numpy or cupy).

    Raises:
        ValueError: an unknown spec or a ratio outside (0, 1].
    """
    if spec == "none":
        return Compressor()
    if spec in ("fp16", "bf16"):
        return CastCompressor(comm, count, spec, xp)
    if spec.startswith("topk:"):
        try:
            ratio = float(spec[5:])
        except ValueError:
            ratio = math.nan
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"compression {spec!r}: expected topk:RATIO with RATIO in (0, 1], e.g. topk:0.01")
        return TopKCompressor(count, ratio, xp)
    raise ValueError(f"unknown compression {spec!r}; expected one of {', '.join(KINDS)}")
