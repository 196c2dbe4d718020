"""Every layer's backward pass against central finite differences in float64."""
import numpy as np
import pytest

from models.layers import (BatchNorm, Conv1D, Dense, Dropout, Flatten, ReLU, Reshape,
                           softmax_cross_entropy)


def random_input(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


def test_dense_gradients_match_finite_differences(layer_gradient_check):
    layer_gradient_check(Dense(4), random_input((5, 3)))


def test_relu_gradients_match_finite_differences(layer_gradient_check):
    x = random_input((4, 6))
    x += np.sign(x) * 0.1  # keep every value away from the kink at 0, where no derivative exists
    layer_gradient_check(ReLU(), x)


def test_dropout_gradients_match_finite_differences_with_a_fixed_mask(layer_gradient_check):
    layer_gradient_check(Dropout(0.5), random_input((6, 5)), training=True, rng_seed=3)


def test_dropout_is_the_identity_in_inference_so_its_gradient_is_too(layer_gradient_check):
    layer_gradient_check(Dropout(0.5), random_input((6, 5)), training=False)


@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 4)], ids=["features", "channels_last"])
def test_batchnorm_training_gradients_match_finite_differences(layer_gradient_check, shape):
    # In training the batch statistics depend on x, so this checks the full dx formula.
    layer_gradient_check(BatchNorm(), random_input(shape) * 2 + 1, training=True)


def test_batchnorm_inference_gradients_match_finite_differences(layer_gradient_check):
    layer_gradient_check(BatchNorm(), random_input((6, 4)), training=False)


@pytest.mark.parametrize("kernel_size, stride, padding, length", [
    (3, 1, 0, 7),
    (5, 2, 1, 12),   # MNIST-1D ConvBase's first layer, on a shorter input
    (3, 2, 1, 9),    # (9 + 2 - 3) / 2 is whole: the last input position is used
    (3, 2, 1, 10),   # ... and here it is not: its gradient must be exactly zero
    (4, 3, 2, 11),
    (1, 1, 0, 5),
    (5, 1, 2, 3),    # kernel longer than the input, made to fit by padding
])
def test_conv1d_gradients_match_finite_differences(layer_gradient_check, kernel_size, stride,
                                                   padding, length):
    layer = Conv1D(4, kernel_size, stride=stride, padding=padding)
    layer_gradient_check(layer, random_input((3, length, 2)))


def test_flatten_and_reshape_gradients_match_finite_differences(layer_gradient_check):
    layer_gradient_check(Flatten(), random_input((3, 4, 2)))
    layer_gradient_check(Reshape((4, 2)), random_input((3, 8)))


def test_softmax_cross_entropy_gradient_matches_finite_differences(finite_difference):
    logits = random_input((5, 4)) * 3
    labels = np.array([0, 3, 1, 1, 2])
    _, dlogits = softmax_cross_entropy(logits, labels)
    numeric = finite_difference(lambda: softmax_cross_entropy(logits, labels)[0], logits)
    np.testing.assert_allclose(dlogits, numeric, rtol=1e-6, atol=1e-9)


def test_layers_skip_the_input_gradient_when_not_needed():
    x = random_input((3, 6, 2))
    layer = Conv1D(3, 3)
    weights = {name: random_input(shape) for name, shape in layer.weight_shapes((6, 2)).items()}
    y, cache = layer.forward(x, weights, {})
    full_dx, full = layer.backward(weights, cache, np.ones_like(y))
    dx, grads = layer.backward(weights, cache, np.ones_like(y), need_input_grad=False)
    assert dx is None and full_dx is not None
    for name in full:
        np.testing.assert_array_equal(grads[name], full[name])
