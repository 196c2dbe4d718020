"""Finite-difference oracles shared by the model tests."""
import numpy as np
import pytest

# Central differences in float64: truncation error ~ h**2 and rounding error ~ 1e-16 / h, so with
# h = 1e-6 the estimate is good to ~1e-9 on these O(1) functions; analytic gradients must match it
# to rtol=1e-6, atol=1e-8.
STEP = 1e-6
RTOL, ATOL = 1e-6, 1e-8


def central_difference(f, array, step=STEP):
    """d f() / d array, perturbing ``array`` in place one entry at a time (restored afterwards)."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + step
        above = f()
        array[index] = original - step
        below = f()
        array[index] = original
        grad[index] = (above - below) / (2 * step)
    return grad


def check_layer_gradients(layer, x, *, training=True, rng_seed=0, seed=0):
    """Compare a layer's backward (input and weight gradients) with central differences.

    The scalar is ``sum(forward(x) * dy)`` for a fixed random ``dy``, so its gradient is exactly
    what ``backward(dy)`` returns. Weights are random float64 (not the initial ones, which can hide
    mistakes, e.g. BatchNorm's gamma = 1). Every forward draws from a fresh
    ``default_rng(rng_seed)``, so Dropout uses the same mask each time.
    """
    generator = np.random.default_rng(seed)
    input_shape = x.shape[1:]
    weights = {name: generator.standard_normal(shape)
               for name, shape in layer.weight_shapes(input_shape).items()}
    theta = {name: value.astype(np.float64) for name, value in layer.init_theta(input_shape).items()}

    def forward():
        return layer.forward(x, weights, theta, training=training,
                             rng=np.random.default_rng(rng_seed))

    y, cache = forward()
    dy = generator.standard_normal(y.shape)
    dx, grads = layer.backward(weights, cache, dy.copy())
    assert dx.shape == x.shape and dx.dtype == np.float64
    assert set(grads) == set(weights)

    def objective():
        return float(np.sum(forward()[0] * dy))

    np.testing.assert_allclose(dx, central_difference(objective, x), rtol=RTOL, atol=ATOL,
                               err_msg=f"{layer!r}: input gradient")
    for name, array in weights.items():
        assert grads[name].shape == array.shape
        np.testing.assert_allclose(grads[name], central_difference(objective, array), rtol=RTOL,
                                   atol=ATOL, err_msg=f"{layer!r}: gradient of {name}")


@pytest.fixture
def layer_gradient_check():
    return check_layer_gradients


@pytest.fixture
def finite_difference():
    return central_difference
