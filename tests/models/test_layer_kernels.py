"""The convolution, pooling and loss numba kernels against their NumPy twins, and the float32
contract of the sequence layers (float32 in, float32 out, gradients included)."""
import numpy as np
import pytest

from models.layers import (Add, AttentionPooling, BinaryLogits, Concatenate, Conv1D, Dense,
                           GlobalAveragePooling1D, LayerNorm, MaxPool1D, MultiHeadSelfAttention)
from models.layers.conv_kernels import (activation_grad_into, activation_grad_ref,
                                        bias_activation_into, bias_activation_ref, col2im_into,
                                        col2im_ref, im2col_into, im2col_ref, max_pool_into,
                                        max_pool_ref)
from models.layers.loss_kernels import softmax_cross_entropy_into, softmax_cross_entropy_ref


@pytest.mark.parametrize("kernel_size, stride, pad_left, length, out_length", [
    (3, 1, 1, 7, 7), (5, 2, 1, 40, 19), (4, 3, 2, 11, 4), (3, 2, 0, 9, 4), (5, 1, 2, 3, 3),
    (2, 1, 3, 2, 6)])  # the last: receptive fields wholly before and wholly after the input
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_im2col_and_col2im_match_their_numpy_twins(kernel_size, stride, pad_left, length,
                                                   out_length, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, length, 2)).astype(dtype)
    columns = np.full((3 * out_length, kernel_size * 2), np.nan, dtype)
    im2col_into(columns, x, kernel_size, stride, pad_left)
    np.testing.assert_array_equal(columns, im2col_ref(x, kernel_size, stride, pad_left, out_length))
    dcolumns = rng.standard_normal(columns.shape).astype(dtype)
    dx = np.full(x.shape, np.nan, dtype)
    col2im_into(dx, dcolumns, kernel_size, stride, pad_left)
    np.testing.assert_allclose(dx, col2im_ref(dcolumns, x.shape, kernel_size, stride, pad_left),
                               rtol=1e-6)


@pytest.mark.parametrize("rows, filters", [(30, 5), (97, 25)])  # 25: vector width + a tail
@pytest.mark.parametrize("relu", [False, True])
def test_bias_activation_kernels_match_their_numpy_twins(relu, rows, filters):
    rng = np.random.default_rng(1)
    y = rng.standard_normal((rows, filters)).astype(np.float32)
    bias = rng.standard_normal(filters).astype(np.float32)
    expected = bias_activation_ref(y, bias, relu)
    bias_activation_into(y, bias, relu)
    np.testing.assert_array_equal(y, expected)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dz, dbias = np.full_like(dy, np.nan), np.full(filters, np.nan, np.float32)
    activation_grad_into(dz, dbias, dy, y, relu)
    ref_dz, ref_dbias = activation_grad_ref(dy, y, relu)
    np.testing.assert_array_equal(dz, ref_dz)
    np.testing.assert_allclose(dbias, ref_dbias, rtol=1e-5, atol=1e-6)


def test_max_pool_kernel_matches_its_numpy_twin_and_points_at_the_maxima():
    x = np.random.default_rng(2).standard_normal((2, 11, 3)).astype(np.float32)
    y, argmax = np.empty((2, 5, 3), np.float32), np.empty((2, 5, 3), np.int32)
    max_pool_into(y, argmax, x, 3, 2)
    np.testing.assert_array_equal(y, max_pool_ref(x, 3, 2))
    np.testing.assert_array_equal(np.take_along_axis(x, argmax.astype(np.intp), axis=1), y)


SEQUENCE_LAYERS = [(Conv1D(4, 3, padding="same", activation="relu"), (2, 7, 3)),
                   (Dense(4, activation="relu"), (2, 3)), (MaxPool1D(2), (2, 7, 3)),
                   (GlobalAveragePooling1D(), (2, 7, 3)), (LayerNorm(), (2, 7, 3)),
                   (AttentionPooling(5), (2, 7, 3)),
                   (MultiHeadSelfAttention(2, 3, dropout=0.3), (2, 7, 4)),
                   (BinaryLogits(), (2, 1))]


@pytest.mark.parametrize("layer, shape", SEQUENCE_LAYERS, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_sequence_layers_keep_float32(layer, shape, training):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    weights = layer.init_weights(shape[1:], rng)
    assert {k: v.shape for k, v in weights.items()} == layer.weight_shapes(shape[1:])
    assert all(v.dtype == np.float32 for v in weights.values())
    y, cache = layer.forward(x, weights, {}, training=training, rng=rng)
    assert y.shape[1:] == layer.output_shape(shape[1:])
    dx, grads = layer.backward(weights, cache, np.ones_like(y))
    assert y.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())


@pytest.mark.parametrize("layer", [Add(), Concatenate()], ids=["add", "concatenate"])
def test_merge_layers_keep_float32(layer):
    xs = [np.ones((2, 3, 4), np.float32), np.ones((2, 3, 4), np.float32)]
    y, cache = layer.forward(xs, {}, {})
    dxs, _ = layer.backward({}, cache, np.ones_like(y))
    assert y.dtype == np.float32 and all(dx.dtype == np.float32 for dx in dxs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, classes, offset", [(50, 10, 0.0), (7, 26, 1e4), (1, 2, -3.0)])
def test_softmax_cross_entropy_kernel_matches_its_numpy_twin(dtype, rows, classes, offset):
    rng = np.random.default_rng(rows)
    logits = (rng.standard_normal((rows, classes)) * 4 + offset).astype(dtype)
    labels = rng.integers(0, classes, rows)
    dlogits = np.full_like(logits, np.nan)
    loss, bad_row = softmax_cross_entropy_into(dlogits, logits, labels)
    expected_loss, expected = softmax_cross_entropy_ref(logits, labels)
    assert bad_row == -1
    tolerance = 1e-6 if dtype == np.float32 else 1e-12
    assert loss == pytest.approx(expected_loss, rel=tolerance, abs=tolerance)
    np.testing.assert_allclose(dlogits, expected, rtol=tolerance * 10, atol=tolerance)


def test_softmax_cross_entropy_kernel_reports_the_first_bad_label_and_empty_batches_are_nan():
    dlogits = np.empty((3, 4), np.float32)
    loss, bad_row = softmax_cross_entropy_into(dlogits, np.zeros((3, 4), np.float32),
                                               np.array([1, 4, -1]))
    assert bad_row == 1 and np.isnan(loss)
    empty = np.empty((0, 4), np.float32)
    loss, bad_row = softmax_cross_entropy_into(empty.copy(), empty, np.empty(0, np.int64))
    assert bad_row == -1 and np.isnan(loss)
