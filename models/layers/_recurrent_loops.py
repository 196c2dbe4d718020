"""The recurrent layers' time loops, compiled: one call runs a whole sequence.

A time loop in Python pays, at every timestep, about 4 us of interpreter work on top of the maths:
numpy's matmul dispatch for ``h_{t-1} @ U`` and numba's dispatch of the step kernel. That is 2%
of the reference CNN-BiLSTM's step, and most of the step for small recurrent models (the MNIST-1D
GRU has 6 units). Here the loop, the per-step product and the step kernels of
``_recurrent_kernels`` run in one ``nogil`` call. The product is numpy's own BLAS, called through
``models.layers._blas.numpy_gemm`` on the step's block of the time-major (timesteps, n, width)
buffer in place, so the results are bitwise those of the Python loops in
``models.layers.recurrent``, which remain for BLAS builds that function does not recognise.

numba's on-disk cache of these loops is keyed on this file only: it does not notice a change to
``_recurrent_kernels``, whose code is compiled into them, and would run the old kernels on the
new arrays. After editing that module alone, delete ``models/layers/__pycache__/*.nb?``.

Each loop visits the timesteps in ``order`` (reversed for Bidirectional's backward copy) and writes
exactly what the Python loop writes. ``tests/models/test_recurrent_loops.py`` checks both paths
give identical bits; the layers' oracles (finite differences, TensorFlow, PyTorch) check the maths.
"""
import numpy as np
from numba import njit

from models.layers._blas import NO_TRANSPOSE, ROW_MAJOR
from models.layers._recurrent_kernels import (gru_step_back_into, gru_step_into,
                                              lstm_step_back_into, lstm_step_into)

_LOOP = dict(cache=True, nogil=True, error_model="numpy")


@njit(**_LOOP)
def _step_times_matrix_into(gemm, out, rows, t, matrix, block):
    """out (n, m) = rows[t] (n, k; rows is (T, n, k), C order) @ matrix (k, m), C order.

    With ``block`` > 0 (``models.layers._blas.step_product_block``), in blocks of that width
    along the longer of k and m: column blocks of out, or partial sums over k added into out.
    """
    steps, n, k = rows.shape
    m = matrix.shape[1]
    step = rows.reshape(-1)[t * n * k:]
    flat_matrix, flat_out = matrix.reshape(-1), out.reshape(-1)
    if block <= 0:
        gemm(ROW_MAJOR, NO_TRANSPOSE, NO_TRANSPOSE, n, m, k, 1.0, step.ctypes, k,
             matrix.ctypes, m, 0.0, out.ctypes, m)
    elif m >= k:
        for start in range(0, m, block):
            gemm(ROW_MAJOR, NO_TRANSPOSE, NO_TRANSPOSE, n, min(block, m - start), k, 1.0,
                 step.ctypes, k, flat_matrix[start:].ctypes, m, 0.0, flat_out[start:].ctypes, m)
    else:
        for start in range(0, k, block):
            gemm(ROW_MAJOR, NO_TRANSPOSE, NO_TRANSPOSE, n, m, min(block, k - start), 1.0,
                 step[start:].ctypes, k, flat_matrix[start * m:].ctypes, m,
                 0.0 if start == 0 else 1.0, out.ctypes, m)


def step_times_matrix_into(out, a, matrix, block):
    """The Python loops' twin of ``_step_times_matrix_into``: out = a @ matrix with numpy, in
    the same blocks and order, so both give the same bits: each block is one BLAS gemm, as long
    as no block is 1 wide (numpy would run that one as a gemv or in its own loop), which
    ``step_product_block``'s equal blocks never are."""
    inner, columns = matrix.shape
    if block <= 0:
        np.matmul(a, matrix, out=out)
    elif columns >= inner:
        for start in range(0, columns, block):
            np.matmul(a, matrix[:, start:start + block], out=out[:, start:start + block])
    else:
        np.matmul(a[:, :block], matrix[:block], out=out)
        for start in range(block, inner, block):
            out += a[:, start:start + block] @ matrix[start:start + block]


@njit(**_LOOP)
def _output_step(t, k, steps, return_sequences, backward):
    """Where step t (visited k-th) meets the output: t with sequences, else 0; in the backward
    pass -1 for the steps without an output gradient (all but the last, without sequences)."""
    if return_sequences:
        return t
    if backward and k != steps - 1:
        return -1
    return 0


@njit(**_LOOP)
def lstm_forward(gemm, gate_i, gate_f, gate_c, gate_o, cells, tanh_cells, outputs, states,
                 projections, recurrent_kernel, bias, order, return_sequences, direction, block):
    """Run an LSTM over ``order``; arrays as ``lstm_step_into`` (cells[T] must be zero)."""
    steps, n, units = states.shape
    recurrent = np.zeros((n, 4 * units), states.dtype)
    carry = np.zeros((n, units), states.dtype)
    for b in range(n):
        for j in range(units):
            states[order[0], b, j] = 0
    for k in range(steps):
        t = order[k]
        if k:  # the first step starts from h = 0: no recurrent product
            _step_times_matrix_into(gemm, recurrent, states, t, recurrent_kernel, block)
        t_next = order[k + 1] if k + 1 < steps else -1
        lstm_step_into(gate_i, gate_f, gate_c, gate_o, cells, tanh_cells, carry, outputs, states,
                       projections, recurrent, bias, t, t_next,
                       _output_step(t, k, steps, return_sequences, False), direction)


@njit(**_LOOP)
def lstm_backward(gemm, dgates, dbias, doutputs, gate_i, gate_f, gate_c, gate_o, cells,
                  tanh_cells, recurrent_transposed, order, return_sequences, direction, block):
    """Backward through an LSTM sequence, newest step first: fills dgates (T, n, 4 units) and adds
    to dbias (4, units). ``recurrent_transposed`` is U.T in C order."""
    steps, n, width = dgates.shape
    units = width // 4
    dcells = np.zeros((n, units), dgates.dtype)
    dstates = np.zeros((n, units), dgates.dtype)
    for k in range(steps - 1, -1, -1):
        t = order[k]
        lstm_step_back_into(dgates, dcells, dbias, doutputs, dstates, gate_i, gate_f, gate_c,
                            gate_o, cells, tanh_cells, t, order[k - 1] if k else steps,
                            _output_step(t, k, steps, return_sequences, True), direction)
        if k:
            _step_times_matrix_into(gemm, dstates, dgates, t, recurrent_transposed, block)


@njit(**_LOOP)
def gru_forward(gemm, gate_z, gate_r, gate_c, hidden_part, outputs, states, projections,
                recurrent_kernel, bias, order, return_sequences, direction, block):
    """Run a GRU over ``order``; arrays as ``gru_step_into``."""
    steps, n, units = states.shape
    recurrent = np.zeros((n, 3 * units), states.dtype)
    for b in range(n):
        for j in range(units):
            states[order[0], b, j] = 0
    for k in range(steps):
        t = order[k]
        if k:
            _step_times_matrix_into(gemm, recurrent, states, t, recurrent_kernel, block)
        t_next = order[k + 1] if k + 1 < steps else -1
        gru_step_into(gate_z, gate_r, gate_c, hidden_part, outputs, states, projections,
                      recurrent, bias, t, t_next,
                      _output_step(t, k, steps, return_sequences, False), direction)


@njit(**_LOOP)
def gru_backward(gemm, dinputs, drecurrent, dinput_bias, drecurrent_bias, doutputs, gate_z,
                 gate_r, gate_c, hidden_part, states, recurrent_transposed, order,
                 return_sequences, direction, block):
    """Backward through a GRU sequence: fills dinputs and drecurrent (T, n, 3 units) and adds to
    the bias gradients (3, units each)."""
    steps, n, width = dinputs.shape
    units = width // 3
    dprevious = np.zeros((n, units), dinputs.dtype)
    dstates = np.zeros((n, units), dinputs.dtype)
    for k in range(steps - 1, -1, -1):
        t = order[k]
        gru_step_back_into(dinputs, drecurrent, dinput_bias, drecurrent_bias, dprevious,
                           doutputs, dstates, gate_z, gate_r, gate_c, hidden_part, states, t,
                           _output_step(t, k, steps, return_sequences, True), direction)
        if k:
            _step_times_matrix_into(gemm, dstates, drecurrent, t, recurrent_transposed, block)
