"""BatchNorm's numba kernels (models/layers/batchnorm_kernels.py) against their NumPy twins, in
float32 at the reference model's shape; the layer's finite-difference, TensorFlow and torch
checks cover the maths in the layer tests."""
import numpy as np

from models.layers.batchnorm_kernels import batch_norm_backward_into, batch_norm_forward_into


def _numpy_forward(x, gamma, beta, epsilon):
    x64 = x.astype(np.float64)
    mean, var = x64.mean(0), x64.var(0)
    x_hat = (x64 - mean) / np.sqrt(var + epsilon)
    return x_hat * gamma + beta, x_hat, mean, var


def test_forward_kernel_matches_numpy_at_the_reference_shape():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((32 * 124, 64)) * 3 + 5).astype(np.float32)  # an offset mean
    gamma, beta = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(
        np.float32)
    y, x_hat = np.empty_like(x), np.empty_like(x)
    mean, var, inv_std = (np.empty(64, np.float32) for _ in range(3))
    batch_norm_forward_into(y, x_hat, x, gamma, beta, 1e-3, mean, var, inv_std)
    y_ref, x_hat_ref, mean_ref, var_ref = _numpy_forward(x, gamma, beta, 1e-3)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, var_ref, rtol=1e-5)
    np.testing.assert_allclose(inv_std, 1 / np.sqrt(var_ref + 1e-3), rtol=1e-5)
    np.testing.assert_allclose(x_hat, x_hat_ref, atol=1e-5)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)


def test_backward_kernel_matches_numpy_and_can_skip_the_input_gradient():
    rng = np.random.default_rng(1)
    dy, x_hat = (rng.standard_normal((500, 7)).astype(np.float32) for _ in range(2))
    scale = rng.standard_normal(7).astype(np.float32)
    dx, dgamma, dbeta = np.empty_like(dy), np.empty(7, np.float32), np.empty(7, np.float32)
    batch_norm_backward_into(dx, dgamma, dbeta, dy, x_hat, scale)
    d64, h64 = dy.astype(np.float64), x_hat.astype(np.float64)
    np.testing.assert_allclose(dbeta, d64.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dgamma, (d64 * h64).sum(0), rtol=1e-5, atol=1e-5)
    expected = scale * (d64 - d64.mean(0) - h64 * (d64 * h64).mean(0))
    np.testing.assert_allclose(dx, expected, atol=1e-5)
    dgamma_only, dbeta_only = np.empty(7, np.float32), np.empty(7, np.float32)
    batch_norm_backward_into(None, dgamma_only, dbeta_only, dy, x_hat, scale)
    np.testing.assert_array_equal(dgamma_only, dgamma)
    np.testing.assert_array_equal(dbeta_only, dbeta)
