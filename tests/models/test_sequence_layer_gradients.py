"""Backward passes of the sequence layers (convolution modes, pooling, normalization, attention,
merges) against central finite differences in float64 (tolerances in tests/models/conftest.py)."""
import numpy as np
import pytest

from models.layers import (Add, AttentionPooling, BatchNorm, BinaryLogits, Concatenate, Conv1D,
                           Dense, GlobalAveragePooling1D, LayerNorm, MaxPool1D,
                           MultiHeadSelfAttention)
from tests.models.conftest import ATOL, RTOL, central_difference


def random_input(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("padding, stride, kernel_size, length", [
    ("same", 1, 3, 7), ("same", 2, 3, 8), ("same", 2, 4, 9), ("same", 3, 5, 4),
    ("valid", 1, 5, 9), ("valid", 2, 3, 10)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_conv1d_padding_modes_and_fused_relu_gradients_match_finite_differences(
        layer_gradient_check, padding, stride, kernel_size, length, activation):
    layer = Conv1D(4, kernel_size, stride=stride, padding=padding, activation=activation)
    layer_gradient_check(layer, random_input((3, length, 2)))


def test_dense_with_fused_relu_gradients_match_finite_differences(layer_gradient_check):
    layer_gradient_check(Dense(6, activation="relu"), random_input((5, 4)))


@pytest.mark.parametrize("pool_size, stride, length", [(2, None, 8), (2, None, 9), (3, 1, 7),
                                                      (3, 2, 10), (2, 3, 5), (2, 3, 9)])
def test_max_pool_gradients_match_finite_differences(layer_gradient_check, pool_size, stride,
                                                     length):
    layer_gradient_check(MaxPool1D(pool_size, stride=stride), random_input((3, length, 4)))


def test_global_average_pooling_gradients_match_finite_differences(layer_gradient_check):
    layer_gradient_check(GlobalAveragePooling1D(), random_input((3, 6, 4)))


@pytest.mark.parametrize("shape", [(5, 6), (3, 4, 6)], ids=["features", "sequence"])
def test_layer_norm_gradients_match_finite_differences(layer_gradient_check, shape):
    layer_gradient_check(LayerNorm(), random_input(shape) * 2 + 1)


def test_batchnorm_over_sequences_with_keras_settings_gradients_match(layer_gradient_check):
    layer = BatchNorm(momentum=0.99, epsilon=1e-3)
    layer_gradient_check(layer, random_input((3, 5, 4)) * 2 + 1, training=True)
    layer_gradient_check(layer, random_input((3, 5, 4)), training=False)


def test_attention_pooling_gradients_match_finite_differences(layer_gradient_check):
    layer_gradient_check(AttentionPooling(5), random_input((3, 7, 4)))


@pytest.mark.parametrize("dropout, training", [(0.0, True), (0.4, True), (0.4, False)])
def test_multi_head_self_attention_gradients_match_finite_differences(layer_gradient_check,
                                                                     dropout, training):
    layer = MultiHeadSelfAttention(3, 2, dropout=dropout)
    layer_gradient_check(layer, random_input((2, 5, 4)), training=training, rng_seed=4)


def test_binary_logits_gradients_match_finite_differences(layer_gradient_check):
    layer_gradient_check(BinaryLogits(), random_input((4, 1)))


@pytest.mark.parametrize("layer, shapes", [(Add(), [(3, 4, 5)] * 3),
                                           (Concatenate(), [(3, 4, 2), (3, 4, 5)]),
                                           (Concatenate(), [(3, 2), (3, 6), (3, 1)])],
                         ids=["add", "concatenate_sequences", "concatenate_vectors"])
def test_merge_layer_gradients_match_finite_differences(layer, shapes):
    xs = [random_input(shape, seed=i) for i, shape in enumerate(shapes)]
    y, cache = layer.forward(xs, {}, {})
    assert y.shape[1:] == layer.output_shape([s[1:] for s in shapes])
    dy = random_input(y.shape, seed=9)
    dxs, grads = layer.backward({}, cache, dy)
    assert grads == {} and len(dxs) == len(xs)
    for x, dx in zip(xs, dxs):
        numeric = central_difference(lambda: float(np.sum(layer.forward(xs, {}, {})[0] * dy)), x)
        np.testing.assert_allclose(dx, numeric, rtol=RTOL, atol=ATOL)


def test_merge_layers_reject_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match=r"one shape.*\(4, 5\).*\(4, 6\)"):
        Add().output_shape([(4, 5), (4, 6)])
    with pytest.raises(ValueError, match="last axis"):
        Concatenate().output_shape([(4, 5), (3, 5)])
    with pytest.raises(ValueError, match="at least two"):
        Add().output_shape([(4, 5)])


def test_sequence_layers_reject_inputs_without_a_time_axis():
    for layer in (MaxPool1D(2), GlobalAveragePooling1D(), AttentionPooling(4),
                  MultiHeadSelfAttention(2, 4)):
        with pytest.raises(ValueError, match=r"\(n, (length|time), (channels|features)\)"):
            layer.output_shape((8,))
    with pytest.raises(ValueError, match="does not fit an input of length 3"):
        MaxPool1D(4).output_shape((3, 2))
    with pytest.raises(ValueError, match="padding must be 'same', 'valid'"):
        Conv1D(2, 3, padding="causal")
    with pytest.raises(ValueError, match="activation"):
        Conv1D(2, 3, activation="tanh")
