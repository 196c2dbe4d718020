"""Conv1D on channels-last inputs: im2col, one BLAS GEMM, fused bias + ReLU (numba kernels).

im2col gathers every receptive field into one row of a (n * out_length, kernel_size * channels)
matrix, so the convolution is a single GEMM instead of a loop over positions; the kernels in
``conv_kernels`` write that matrix (padding included) and scatter its gradient back in one pass
each. The kernel has the Keras layout (kernel_size, channels, filters), so Keras weights load as-is.
"""
import numpy as np

from models.layers.base import Layer, check_init, check_positive_int, initial_kernel
from models.layers.conv_kernels import (activation_grad_into, bias_activation_into, col2im_into,
                                        im2col_into)

_ACTIVATIONS = (None, "relu")


def _check_padding(padding):
    if padding in ("same", "valid"):
        return padding
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ValueError(f"padding must be 'same', 'valid' or a non-negative int (zeros on each "
                         f"side). Received: padding={padding!r}.")
    return int(padding)


class Conv1D(Layer):
    """1-D convolution of (n, length, channels) inputs into (n, out_length, filters).

    Args:
        filters: number of output channels.
        kernel_size: width of the receptive field.
        stride: step between receptive fields (Keras's ``strides``).
        padding: ``"valid"`` (none), ``"same"`` (Keras/TensorFlow: ``out_length = ceil(length /
            stride)``, the odd zero on the right), or an int of zeros on each side (PyTorch).
        activation: None or ``"relu"``, fused into the bias pass (Keras's ``activation="relu"``).
        init: "he" (default, before a ReLU) or "glorot".
    """

    kind = "conv1d"

    def __init__(self, filters, kernel_size, *, stride=1, padding=0, activation=None, init="he"):
        self.filters = check_positive_int(filters, "filters")
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.stride = check_positive_int(stride, "stride")
        self.padding = _check_padding(padding)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}. Received: "
                             f"activation={activation!r}. Add the activation as its own layer.")
        self.activation = activation
        self.init = check_init(init)

    def _pads(self, length):
        """(zeros on the left, output length) for an input of ``length``."""
        if self.padding == "same":
            out_length = -(-length // self.stride)
            total = max((out_length - 1) * self.stride + self.kernel_size - length, 0)
            return total // 2, out_length
        pad = 0 if self.padding == "valid" else self.padding
        return pad, (length + 2 * pad - self.kernel_size) // self.stride + 1

    def output_shape(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(f"Conv1D expects channels-last inputs of shape (n, length, channels). "
                             f"Received input_shape={tuple(input_shape)!r} (without the batch axis).")
        _, out_length = self._pads(input_shape[0])
        if out_length < 1:
            raise ValueError(f"Conv1D with kernel_size={self.kernel_size} and padding="
                             f"{self.padding!r} does not fit an input of length {input_shape[0]}. "
                             "Use a smaller kernel, more padding, or fewer strided layers before it.")
        return (out_length, self.filters)

    def weight_shapes(self, input_shape):
        return {"kernel": (self.kernel_size, input_shape[1], self.filters), "bias": (self.filters,)}

    def init_weights(self, input_shape, rng):
        shape = self.weight_shapes(input_shape)["kernel"]
        kernel = initial_kernel(shape, self.kernel_size * input_shape[1],
                                self.kernel_size * self.filters, self.init, rng)
        return {"kernel": kernel, "bias": np.zeros(self.filters, dtype=np.float32)}

    def forward(self, x, weights, theta, *, training=False, rng=None):
        x = np.ascontiguousarray(x)
        n, length, channels = x.shape
        pad_left, out_length = self._pads(length)
        columns = np.empty((n * out_length, self.kernel_size * channels), x.dtype)
        im2col_into(columns, x, self.kernel_size, self.stride, pad_left)
        y = columns @ weights["kernel"].reshape(-1, self.filters)
        bias_activation_into(y, weights["bias"], self.activation == "relu")
        cache = (columns, x.shape, y if self.activation else None)
        return y.reshape(n, out_length, self.filters), cache

    writes_into_out = True  # backward(out=...) writes the gradients into given arrays

    def backward(self, weights, cache, dy, *, need_input_grad=True, out=None):
        columns, input_shape, y = cache
        dy_rows = np.ascontiguousarray(dy).reshape(-1, self.filters)
        dz = np.empty_like(dy_rows)
        # Straight into the engine's gradient slot when given one: nothing to allocate or copy.
        into_out = out is not None and out["kernel"].dtype == dy.dtype and \
            out["kernel"].flags.c_contiguous and out["bias"].dtype == dy.dtype
        dbias = out["bias"] if into_out else np.empty(self.filters, dy.dtype)
        activation_grad_into(dz, dbias, dy_rows, dy_rows if y is None else y, y is not None)
        if into_out:
            np.matmul(columns.T, dz, out=out["kernel"].reshape(-1, self.filters))
            grads = out
        else:
            grads = {"kernel": (columns.T @ dz).reshape(weights["kernel"].shape), "bias": dbias}
        if not need_input_grad:
            return None, grads
        dcolumns = dz @ weights["kernel"].reshape(-1, self.filters).T
        dx = np.empty(input_shape, dy.dtype)
        col2im_into(dx, dcolumns, self.kernel_size, self.stride, self._pads(input_shape[1])[0])
        return dx, grads
