"""Numba kernels for the gate work of one LSTM or GRU timestep, forward and backward.

The recurrent layers (``models.layers.recurrent``) do the matrix products with BLAS: one GEMM
for the input projections of all timesteps, one per timestep for the recurrence, one each for
the weight gradients. Everything element-wise between those GEMMs is one kernel call per
timestep here: the bias add, the gate activations, the cell update, the writes of the output and
of what the backward pass needs, and in the backward pass the gate derivatives and the bias
gradient, so each (batch, gate) value is read and written once per step, while it is in cache.

Layout: time-major. The per-timestep arrays (projections, gates, cells, states, gate gradients)
are (timesteps, n, ...) in C order, so one step's values are one contiguous block: the prefetcher
streams it, where batch-major rows of 512 bytes, each on its own page, made the backward kernel
wait on memory (34 us a step against 9 us at the reference shapes). The kernel gets the timestep
``t`` as an argument and indexes arrays in full: numba then knows every inner row is contiguous
and vectorizes the loop over units (a 2-D slice ``a[t]`` passed in would not). Only the layer's
output (and its gradient) stays batch-major, (n, timesteps or 1, directions, units), as the next
layer reads it.

Activations: in float32, tanh is a rational function (x P(x^2) / Q(x^2), clamped to |x| <= 9,
the same form as Eigen's fast tanh used by TensorFlow's CPU kernels, coefficients fitted here),
within 4e-7 of tanh everywhere; sigmoid(x) = 0.5 tanh(x / 2) + 0.5. It is plain arithmetic, so
LLVM vectorizes it; without a vector math library, ``math.tanh`` is a scalar libm call per value
and would cost more than all the GEMMs. In float64 (finite-difference tests) the exact
``math.tanh`` is used. The kernels are ``nogil`` and never start threads: they run inside the
worker's thread budget. Their oracles are layer-level (tests/models/test_recurrent_layers.py):
finite differences in float64, and TensorFlow's and PyTorch's LSTM/GRU in float32 with the same
weights.
"""
import math

import numpy as np
from numba import njit
from numba.core import types
from numba.extending import overload

_FAST = dict(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})

# tanh(x) ~ x P(x^2) / Q(x^2) on |x| <= 9 (1 - tanh(9) = 3e-8, below float32 resolution at 1).
# Fitted by iteratively reweighted least squares on the relative error (4.5e-9 in float64);
# evaluated in float32 the worst absolute error is 3.3e-7 (tests/models/test_recurrent_kernels.py).
_CLAMP, _ONE = np.float32(9.0), np.float32(1.0)
_P = tuple(np.float32(v) for v in (1.0, 0.13088513910770416, 0.003109019249677658,
                                   1.1208268006157596e-05, -2.045061364697176e-08,
                                   5.3901227231589743e-11, -8.786094546136755e-14))
_Q = tuple(np.float32(v) for v in (1.0, 0.464218407869339, 0.024515250697731972,
                                   0.0002553575614001602))
_P0, _P1, _P2, _P3, _P4, _P5, _P6 = _P
_Q0, _Q1, _Q2, _Q3 = _Q


def _tanh(x):
    """tanh in the precision of ``x`` (the numba implementation is chosen by type below)."""
    return math.tanh(x)


@overload(_tanh, jit_options=dict(fastmath={"reassoc", "contract"}))
def _tanh_overload(x):
    if x == types.float32:
        def fast_tanh(x):
            x = min(max(x, -_CLAMP), _CLAMP)
            s = x * x
            p = _P0 + s * (_P1 + s * (_P2 + s * (_P3 + s * (_P4 + s * (_P5 + s * _P6)))))
            q = _Q0 + s * (_Q1 + s * (_Q2 + s * _Q3))
            # float32 rounding can reach 1 + 1 ulp near the clamp; keep |tanh| <= 1.
            return min(max(x * p / q, -_ONE), _ONE)
        return fast_tanh
    return lambda x: math.tanh(x)


@njit(**_FAST)
def tanh_into(out, x):
    """out[...] = tanh(x) with the kernels' activation (for the accuracy test)."""
    flat_out, flat_x = out.reshape(-1), x.reshape(-1)
    for j in range(flat_x.size):
        flat_out[j] = _tanh(flat_x[j])


_HALF = np.float32(0.5)


def _sigmoid(x):
    """The logistic function in the precision of ``x`` (implementation chosen by type below)."""
    return 1.0 / (1.0 + math.exp(-x))


@overload(_sigmoid, jit_options=dict(fastmath={"reassoc", "contract"}))
def _sigmoid_overload(x):
    if x == types.float32:
        return lambda x: _HALF * _tanh(_HALF * x) + _HALF
    return lambda x: 1.0 / (1.0 + math.exp(-x))


# Vectorization rules, each measured (a step of 32 x 128 units: ~7 us vectorized, ~65 us not):
# * arrays are indexed in full (a[t, b, j]) rather than through row views, so numba knows each
#   row is contiguous; outputs are (n, timesteps or 1, directions, units) and indexed by
#   direction, not by a column offset (``column + j`` costs a negative-index check per value);
# * no loop writes one array at two offsets (``g[units + j]`` and ``g[2 * units + j]``) or
#   reads one slot of an array and writes another: LLVM cannot rule out overlap and gives up.
#   So the gates live in one array per gate, and a gradient row is built in per-gate scratch
#   rows (separate allocations, which LLVM knows do not overlap), then copied into its
#   (timesteps, n, gates * units) place (which the GEMMs need) by one loop per gate that also
#   adds it to the bias gradient.


@njit(**_FAST)
def _store_row_into(target, bias_grad, b, t, part, width, row):
    """target[t, b, part * width:(part + 1) * width] = row, and bias_grad[part] += row."""
    for j in range(width):
        target[t, b, part * width + j] = row[j]
        bias_grad[part, j] += row[j]


# -- LSTM: gates (i, f, c, o) in Keras's kernel order ------------------------------------------
# cells[t, b] is the cell state after step t and tanh_cells[t, b] its tanh; cells[T] is zero,
# the state before the first step. The forward pass carries the cell state in its own array.
@njit(**_FAST)
def lstm_step_into(gate_i, gate_f, gate_c, gate_o, cells, tanh_cells, carry, outputs, states,
                   projections, recurrent, bias, t, t_next, out_t, direction):
    """One LSTM step: gates from ``projections[t] + recurrent + bias``, new cell and hidden.

    ``carry`` (n, units) holds the previous cell state (zeros at the first step) and gets the new
    one. Writes the activated gates and cells/tanh_cells at [t]; the hidden state goes to
    ``outputs[:, out_t, direction]`` and, if ``t_next >= 0``, to ``states[t_next]`` (the state
    the step t_next starts from).
    """
    n, units = carry.shape
    for b in range(n):
        for j in range(units):
            i_gate = _sigmoid(projections[t, b, j] + recurrent[b, j] + bias[j])
            f_gate = _sigmoid(projections[t, b, units + j] + recurrent[b, units + j]
                              + bias[units + j])
            candidate = _tanh(projections[t, b, 2 * units + j] + recurrent[b, 2 * units + j]
                              + bias[2 * units + j])
            o_gate = _sigmoid(projections[t, b, 3 * units + j] + recurrent[b, 3 * units + j]
                              + bias[3 * units + j])
            cell = f_gate * carry[b, j] + i_gate * candidate
            tanh_cell = _tanh(cell)
            carry[b, j] = cell
            gate_i[t, b, j], gate_f[t, b, j], gate_c[t, b, j], gate_o[t, b, j] = (
                i_gate, f_gate, candidate, o_gate)
            cells[t, b, j], tanh_cells[t, b, j] = cell, tanh_cell
            outputs[b, out_t, direction, j] = o_gate * tanh_cell
        if t_next >= 0:
            for j in range(units):
                states[t_next, b, j] = outputs[b, out_t, direction, j]


@njit(**_FAST)
def lstm_step_back_into(dgates, dcells, dbias, doutputs, dstates, gate_i, gate_f,
                        gate_c, gate_o, cells, tanh_cells, t, t_prev, out_t, direction):
    """Backward through one LSTM step (steps are visited newest first).

    dL/dh_t is ``doutputs[:, out_t, direction]`` (skipped if out_t < 0) plus ``dstates``
    (n, units), the part from the next step's recurrence (``dgates[next] @ U.T``). ``dcells``
    (n, units) holds dL/dc_t on entry and dL/dc_{t_prev} on exit (t_prev = T at the first step).
    Writes the gate pre-activation gradients into dgates[t] and adds them to ``dbias``
    (4, units).
    """
    n, units = dcells.shape
    one = gate_i.dtype.type(1.0)  # a typed 1: an int literal would promote to float64
    zero = gate_i.dtype.type(0.0)
    use_output = out_t >= 0
    out_t = max(out_t, 0)
    # Four separate allocations: LLVM knows they do not overlap (rows of one array it would not).
    di_row, df_row = np.empty(units, gate_i.dtype), np.empty(units, gate_i.dtype)
    dc_row, do_row = np.empty(units, gate_i.dtype), np.empty(units, gate_i.dtype)
    for b in range(n):
        for j in range(units):
            i_gate, f_gate = gate_i[t, b, j], gate_f[t, b, j]
            candidate, o_gate = gate_c[t, b, j], gate_o[t, b, j]
            dh = dstates[b, j] + (doutputs[b, out_t, direction, j] if use_output else zero)
            tanh_cell = tanh_cells[t, b, j]
            dcell = dcells[b, j] + dh * o_gate * (one - tanh_cell * tanh_cell)
            di_row[j] = dcell * candidate * i_gate * (one - i_gate)
            df_row[j] = dcell * cells[t_prev, b, j] * f_gate * (one - f_gate)
            dc_row[j] = dcell * i_gate * (one - candidate * candidate)
            do_row[j] = dh * tanh_cell * o_gate * (one - o_gate)
            dcells[b, j] = dcell * f_gate
        _store_row_into(dgates, dbias, b, t, 0, units, di_row)
        _store_row_into(dgates, dbias, b, t, 1, units, df_row)
        _store_row_into(dgates, dbias, b, t, 2, units, dc_row)
        _store_row_into(dgates, dbias, b, t, 3, units, do_row)


# -- GRU (reset_after=True, as Keras and PyTorch): gates (z, r, h) ----------------------------
#   z = sig(xz + bz + hz + b'z), r = sig(xr + br + hr + b'r)
#   c = tanh(xh + bh + r * (hh + b'h)),  h = z * h_prev + (1 - z) * c
# hidden_part[t, b] keeps (hh + b'h), which the reset gate's gradient needs.
@njit(**_FAST)
def gru_step_into(gate_z, gate_r, gate_c, hidden_part, outputs, states, projections, recurrent,
                  bias, t, t_next, out_t, direction):
    """One GRU step; ``bias`` is (2, 3 units): input bias row, recurrent bias row (Keras).

    The previous hidden state is ``states[t]``; the new one goes to
    ``outputs[:, out_t, direction]`` and, if ``t_next >= 0``, to ``states[t_next]``.
    """
    n, units = recurrent.shape[0], recurrent.shape[1] // 3
    one = gate_z.dtype.type(1.0)
    for b in range(n):
        for j in range(units):
            update = _sigmoid(projections[t, b, j] + bias[0, j] + recurrent[b, j] + bias[1, j])
            reset = _sigmoid(projections[t, b, units + j] + bias[0, units + j]
                             + recurrent[b, units + j] + bias[1, units + j])
            part = recurrent[b, 2 * units + j] + bias[1, 2 * units + j]
            candidate = _tanh(projections[t, b, 2 * units + j] + bias[0, 2 * units + j]
                              + reset * part)
            gate_z[t, b, j], gate_r[t, b, j], gate_c[t, b, j] = update, reset, candidate
            hidden_part[t, b, j] = part
            outputs[b, out_t, direction, j] = update * states[t, b, j] + (one - update) * candidate
        if t_next >= 0:
            for j in range(units):
                states[t_next, b, j] = outputs[b, out_t, direction, j]


@njit(**_FAST)
def gru_step_back_into(dinputs, drecurrent, dinput_bias, drecurrent_bias, dprevious, doutputs,
                       dstates, gate_z, gate_r, gate_c, hidden_part, states, t, out_t,
                       direction):
    """Backward through one GRU step (steps are visited newest first).

    dL/dh_t is ``doutputs[:, out_t, direction]`` (skipped if out_t < 0) plus ``dstates``, the
    part that came through the next step's recurrent GEMM, plus ``dprevious``, the part that did
    not (z * dh of the next step; zeros at the first visited step). Writes the gradients of the
    input projection (dinputs[t]) and of the recurrent projection (drecurrent[t]), adds
    them to the bias gradients (3, units each) and sets ``dprevious`` to z * dh.
    """
    n, units = dprevious.shape
    one = gate_z.dtype.type(1.0)
    zero = gate_z.dtype.type(0.0)
    use_output = out_t >= 0
    out_t = max(out_t, 0)
    dz_row, dr_row = np.empty(units, gate_z.dtype), np.empty(units, gate_z.dtype)
    dc_row, dp_row = np.empty(units, gate_z.dtype), np.empty(units, gate_z.dtype)
    for b in range(n):
        for j in range(units):
            update, reset, candidate = gate_z[t, b, j], gate_r[t, b, j], gate_c[t, b, j]
            dh = (dstates[b, j] + dprevious[b, j]
                  + (doutputs[b, out_t, direction, j] if use_output else zero))
            dz_row[j] = dh * (states[t, b, j] - candidate) * update * (one - update)
            dcandidate = dh * (one - update) * (one - candidate * candidate)
            dc_row[j] = dcandidate
            dr_row[j] = dcandidate * hidden_part[t, b, j] * reset * (one - reset)
            dp_row[j] = dcandidate * reset
            dprevious[b, j] = dh * update
        _store_row_into(dinputs, dinput_bias, b, t, 0, units, dz_row)
        _store_row_into(dinputs, dinput_bias, b, t, 1, units, dr_row)
        _store_row_into(dinputs, dinput_bias, b, t, 2, units, dc_row)
        _store_row_into(drecurrent, drecurrent_bias, b, t, 0, units, dz_row)
        _store_row_into(drecurrent, drecurrent_bias, b, t, 1, units, dr_row)
        _store_row_into(drecurrent, drecurrent_bias, b, t, 2, units, dp_row)
