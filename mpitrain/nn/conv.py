"""Image layers: Conv2d (im2col and matrix products) and MaxPool2d, on NCHW arrays.

Workspaces as in ``layers``: outputs and input gradients are valid until the
layer's next forward (backward). In training, a Conv2d that needs no input
gradient runs fused with a following MaxPool2d (``Conv2d.fuses``; arranged
by ``Sequential``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpitrain.nn.layers import positive_int, workspace
from mpitrain.nn.module import Module, Parameter

# Products per sample, measured with OpenBLAS on one thread at a micro-batch of 32 (time of the
# product plus any copy to or from NCHW):
# - Forward, per sample W @ cols[n] (written straight into NCHW) against one cols.T @ W.T over the
#   whole batch: 1->16 channels at 28x28 0.08 ms against 0.35; 3->16 at 32x32 0.32 against 0.68;
#   16->32 at 14x14 (144 rows, 196 pixels) a tie; 32->64 at 7x7 (288 rows, 49 pixels) 0.26 against
#   0.20. So per sample while a sample has at least as many output pixels as im2col rows.
# - Weight gradient, per sample grad[n] @ cols[n].T summed against one cols @ g.T (after g's
#   transpose): 9 rows 0.11 ms against 0.37; 27 rows 0.38 against 0.74; 54 rows 0.36 against 0.31;
#   144 rows 0.84 against 0.58. So per sample below this many im2col rows.
SAMPLE_PRODUCTS_MAX_DEPTH = 32


def _offset_ranges(offset: int, size: int, out_size: int, stride: int, padding: int) -> tuple[slice, slice]:
    """For kernel offset ``offset`` along one axis: (input slice, output slice) of the positions inside the input.

    Output position y reads input position y * stride + offset - padding; positions in the padding are
    left out (their im2col entries stay zero).
    """
    first = max(0, -(-(padding - offset) // stride))
    last = min(out_size - 1, (size - 1 + padding - offset) // stride)
    if last < first:
        return slice(0, 0), slice(0, 0)
    start = first * stride + offset - padding
    return slice(start, start + (last - first) * stride + 1, stride), slice(first, last + 1)


class Conv2d(Module):
    """2-D convolution (cross-correlation) by im2col and matrix products.

    weight: (out_channels, in_channels, kernel, kernel); input (N, C, H, W).
    Padding is never materialised: im2col copies only the positions inside
    the input, and col2im adds only to them.
    """

    writes_stale_grads = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        init: str = "he",
    ) -> None:
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.kernel = positive_int("kernel_size", kernel_size)
        self.stride = positive_int("stride", stride)
        if not isinstance(padding, (int, np.integer)) or padding < 0:
            raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
        self.padding = int(padding)
        fan_in = self.in_channels * self.kernel**2
        fan_out = self.out_channels * self.kernel**2
        shape = (self.out_channels, self.in_channels, self.kernel, self.kernel)
        self.weight = Parameter(shape, init, fan_in, fan_out)
        self.bias = Parameter((self.out_channels,), "zeros")
        self._plans: dict[tuple[int, int, int], list] = {}  # im2col plans by (height, width, pool)

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """Spatial output size for an (h, w) input."""
        k, s, p = self.kernel, self.stride, self.padding
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def _gather_plan(self, h: int, w: int, pool: int = 1) -> list[tuple[int, int, int, int, Any, Any]]:
        """How im2col copies an (h, w) input: (i, j, di, dj, input (rows, columns), output (rows, columns)).

        Kernel offset (i, j) of output pixel (pool * y + di, pool * x + dj) is copied to column
        (di, dj, y, x): with ``pool`` 1 the plain pixel order; else pool-window position first, over
        the pixels inside whole windows only. Kept per input size: building it costs 10-25 us,
        and a step asks for it once per micro-batch and convolution, twice with an input gradient.
        """
        if (h, w, pool) not in self._plans:
            self._plans[h, w, pool] = self._new_gather_plan(h, w, pool)
        return self._plans[h, w, pool]

    def _new_gather_plan(self, h: int, w: int, pool: int) -> list[tuple[int, int, int, int, Any, Any]]:
        k, s, p = self.kernel, self.stride, self.padding
        oh, ow = self.output_hw(h, w)
        q = pool
        rows = {(i, d): _offset_ranges(d * s + i, h, oh // q, q * s, p) for i in range(k) for d in range(q)}
        columns = {(j, d): _offset_ranges(d * s + j, w, ow // q, q * s, p) for j in range(k) for d in range(q)}
        return [
            (i, j, di, dj, (rows[i, di][0], columns[j, dj][0]), (rows[i, di][1], columns[j, dj][1]))
            for i in range(k)
            for j in range(k)
            for di in range(q)
            for dj in range(q)
        ]

    def _check_input(self, x: Any) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d expects input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        oh, ow = self.output_hw(*x.shape[2:])
        if oh < 1 or ow < 1:
            raise ValueError(
                f"Conv2d kernel {self.kernel} does not fit input {x.shape[2]}x{x.shape[3]} with padding {self.padding}"
            )
        return oh, ow

    def _im2col(self, x: Any, pool: int) -> Any:
        """Columns (C*k*k, N, pool*pool, pixels): one slab per pool-window position (one slab, the
        plain pixel order, for ``pool`` 1), as ``_gather_plan`` orders them.

        Stored transposed, (C, k, k, N, ...): each (c, i, j) row is filled by copies whose inner axis
        is contiguous, far faster than gathering k x k windows per pixel. Entries that fall in the
        padding are zero from allocation and never written, while the input's height and width and
        the order stay the same (several sizes give the same output size when stride > 1).
        """
        n, c, h, w = x.shape
        oh, ow = self.output_hw(h, w)
        k, q = self.kernel, pool
        cols = workspace(self, "cols", (c, k, k, n, q, q, oh // q, ow // q), x.dtype, zeroed=True)
        if getattr(self, "_cols_source", None) != (h, w, q):
            cols.fill(0)
        self._cols_source = (h, w, q)
        channels_first = x.transpose(1, 0, 2, 3)
        for i, j, di, dj, source, target in self._gather_plan(h, w, q):
            cols[:, i, j, :, di, dj][:, :, target[0], target[1]] = channels_first[:, :, source[0], source[1]]
        self._x_shape = x.shape
        return cols.reshape(c * k * k, n, q * q, -1)

    def _product(self, out: Any) -> None:
        """out (slabs, N, O, pixels) = weight @ columns + bias."""
        xp, cols = self.xp, self._cols
        (depth, n, slabs, pixels), o = cols.shape, self.out_channels
        weight = self.weight.data.reshape(o, depth)
        if pixels >= depth:  # per sample and slab, straight into place
            xp.matmul(weight, cols.transpose(2, 1, 0, 3), out=out)
            out += self.bias.data.reshape(o, 1)
        else:  # one product with a row per output pixel, then into place
            gemm = workspace(self, "gemm", (n * slabs * pixels, o), out.dtype)
            xp.matmul(cols.reshape(depth, -1).T, weight.T, out=gemm)
            gemm += self.bias.data
            out[...] = gemm.reshape(n, slabs, pixels, o).transpose(1, 0, 3, 2)

    def forward(self, x: Any) -> Any:
        oh, ow = self._check_input(x)
        n, o = x.shape[0], self.out_channels
        self._cols = self._im2col(x, 1)
        out = workspace(self, "out", (n, o, oh, ow), x.dtype)
        self._product(out.reshape(1, n, o, -1))
        return out

    def fuses(self, following: Module) -> bool:
        """A max-pool whose windows do not overlap: ``forward_fused`` computes the convolution's
        outputs one pool-window position at a time, so the pool reads contiguous slabs."""
        return isinstance(following, MaxPool2d) and following.stride == following.kernel

    def forward_fused(self, x: Any, following: Module) -> Any:
        """This convolution, then the max-pool ``following`` (training; see ``fuses``).

        Measured, 1->16 channels at 28x28 and a 2x2 pool, 32 samples: forward and backward
        1.45 -> 0.99 ms.
        """
        oh, ow = self._check_input(x)
        q = following.kernel
        self._fused = oh >= q and ow >= q
        if not self._fused:  # the pool reports the size problem
            return following.forward(self.forward(x))
        n, o = x.shape[0], self.out_channels
        self._cols = self._im2col(x, q)
        out = workspace(self, "pooled", (q * q, n, o, oh // q, ow // q), x.dtype)
        self._product(out.reshape(q * q, n, o, -1))
        return following.pool_slabs(out)

    def backward_fused(self, grad: Any, following: Module) -> None:
        """Backward of ``forward_fused``: parameter gradients only."""
        if not self._fused:
            self.backward(following.backward(grad))
            return
        q = following.kernel
        dpooled = workspace(self, "dpooled", (q * q, *grad.shape), grad.dtype)
        following.unpool_slabs(grad, dpooled)
        self._parameter_grads(dpooled.reshape(q * q, *grad.shape[:2], -1))

    def _parameter_grads(self, grad: Any) -> None:
        """Add the weight and bias gradients for output gradient ``grad`` (slabs, N, O, pixels)."""
        xp, cols = self.xp, self._cols
        (depth, n, slabs, pixels), o = cols.shape, self.out_channels
        if depth < SAMPLE_PRODUCTS_MAX_DEPTH:
            dw = workspace(self, "dw", (slabs, n, o, depth), grad.dtype)
            xp.matmul(grad, cols.transpose(2, 1, 3, 0), out=dw)
            self.weight.add_grad(dw.sum(axis=(0, 1)).reshape(self.weight.shape))
            self.bias.add_grad(grad.sum(axis=(0, 1, 3)))
            return
        g = workspace(self, "g", (o, n, slabs, pixels), grad.dtype)
        g[...] = grad.transpose(2, 1, 0, 3)
        g = g.reshape(o, -1)
        dw = workspace(self, "dw", (depth, o), grad.dtype)
        # 27% faster than g @ cols.T; and a gemm adding straight into the (O, depth) gradient takes
        # 0.58 ms where this and the transposed add take 0.50 (16->32 channels, 14x14, 32 samples)
        xp.matmul(cols.reshape(depth, -1), g.T, out=dw)
        self.weight.add_grad(dw.T.reshape(self.weight.shape))
        self.bias.add_grad(g.sum(axis=1))

    def backward(self, grad: Any) -> Any:
        n, o, oh, ow = grad.shape
        self._parameter_grads(grad.reshape(1, n, o, -1))
        if not self.need_input_grad:
            return None
        # The input gradient goes through columns with the samples innermost, (C*k*k, OH, OW, N): then
        # col2im adds runs of OW * N contiguous values instead of OW (16->32 channels at 14x14, 32
        # samples: 1.35 -> 1.03 ms with both transposes).
        depth = self._cols.shape[0]
        g = workspace(self, "g_samples_last", (o, oh, ow, n), grad.dtype)
        g[...] = grad.transpose(1, 2, 3, 0)
        dcols = workspace(self, "dcols", (depth, oh * ow * n), grad.dtype)
        self.xp.matmul(self.weight.data.reshape(o, depth).T, g.reshape(o, -1), out=dcols)
        return self._col2im(dcols)

    def _col2im(self, dcols: Any) -> Any:
        """Sum each column entry, (C*k*k, OH*OW*N) with samples innermost, back onto the input
        position it was copied from; returns the input gradient (N, C, H, W)."""
        n, c, h, w = self._x_shape
        k = self.kernel
        (oh, ow) = self.output_hw(h, w)
        dcols = dcols.reshape(c, k, k, oh, ow, n)
        dx_samples_last = workspace(self, "dx_samples_last", (c, h, w, n), dcols.dtype)
        # A window that reaches every input position (stride 1, padding k // 2) is assigned first,
        # which saves the fill; the others add onto it.
        everywhere = (slice(0, h, 1), slice(0, w, 1))
        windows = sorted(self._gather_plan(h, w), key=lambda window: window[4] != everywhere)
        if windows[0][4] != everywhere:
            dx_samples_last.fill(0)
        for index, (i, j, _, _, source, target) in enumerate(windows):
            part = dcols[:, i, j][:, target[0], target[1]]
            if index == 0 and source == everywhere:
                dx_samples_last[...] = part
            else:
                dx_samples_last[:, source[0], source[1]] += part
        dx = workspace(self, "dx", self._x_shape, dcols.dtype)
        dx[...] = dx_samples_last.transpose(3, 0, 1, 2)
        return dx


class MaxPool2d(Module):
    """Max over kernel x kernel windows (stride defaults to the kernel size).

    In training, forward also records which window position (row-major, the
    first on ties) holds each maximum, so backward routes each gradient with
    one comparison per position instead of re-reading the input.
    """

    def __init__(self, kernel_size: int, stride: int | None = None) -> None:
        self.kernel = positive_int("kernel_size", kernel_size)
        self.stride = self.kernel if stride is None else positive_int("stride", stride)
        self._index_dtype = np.uint8 if self.kernel**2 <= 255 else np.int32

    def forward(self, x: Any) -> Any:
        xp = self.xp
        k, s = self.kernel, self.stride
        if x.ndim != 4 or x.shape[2] < k or x.shape[3] < k:
            raise ValueError(f"MaxPool2d({k}) expects input (N, C, H>={k}, W>={k}), got {tuple(x.shape)}")
        oh, ow = (x.shape[2] - k) // s + 1, (x.shape[3] - k) // s + 1
        self._out_hw = (oh, ow)
        shape = (*x.shape[:2], oh, ow)
        if not self.training:  # a running maximum over the k*k window positions, each a strided view of x
            self._recorded = False
            out = workspace(self, "out", shape, x.dtype)
            out[...] = self._window(x, 0, 0)
            for i, j in self._positions()[1:]:
                xp.maximum(out, self._window(x, i, j), out=out)
            return out
        # Each window is copied once into a contiguous slab, so the comparisons below run on
        # contiguous data (SIMD) rather than reading strided windows twice each: 13-25% faster.
        slabs = workspace(self, "slabs", (k * k, *shape), x.dtype)
        for position, (i, j) in enumerate(self._positions()):
            slabs[position] = self._window(x, i, j)
        return self.pool_slabs(slabs, x.shape)

    def pool_slabs(self, slabs: Any, x_shape: tuple[int, ...] | None = None) -> Any:
        """Training forward from the windows laid out as slabs: ``slabs[p]`` (N, C, OH, OW) holds window
        position p (row-major) of every output. Records the argmax for ``unpool_slabs``, and for
        ``backward`` when the input's shape ``x_shape`` is given."""
        xp, shape = self.xp, slabs.shape[1:]
        self._x_shape = x_shape
        out = workspace(self, "out", shape, slabs.dtype)
        out[...] = slabs[0]
        where = workspace(self, "where", shape, self._index_dtype)
        where.fill(0)
        better = workspace(self, "better", shape, bool)
        marks = workspace(self, "marks", shape, self._index_dtype)
        for position in range(1, len(slabs)):
            window = slabs[position]
            xp.greater(window, out, out=better)  # strictly: on ties the earlier position keeps it
            xp.multiply(better, self._index_dtype(position), out=marks)
            xp.maximum(where, marks, out=where)  # positions only grow, so the latest improvement wins
            xp.maximum(out, window, out=out)
        self._recorded = True
        return out

    def unpool_slabs(self, grad: Any, dslabs: Any) -> None:
        """Backward into slabs laid out as ``pool_slabs``'s: ``dslabs[p]`` gets ``grad`` where window
        position p held the maximum, else 0."""
        self._check_recorded()
        hit = workspace(self, "hit", grad.shape, bool)
        for position in range(len(dslabs)):
            self.xp.equal(self._ws_where, position, out=hit)
            self.xp.multiply(grad, hit, out=dslabs[position])

    def _check_recorded(self) -> None:
        if not getattr(self, "_recorded", False):
            raise RuntimeError("MaxPool2d.backward needs a forward in training mode first")

    def _positions(self) -> list[tuple[int, int]]:
        return [divmod(idx, self.kernel) for idx in range(self.kernel * self.kernel)]

    def _window(self, a: Any, i: int, j: int) -> Any:
        oh, ow = self._out_hw
        s = self.stride
        return a[:, :, i : i + s * (oh - 1) + 1 : s, j : j + s * (ow - 1) + 1 : s]

    def backward(self, grad: Any) -> Any:
        self._check_recorded()
        if self._x_shape is None:
            raise RuntimeError("MaxPool2d.backward after pool_slabs without the input's shape: use unpool_slabs")
        xp = self.xp
        (oh, ow), k, s = self._out_hw, self.kernel, self.stride
        dx = workspace(self, "dx", self._x_shape, grad.dtype)
        if not (s == k and oh * k == dx.shape[2] and ow * k == dx.shape[3]):
            dx.fill(0)  # some inputs are in no window, or windows overlap
        hit = workspace(self, "hit", grad.shape, bool)
        where = self._ws_where
        for position, (i, j) in enumerate(self._positions()):
            xp.equal(where, position, out=hit)
            if s >= k:  # windows do not overlap: plain writes suffice
                xp.multiply(grad, hit, out=self._window(dx, i, j))
            else:
                self._window(dx, i, j)[...] += grad * hit
        return dx
