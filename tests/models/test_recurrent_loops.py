"""The compiled time loops (models/layers/_recurrent_loops.py) against the Python loops they
replace: bitwise the same outputs and gradients, since both call numpy's own BLAS in the same
order. Skipped where numpy's BLAS is not the recognised build (the Python loops then run)."""
import numpy as np
import pytest

from models.layers import recurrent
from models.layers._blas import numpy_gemm
from models.layers.recurrent import GRU, LSTM, Bidirectional

pytestmark = pytest.mark.skipif(numpy_gemm() is None,
                                reason="numpy's BLAS is not scipy-openblas ILP64: no compiled loops")


def _forward_backward(layer, x, weights, dy, compiled, monkeypatch):
    monkeypatch.setattr(recurrent, "COMPILED_LOOPS", compiled)
    y, cache = layer.forward(x, weights, {}, training=True)
    dx, grads = layer.backward(weights, cache, dy)
    return y.copy(), dx, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("make", [LSTM, GRU, lambda units, **kw: Bidirectional(LSTM(units, **kw)),
                                  lambda units, **kw: Bidirectional(GRU(units, **kw))],
                         ids=["lstm", "gru", "bilstm", "bigru"])
def test_compiled_loops_give_bitwise_the_python_loops_results(make, return_sequences, dtype,
                                                              monkeypatch):
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


def test_numpy_gemm_multiplies_one_step_of_a_time_major_buffer_like_numpy():
    from models.layers._recurrent_loops import _step_times_matrix_into
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        rows = rng.standard_normal((6, 4, 3)).astype(dtype)  # 6 timesteps, 4 rows, 3 columns
        matrix = rng.standard_normal((3, 5)).astype(dtype)
        out = np.empty((4, 5), dtype)
        _step_times_matrix_into(numpy_gemm()[dtype], out, rows, 2, matrix)
        np.testing.assert_array_equal(out, rows[2] @ matrix)
