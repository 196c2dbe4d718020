"""Pooling over the time axis of (n, length, channels) inputs: MaxPool1D, GlobalAveragePooling1D."""
import numpy as np

from models.layers.base import Layer, check_positive_int
from models.layers.conv_kernels import max_pool_grad_into, max_pool_into


def _check_sequence(input_shape, name):
    if len(input_shape) != 2:
        raise ValueError(f"{name} expects inputs of shape (n, length, channels). Received "
                         f"input_shape={tuple(input_shape)!r} (without the batch axis).")


class MaxPool1D(Layer):
    """Maximum over windows of ``pool_size`` steps, every ``stride`` steps (no padding: Keras's
    ``padding="valid"``); the gradient goes to the first maximum of each window.

    Args:
        pool_size: window length.
        stride: step between windows; None (default) means ``pool_size``, as in Keras.
    """

    kind = "maxpool1d"

    def __init__(self, pool_size=2, *, stride=None):
        self.pool_size = check_positive_int(pool_size, "pool_size")
        self.stride = self.pool_size if stride is None else check_positive_int(stride, "stride")

    def output_shape(self, input_shape):
        _check_sequence(input_shape, "MaxPool1D")
        if input_shape[0] < self.pool_size:
            raise ValueError(f"MaxPool1D(pool_size={self.pool_size}) does not fit an input of "
                             f"length {input_shape[0]}. Use a smaller pool_size.")
        return ((input_shape[0] - self.pool_size) // self.stride + 1, input_shape[1])

    def forward(self, x, weights, theta, *, training=False, rng=None):
        x = np.ascontiguousarray(x)
        out_length, channels = self.output_shape(x.shape[1:])
        y = np.empty((x.shape[0], out_length, channels), x.dtype)
        argmax = np.empty(y.shape, np.int32)
        max_pool_into(y, argmax, x, self.pool_size, self.stride)
        return y, (argmax, x.shape)

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        if not need_input_grad:
            return None, {}
        argmax, input_shape = cache
        dx = np.empty(input_shape, dy.dtype)
        max_pool_grad_into(dx, np.ascontiguousarray(dy), argmax, self.pool_size, self.stride)
        return dx, {}


class GlobalAveragePooling1D(Layer):
    """Mean over the time axis: (n, length, channels) -> (n, channels)."""

    kind = "global_average_pooling1d"

    def output_shape(self, input_shape):
        _check_sequence(input_shape, "GlobalAveragePooling1D")
        return (input_shape[1],)

    def forward(self, x, weights, theta, *, training=False, rng=None):
        return x.mean(axis=1), x.shape

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        if not need_input_grad:
            return None, {}
        n, length, channels = cache
        scaled = dy * dy.dtype.type(1.0 / length)
        return np.broadcast_to(scaled[:, None, :], cache).copy(), {}
