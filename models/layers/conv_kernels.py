"""Numba kernels of the 1-D convolution and pooling layers, each with a NumPy reference twin.

A convolution is im2col (gather every receptive field into one row), one BLAS GEMM, and a fused
bias + activation pass; its backward is the activation mask and bias sum in one pass, two GEMMs and
col2im (scatter the column gradients back). Numpy does the gather with ``sliding_window_view`` plus
a padded copy: at the MNIST-1D sizes (batch 50, length 40, 25 channels) those Python-level calls
cost more than the GEMMs, so the kernels below write straight into their outputs, padding
included. They are serial (the worker's thread budget goes to BLAS) and dtype-generic: numba
compiles one version for float32 (training) and one for float64 (finite-difference tests).

A receptive field, ``kernel_size`` consecutive positions of all channels, is one contiguous span
of the flattened (length x channels) input row, so im2col and col2im move each column row as one
span. Their innermost loops index slices by a ``range`` counter alone: an index computed as
``offset + j`` gets numba's negative-index check on every value, which keeps LLVM from
vectorizing (col2im at the MNIST-1D sizes, 50 x 19 x 25, took 40 us that way and 5 us now).
"""
import numpy as np
from numba import njit

_FAST = dict(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})


@njit(**_FAST)
def im2col_into(columns, x, kernel_size, stride, pad_left):
    """columns[b * out + i, tap * c:(tap + 1) * c] = x[b, i * stride - pad_left + tap] (0 outside)."""
    n, length, channels = x.shape
    out_length = columns.shape[0] // n
    flat_x = x.reshape(n, length * channels)
    for b in range(n):
        source_row = flat_x[b]
        for i in range(out_length):
            row = columns[b * out_length + i]
            start = i * stride - pad_left
            lo = min(max(0, -start), kernel_size) * channels  # taps before the input: zeros
            hi = max(min(kernel_size, length - start), 0) * channels  # from hi on: past its end
            hi = max(hi, lo)
            for j in range(lo):
                row[j] = 0.0
            source = source_row[start * channels + lo:start * channels + hi]
            inside = row[lo:hi]
            for j in range(hi - lo):
                inside[j] = source[j]
            after = row[hi:]
            for j in range(after.size):
                after[j] = 0.0


def im2col_ref(x, kernel_size, stride, pad_left, out_length):
    n, length, channels = x.shape
    pad_right = max(0, (out_length - 1) * stride + kernel_size - length - pad_left)
    padded = np.pad(x, ((0, 0), (pad_left, pad_right), (0, 0)))
    rows = [padded[:, i * stride:i * stride + kernel_size].reshape(n, -1) for i in range(out_length)]
    return np.stack(rows, axis=1).reshape(n * out_length, kernel_size * channels)


@njit(**_FAST)
def col2im_into(dx, dcolumns, kernel_size, stride, pad_left):
    """dx = the adjoint of im2col: each column entry is added back to the input position it read
    (for every input value, in the order of the output positions i)."""
    n, length, channels = dx.shape
    out_length = dcolumns.shape[0] // n
    flat_dx = dx.reshape(n, length * channels)
    for b in range(n):
        target_row = flat_dx[b]
        for j in range(target_row.size):
            target_row[j] = 0.0
        for i in range(out_length):
            start = i * stride - pad_left
            lo = min(max(0, -start), kernel_size) * channels
            hi = min(kernel_size, length - start) * channels
            if hi <= lo:
                continue
            source = dcolumns[b * out_length + i, lo:hi]
            target = target_row[start * channels + lo:start * channels + hi]
            for j in range(hi - lo):
                target[j] += source[j]


def col2im_ref(dcolumns, input_shape, kernel_size, stride, pad_left):
    n, length, channels = input_shape
    out_length = dcolumns.shape[0] // n
    blocks = dcolumns.reshape(n, out_length, kernel_size, channels)
    dx = np.zeros((n, length + out_length * stride + kernel_size, channels), dcolumns.dtype)
    for i in range(out_length):
        for tap in range(kernel_size):
            dx[:, i * stride + tap] += blocks[:, i, tap]
    return dx[:, pad_left:pad_left + length]


@njit(**_FAST)
def bias_activation_into(y, bias, relu):
    """y[r] = y[r] + bias, then max(., 0) when ``relu``: rows of a (rows, filters) matrix."""
    for r in range(y.shape[0]):
        row = y[r]
        for f in range(row.size):
            value = row[f] + bias[f]
            row[f] = max(value, 0.0) if relu else value


def bias_activation_ref(y, bias, relu):
    out = y + bias
    return np.maximum(out, 0) if relu else out


@njit(**_FAST)
def activation_grad_into(dz, dbias, dy, y, relu):
    """dz = dy * (y > 0) (or dy), dbias = sum of dz over rows; ``y`` is the layer's output.

    The sum runs in a fresh local row, copied to ``dbias`` at the end: LLVM cannot rule out that
    ``dbias`` overlaps ``dz`` and kept the loop scalar (11 us -> 7 us at the MNIST-1D's first
    convolution, 950 x 25; 59 -> 41 us at 3968 x 64). Rows are summed in order, as before.
    """
    rows, filters = dy.shape
    zero = dz.dtype.type(0.0)
    total = np.zeros(filters, dbias.dtype)
    for r in range(rows):
        target, source, output = dz[r], dy[r], y[r]
        for f in range(filters):
            value = source[f] if (not relu or output[f] > zero) else zero
            target[f] = value
            total[f] += value
    for f in range(filters):
        dbias[f] = total[f]


def activation_grad_ref(dy, y, relu):
    dz = dy * (y > 0) if relu else dy.copy()
    return dz, dz.sum(axis=0)


@njit(**_FAST)
def max_pool_into(y, argmax, x, pool_size, stride):
    """y[b, i, c] = max over x[b, i * stride:i * stride + pool_size, c]; argmax keeps the position
    (the first one on ties, as TensorFlow's gradient does)."""
    n, out_length, channels = y.shape
    for b in range(n):
        for i in range(out_length):
            start = i * stride
            best, where = y[b, i], argmax[b, i]
            first = x[b, start]
            for c in range(channels):  # the channel loops run over contiguous memory
                best[c] = first[c]
                where[c] = start
            for k in range(1, pool_size):
                row = x[b, start + k]
                for c in range(channels):
                    if row[c] > best[c]:
                        best[c] = row[c]
                        where[c] = start + k
    return


@njit(**_FAST)
def max_pool_grad_into(dx, dy, argmax, pool_size, stride):
    """dx = 0, then dy[b, i, c] added at the input position its maximum came from."""
    n, out_length, channels = dy.shape
    length = dx.shape[1]
    if stride < pool_size:  # overlapping windows: a position may collect from several
        dx[:] = 0.0
        for b in range(n):
            for i in range(out_length):
                for c in range(channels):
                    dx[b, argmax[b, i, c], c] += dy[b, i, c]
        return
    # Disjoint windows: every position is written once, in order, with no zeroing pass first.
    for b in range(n):
        dx[b, out_length * stride:] = 0.0
        for i in range(out_length):
            start = i * stride
            source, where = dy[b, i], argmax[b, i]
            for k in range(min(stride, length - start)):
                target = dx[b, start + k]
                for c in range(channels):
                    target[c] = source[c] if where[c] == start + k else 0.0


def max_pool_ref(x, pool_size, stride):
    out_length = (x.shape[1] - pool_size) // stride + 1
    windows = np.stack([x[:, i * stride:i * stride + pool_size] for i in range(out_length)], axis=1)
    return windows.max(axis=2)
