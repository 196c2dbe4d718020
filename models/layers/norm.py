"""LayerNorm: normalization over the last axis of each example, position by position."""
import numpy as np

from models.layers.base import Layer


class LayerNorm(Layer):
    """``(x - mean) / sqrt(var + epsilon) * gamma + beta`` over the last axis (Keras's
    ``LayerNormalization(axis=-1)``: biased variance, epsilon 1e-3 by default).

    Args:
        epsilon: added to the variance.
    """

    kind = "layernorm"

    def __init__(self, *, epsilon=1e-3):
        if not epsilon > 0.0:
            raise ValueError(f"epsilon must be positive. Received: epsilon={epsilon!r}.")
        self.epsilon = float(epsilon)

    def weight_shapes(self, input_shape):
        return {"gamma": (input_shape[-1],), "beta": (input_shape[-1],)}

    def init_weights(self, input_shape, rng):
        return {"gamma": np.ones(input_shape[-1], np.float32),
                "beta": np.zeros(input_shape[-1], np.float32)}

    def forward(self, x, weights, theta, *, training=False, rng=None):
        mean = x.mean(axis=-1, keepdims=True)
        centered = x - mean
        var = np.mean(centered * centered, axis=-1, keepdims=True)
        inv_std = 1.0 / np.sqrt(var + x.dtype.type(self.epsilon))
        x_hat = centered * inv_std
        return x_hat * weights["gamma"] + weights["beta"], (x_hat, inv_std)

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        x_hat, inv_std = cache
        axes = tuple(range(dy.ndim - 1))
        grads = {"gamma": np.sum(dy * x_hat, axis=axes), "beta": dy.sum(axis=axes)}
        if not need_input_grad:
            return None, grads
        # mean and variance are per position, so dx = inv_std * (g - mean(g) - x_hat *
        # mean(g * x_hat)) with g = dy * gamma, means over the last axis.
        g = dy * weights["gamma"]
        dx = g - g.mean(axis=-1, keepdims=True)
        dx -= x_hat * np.mean(g * x_hat, axis=-1, keepdims=True)
        dx *= inv_std
        return dx, grads
