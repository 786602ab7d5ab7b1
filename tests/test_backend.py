"""backend.matmul_into against numpy's own product, on each of its paths."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from mpitrain import backend


def operand(rng: np.random.Generator, shape: tuple[int, int], dtype: type, order: str) -> np.ndarray:
    return np.asarray(rng.standard_normal(shape) * 2, dtype=dtype, order=order)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64])
@pytest.mark.parametrize("orders", ["CCC", "FCC", "CFC", "FFC", "CCF", "FFF"])  # a, b, out
@pytest.mark.parametrize("add", [True, False])
@pytest.mark.parametrize("gemm_from", [1, None])  # 1: every size adds through BLAS; None: the default size
def test_matmul_into_writes_or_adds_in_place(
    monkeypatch: pytest.MonkeyPatch, dtype: type, orders: str, add: bool, gemm_from: int | None
) -> None:
    if gemm_from is not None:
        monkeypatch.setattr(backend, "GEMM_ADD_MIN_ELEMENTS", gemm_from)
    rng = np.random.default_rng(len(orders) + add)
    for m, k, n in [(5, 3, 4), (1, 6, 1), (4, 1, 3), (0, 2, 3), (3, 0, 2), (512, 40, 512)]:
        a, b = operand(rng, (m, k), dtype, orders[0]), operand(rng, (k, n), dtype, orders[1])
        # out is a view into a larger buffer, as a parameter's gradient is: nothing around it may change
        flat = np.full(m * n + 7, 3, dtype=dtype)
        region = flat[5 : 5 + m * n]
        out = region.reshape(m, n) if orders[2] == "C" else region.reshape(n, m).T
        out[...] = operand(rng, (m, n), dtype, "C")
        expected = (out.astype(np.float64) if add else 0) + a.astype(np.float64) @ b.astype(np.float64)
        backend.matmul_into(a, b, out, add=add)
        tol = 0.05 * max(k, 1) if dtype == np.float16 else 1e-4 * max(k, 1)
        np.testing.assert_allclose(out.astype(np.float64), expected, rtol=1e-3, atol=tol, err_msg=str((m, k, n)))
        assert (flat[:5] == 3).all() and (flat[5 + m * n :] == 3).all()


def test_matmul_into_takes_strided_operands_and_a_scratch() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 600))[::2, ::2]  # neither C- nor Fortran-contiguous
    b = rng.standard_normal((300, 1000))[:, ::2]
    out = rng.standard_normal((4, 500))
    expected = out + a @ b
    scratch = np.empty_like(out)
    backend.matmul_into(a, b, out, add=True, scratch=lambda: scratch)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(scratch, a @ b, rtol=1e-12, atol=1e-12)  # the product went through it


@pytest.mark.parametrize("out_order", ["C", "F"])
def test_matmul_into_adds_a_large_product_without_copies(out_order: str) -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((96, 512), dtype=np.float32).T  # x.T of a weight gradient: Fortran-ordered
    b = rng.standard_normal((96, 1024), dtype=np.float32)
    out = np.asarray(rng.standard_normal((512, 1024), dtype=np.float32), order=out_order)
    assert out.size >= backend.GEMM_ADD_MIN_ELEMENTS
    expected = out + a @ b
    tracemalloc.start()
    backend.matmul_into(a, b, out, add=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3)
    assert peak < out.nbytes // 8, f"adding the product allocated {peak} bytes"
