"""The compiled time loops (models/layers/_recurrent_loops.py) against the Python loops they
replace: bitwise the same outputs and gradients, since both call numpy's own BLAS in the same
order, with the per-step product in one call or in blocks (models/layers/_blas.py's
``step_product_block``). Skipped where numpy's BLAS is not the recognised build (the Python loops
then run)."""
import numpy as np
import pytest

from models.layers import _blas, recurrent
from models.layers._blas import SMALL_MATRIX_BOUND, STEP_BLOCK, numpy_gemm, step_product_block
from models.layers._recurrent_loops import _step_times_matrix_into, step_times_matrix_into
from models.layers.recurrent import GRU, LSTM, Bidirectional

pytestmark = pytest.mark.skipif(numpy_gemm() is None,
                                reason="numpy's BLAS is not scipy-openblas ILP64: no compiled loops")


def _forward_backward(layer, x, weights, dy, compiled, monkeypatch):
    monkeypatch.setattr(recurrent, "COMPILED_LOOPS", compiled)
    y, cache = layer.forward(x, weights, {}, training=True)
    dx, grads = layer.backward(weights, cache, dy)
    return y.copy(), dx, grads


@pytest.mark.parametrize("block", [None, 3], ids=["product-as-the-host-chooses", "blocks-of-3"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("make", [LSTM, GRU, lambda units, **kw: Bidirectional(LSTM(units, **kw)),
                                  lambda units, **kw: Bidirectional(GRU(units, **kw))],
                         ids=["lstm", "gru", "bilstm", "bigru"])
def test_compiled_loops_give_bitwise_the_python_loops_results(make, return_sequences, dtype,
                                                              block, monkeypatch):
    if block is not None:  # 5 units: forward (5, 20) and backward (20, 5) products, uneven blocks
        monkeypatch.setattr(recurrent, "step_product_block", lambda rows, inner, columns: block)
    rng = np.random.default_rng(3)
    layer = make(5, return_sequences=return_sequences)
    shape = (7, 4)  # 7 timesteps of 4 features
    weights = {name: value.astype(dtype) for name, value in layer.init_weights(shape, rng).items()}
    x = rng.standard_normal((3, *shape)).astype(dtype)
    out_shape = (3, *layer.output_shape(shape))
    dy = rng.standard_normal(out_shape).astype(dtype)
    compiled = _forward_backward(layer, x, weights, dy, True, monkeypatch)
    python = _forward_backward(layer, x, weights, dy, False, monkeypatch)
    np.testing.assert_array_equal(compiled[0], python[0])
    np.testing.assert_array_equal(compiled[1], python[1])
    assert compiled[2].keys() == python[2].keys()
    for name in python[2]:
        np.testing.assert_array_equal(compiled[2][name], python[2][name], err_msg=name)


@pytest.mark.parametrize("block", [0, 2, 4, 64])
def test_numpy_gemm_multiplies_one_step_of_a_time_major_buffer_like_numpy(block):
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for inner, columns in ((3, 10), (10, 3)):  # blocks of columns, then of the inner axis
            rows = rng.standard_normal((6, 4, inner)).astype(dtype)  # 6 timesteps, 4 rows
            matrix = rng.standard_normal((inner, columns)).astype(dtype)
            out, twin = np.empty((4, columns), dtype), np.empty((4, columns), dtype)
            _step_times_matrix_into(numpy_gemm()[dtype], out, rows, 2, matrix, block)
            step_times_matrix_into(twin, rows[2], matrix, block)
            np.testing.assert_array_equal(out, twin)
            np.testing.assert_allclose(out, rows[2] @ matrix, rtol=1e-5, atol=1e-5)
            if block == 0:
                np.testing.assert_array_equal(out, rows[2] @ matrix)


def test_step_products_are_blocked_only_past_the_small_matrix_bound_with_its_kernels(
        monkeypatch):
    monkeypatch.setattr(_blas, "small_matrix_kernels", lambda: True)
    assert step_product_block(32, 128, 512) == STEP_BLOCK  # the reference LSTM's h @ U
    assert step_product_block(32, 512, 128) == STEP_BLOCK  # and its dgates @ U.T
    assert step_product_block(32, 128, 384) == STEP_BLOCK  # a GRU's
    assert 32 * 64 * 128 < SMALL_MATRIX_BOUND < 32 * 128 * 512
    assert step_product_block(8, 128, 512) == 0  # within the bound already: one call
    assert step_product_block(64, 128, 512) == 0  # more rows: one product is faster
    assert step_product_block(32, 1024, 4096) == 0  # even one block would be past the bound
    monkeypatch.setattr(_blas, "small_matrix_kernels", lambda: False)
    assert step_product_block(32, 128, 512) == 0  # no small-matrix kernels: nothing to gain
