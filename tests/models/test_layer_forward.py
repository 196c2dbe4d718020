"""Layer forward passes against direct definitions, and the dtype contract (float32 stays float32)."""
import numpy as np
import pytest

from models.layers import (BatchNorm, Conv1D, Dense, Dropout, Flatten, ReLU, Reshape, softmax,
                           softmax_cross_entropy)


def random_weights(layer, input_shape, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype)
            for name, shape in layer.weight_shapes(input_shape).items()}


def naive_conv1d(x, kernel, bias, stride, padding):
    """The definition, one output position at a time."""
    n, length, channels = x.shape
    kernel_size, _, filters = kernel.shape
    padded = np.zeros((n, length + 2 * padding, channels))
    padded[:, padding:padding + length] = x
    out_length = (length + 2 * padding - kernel_size) // stride + 1
    out = np.zeros((n, out_length, filters))
    for i in range(out_length):
        window = padded[:, i * stride:i * stride + kernel_size]  # (n, kernel_size, channels)
        out[:, i] = np.einsum("nkc,kcf->nf", window, kernel) + bias
    return out


@pytest.mark.parametrize("kernel_size, stride, padding, length", [
    (5, 2, 1, 40), (3, 2, 1, 19), (3, 1, 0, 8), (4, 3, 2, 11)])
def test_conv1d_forward_matches_the_definition(kernel_size, stride, padding, length):
    layer = Conv1D(3, kernel_size, stride=stride, padding=padding)
    x = np.random.default_rng(1).standard_normal((2, length, 2))
    weights = random_weights(layer, (length, 2))
    y, _ = layer.forward(x, weights, {})
    expected = naive_conv1d(x, weights["kernel"], weights["bias"], stride, padding)
    assert y.shape == (2,) + layer.output_shape((length, 2)) == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_conv1d_rejects_a_kernel_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit an input of length 3"):
        Conv1D(2, 5, padding=0).output_shape((3, 1))
    with pytest.raises(ValueError, match="padding"):
        Conv1D(2, 3, padding=-1)


def test_batchnorm_training_output_has_zero_mean_unit_variance_per_channel():
    layer = BatchNorm()
    x = np.random.default_rng(0).standard_normal((64, 7, 3)) * 5 + 2
    weights = {"gamma": np.ones(3), "beta": np.zeros(3)}
    theta = {name: value.astype(np.float64) for name, value in layer.init_theta((7, 3)).items()}
    y, cache = layer.forward(x, weights, theta, training=True)
    np.testing.assert_allclose(y.mean(axis=(0, 1)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 1)), 1, rtol=1e-5)  # var / (var + eps) is not 1
    new = layer.updated_theta(theta, cache)
    np.testing.assert_allclose(new["running_mean"], 0.1 * x.mean(axis=(0, 1)), rtol=1e-12)
    np.testing.assert_allclose(new["running_var"], 0.9 + 0.1 * x.var(axis=(0, 1)), rtol=1e-12)


def test_batchnorm_inference_uses_the_running_statistics():
    layer = BatchNorm()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4))
    weights = {"gamma": rng.standard_normal(4), "beta": rng.standard_normal(4)}
    theta = {"running_mean": rng.standard_normal(4), "running_var": rng.uniform(0.5, 2, 4)}
    y, _ = layer.forward(x, weights, theta, training=False)
    expected = ((x - theta["running_mean"]) / np.sqrt(theta["running_var"] + 1e-5)
                * weights["gamma"] + weights["beta"])
    np.testing.assert_allclose(y, expected, rtol=1e-12)


def test_dropout_zeroes_about_rate_of_values_and_scales_the_rest():
    x = np.ones((200, 100))
    y, _ = Dropout(0.3).forward(x, {}, {}, training=True, rng=np.random.default_rng(0))
    assert set(np.unique(y)) <= {0.0, 1 / 0.7}
    assert abs(np.mean(y == 0) - 0.3) < 0.01  # 20,000 draws: the standard error is 0.003
    same, _ = Dropout(0.3).forward(x, {}, {}, training=True, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(y, same)
    identity, _ = Dropout(0.3).forward(x, {}, {}, training=False)
    np.testing.assert_array_equal(identity, x)


def test_softmax_cross_entropy_matches_the_definition_and_survives_huge_logits():
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((6, 4)), rng.integers(0, 4, 6)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    loss, _ = softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx(-np.mean(np.log(probabilities[np.arange(6), labels])), rel=1e-12)
    np.testing.assert_allclose(softmax(logits), probabilities, rtol=1e-12)
    # Shifting every logit of a row by the same amount changes nothing, even by 1e4 (exp overflows).
    shifted_loss, shifted_grad = softmax_cross_entropy(logits + 1e4, labels)
    assert shifted_loss == pytest.approx(loss, rel=1e-9)
    assert np.all(np.isfinite(shifted_grad)) and np.all(np.isfinite(softmax(logits + 1e4)))


def test_softmax_cross_entropy_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\).*\[-1, 2\]"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([-1, 2]))
    with pytest.raises(ValueError, match="class indices"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))


def test_dense_rejects_multi_axis_inputs_and_suggests_flatten():
    with pytest.raises(ValueError, match="Flatten"):
        Dense(3).output_shape((4, 2))


LAYERS_AND_SHAPES = [(Dense(5), (4, 3)), (ReLU(), (4, 3)), (Dropout(0.5), (4, 3)),
                     (BatchNorm(), (4, 6, 3)), (Conv1D(2, 3, stride=2, padding=1), (4, 7, 3)),
                     (Flatten(), (4, 2, 3)), (Reshape((3, 2)), (4, 6))]


@pytest.mark.parametrize("layer, shape", LAYERS_AND_SHAPES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_float32_inputs_give_float32_outputs_and_gradients(layer, shape, training):
    f32 = np.float32
    x = np.random.default_rng(0).standard_normal(shape).astype(f32)
    weights = random_weights(layer, shape[1:], dtype=f32)
    theta = layer.init_theta(shape[1:])
    y, cache = layer.forward(x, weights, theta, training=training, rng=np.random.default_rng(0))
    dx, grads = layer.backward(weights, cache, np.ones_like(y))
    assert y.dtype == dx.dtype == f32
    assert all(g.dtype == f32 for g in grads.values())
    if training:
        assert all(v.dtype == f32 for v in layer.updated_theta(theta, cache).values())


@pytest.mark.parametrize("layer, shape", LAYERS_AND_SHAPES, ids=lambda v: type(v).__name__)
def test_init_weights_match_declared_shapes_in_float32(layer, shape):
    weights = layer.init_weights(shape[1:], np.random.default_rng(0))
    declared = layer.weight_shapes(shape[1:])
    assert {k: v.shape for k, v in weights.items()} == declared
    assert all(v.dtype == np.float32 for v in weights.values())
    theta = layer.init_theta(shape[1:])
    assert {k: v.shape for k, v in theta.items()} == layer.theta_shapes(shape[1:])
