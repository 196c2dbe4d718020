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


@pytest.mark.parametrize("block", [None, 3], ids=["one-product", "blocks-of-3"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("make", [LSTM, GRU, lambda units, **kw: Bidirectional(LSTM(units, **kw)),
                                  lambda units, **kw: Bidirectional(GRU(units, **kw))],
                         ids=["lstm", "gru", "bilstm", "bigru"])
def test_compiled_loops_give_bitwise_the_python_loops_results(make, return_sequences, dtype,
                                                              block, monkeypatch):
    if block is not None:  # 5 units: forward (5, 20) and backward (20, 5) products, uneven blocks
        monkeypatch.setattr(recurrent, "step_product_block", lambda *shape_and_dtype: block)
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
    monkeypatch.setattr(_blas, "_blas_threads", lambda: 1)
    f32 = np.float32
    assert step_product_block(32, 128, 512, f32) == STEP_BLOCK  # the reference LSTM's h @ U
    assert step_product_block(32, 512, 128, f32) == STEP_BLOCK  # and its dgates @ U.T
    assert step_product_block(32, 128, 384, np.float64) == STEP_BLOCK  # a GRU's, in float64
    assert step_product_block(8, 128, 512, f32) == 0  # within the bound already: one call
    assert step_product_block(64, 128, 512, f32) == 0  # more rows: one product is faster
    assert step_product_block(32, 1024, 4096, f32) == 0  # even one block would be past the bound
    assert step_product_block(32, 128, 512, np.float16) == 0  # numpy's own loops: no gain
    monkeypatch.setattr(_blas, "_blas_threads", lambda: 2)
    assert step_product_block(32, 128, 512, f32) == 0  # one product would use both threads
    monkeypatch.setattr(_blas, "_blas_threads", lambda: 1)
    monkeypatch.setattr(_blas, "small_matrix_kernels", lambda: False)
    assert step_product_block(32, 128, 512, f32) == 0  # no small-matrix kernels: nothing to gain


@pytest.mark.parametrize("units", [100, 107, 128, 129, 200])
def test_step_product_blocks_are_equal_and_never_leave_a_sliver(units, monkeypatch):
    monkeypatch.setattr(_blas, "small_matrix_kernels", lambda: True)
    monkeypatch.setattr(_blas, "_blas_threads", lambda: 1)
    for gates in (3, 4):
        columns = gates * units  # 321 for a GRU of 107 units: 6 blocks of 54, the last 51
        if 30 * units * columns <= SMALL_MATRIX_BOUND:
            continue
        width = step_product_block(30, units, columns, np.float32)
        assert 0 < width <= STEP_BLOCK
        blocks = -(-columns // width)
        assert blocks == -(-columns // STEP_BLOCK)  # no more calls than blocks of 64 would make
        assert columns - (blocks - 1) * width >= width - blocks  # the last block nearly full


def test_small_matrix_kernels_follow_the_openblas_core_type(tmp_path):
    """OPENBLAS_CORETYPE=Haswell holds OpenBLAS to AVX2 kernels, without small-matrix ones."""
    import os
    import subprocess
    import sys
    code = ("from models.layers._blas import small_matrix_kernels; "
            "print(small_matrix_kernels())")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell", PYTHONPATH=root)
    held = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, cwd=tmp_path)
    assert held.stdout.strip() == "False"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            avx512 = " avx512f " in cpuinfo.read().replace("\n", " ")
    except OSError:
        avx512 = False
    if avx512:  # the AVX-512 kernels, forced: they have small-matrix kernels
        env["OPENBLAS_CORETYPE"] = "SkylakeX"
        forced = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, check=True, cwd=tmp_path)
        assert forced.stdout.strip() == "True"
