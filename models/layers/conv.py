"""Conv1D on channels-last inputs, as im2col plus one matrix multiply.

im2col gathers every receptive field into one row of a (n * out_length, kernel_size * channels)
matrix, so the convolution is a single BLAS call instead of a Python loop over positions. The
backward pass scatters the column gradients back with one strided add per kernel tap (3 or 5 adds,
each over all positions at once).
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from models.layers.base import Layer, check_init, check_positive_int, initial_kernel


class Conv1D(Layer):
    """1-D convolution of (n, length, channels) inputs into (n, out_length, filters).

    ``out_length = (length + 2 * padding - kernel_size) // stride + 1``; padding adds zeros on both
    sides. The kernel has shape (kernel_size, channels, filters), the Keras layout.

    Args:
        filters: number of output channels.
        kernel_size: width of the receptive field.
        stride: step between receptive fields.
        padding: zeros added on each side of the length axis (an int, as in PyTorch).
        init: "he" (default, before a ReLU) or "glorot".
    """

    kind = "conv1d"

    def __init__(self, filters, kernel_size, *, stride=1, padding=0, init="he"):
        self.filters = check_positive_int(filters, "filters")
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.stride = check_positive_int(stride, "stride")
        if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
            raise ValueError(f"padding must be a non-negative int. Received: padding={padding!r}.")
        self.padding = int(padding)
        self.init = check_init(init)

    def output_shape(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(f"Conv1D expects channels-last inputs of shape (n, length, channels). "
                             f"Received input_shape={tuple(input_shape)!r} (without the batch axis).")
        length = input_shape[0] + 2 * self.padding - self.kernel_size
        if length < 0:
            raise ValueError(f"Conv1D with kernel_size={self.kernel_size} and padding={self.padding} "
                             f"does not fit an input of length {input_shape[0]}. Use a smaller "
                             "kernel, more padding, or fewer strided layers before it.")
        return (length // self.stride + 1, self.filters)

    def weight_shapes(self, input_shape):
        return {"kernel": (self.kernel_size, input_shape[1], self.filters), "bias": (self.filters,)}

    def init_weights(self, input_shape, rng):
        shape = self.weight_shapes(input_shape)["kernel"]
        kernel = initial_kernel(shape, self.kernel_size * input_shape[1],
                                self.kernel_size * self.filters, self.init, rng)
        return {"kernel": kernel, "bias": np.zeros(self.filters, dtype=np.float32)}

    def _columns(self, x):
        """(n, length, channels) -> (n * out_length, kernel_size * channels), tap-major rows."""
        if self.padding:  # (np.pad does the same with ~20 us more Python overhead per call)
            padded = np.zeros((x.shape[0], x.shape[1] + 2 * self.padding, x.shape[2]), x.dtype)
            padded[:, self.padding:self.padding + x.shape[1]] = x
            x = padded
        windows = sliding_window_view(x, self.kernel_size, axis=1)[:, ::self.stride]
        n, out_length, channels, _ = windows.shape
        # Tap-major (kernel_size, channels) order matches the kernel's layout; this reshape of a
        # strided view is the one copy im2col needs.
        return windows.transpose(0, 1, 3, 2).reshape(n * out_length, -1), out_length

    def forward(self, x, weights, theta, *, training=False, rng=None):
        columns, out_length = self._columns(x)
        y = columns @ weights["kernel"].reshape(-1, self.filters)
        y += weights["bias"]
        return y.reshape(x.shape[0], out_length, self.filters), (columns, x.shape)

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        columns, input_shape = cache
        n, length, channels = input_shape
        dy_rows = dy.reshape(-1, self.filters)
        grads = {"kernel": (columns.T @ dy_rows).reshape(weights["kernel"].shape),
                 "bias": dy_rows.sum(axis=0)}
        if not need_input_grad:
            return None, grads
        out_length = dy.shape[1]
        dcolumns = (dy_rows @ weights["kernel"].reshape(-1, self.filters).T).reshape(
            n, out_length, self.kernel_size, channels)
        dx_padded = np.zeros((n, length + 2 * self.padding, channels), dtype=dy.dtype)
        last = self.stride * (out_length - 1) + 1
        for tap in range(self.kernel_size):
            # Position i of the output read padded input tap + i * stride through this tap.
            dx_padded[:, tap:tap + last:self.stride] += dcolumns[:, :, tap]
        return dx_padded[:, self.padding:self.padding + length], grads
