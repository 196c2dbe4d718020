"""LSTM, GRU and Bidirectional on (n, timesteps, features) inputs, with Keras's maths and names.

Built the way oneDNN builds its RNN primitive: one GEMM projects the inputs of all timesteps at
once, one BLAS GEMM per timestep does the recurrence (h_{t-1} @ recurrent_kernel; a few, in blocks,
where OpenBLAS's small-matrix kernels run those faster: ``_blas.step_product_block``), and one
numba kernel per timestep does everything element-wise (bias add, gates, cell update, output
writes; ``models.layers._recurrent_kernels``). The backward pass mirrors it: one kernel and one
GEMM per timestep, then one GEMM each for the kernel, recurrent kernel and input gradients over all
timesteps (the bias gradient is summed inside the kernels). With numpy's own BLAS recognised
(``models.layers._blas``), each time loop runs compiled, in one call
(``models.layers._recurrent_loops``), with bitwise the same results; otherwise the Python loops
below run it. Inside a layer everything is time-major, (timesteps, n, ...), so each step reads and
writes contiguous blocks (as oneDNN's ``tnc`` layout): the input is transposed once on the way in
(once for both directions of a Bidirectional) and the input gradient once on the way out; the
outputs are written batch-major, as the next layer reads them. The maths runs in the input's dtype.

``Bidirectional`` runs a time-reversed copy of its layer; both directions write straight into
their half of one output buffer (Keras's ``merge_mode="concat"``).
"""
import copy

import numpy as np

from models.layers import _recurrent_kernels as kernels
from models.layers import _recurrent_loops as loops
from models.layers._blas import numpy_gemm, step_product_block
from models.layers._recurrent_loops import step_times_matrix_into
from models.layers.base import Layer, check_positive_int

__all__ = ["LSTM", "GRU", "Bidirectional"]


def _glorot_uniform(shape, rng):
    limit = np.sqrt(6.0 / (shape[0] + shape[1]))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def _orthogonal(units, columns, rng):
    """(units, columns) with orthonormal rows, as Keras's ``Orthogonal`` initializer."""
    q, r = np.linalg.qr(rng.standard_normal((columns, units)))
    q *= np.sign(np.diag(r))  # a unique, uniformly distributed q
    return np.ascontiguousarray(q.T, dtype=np.float32)


def _step_order(timesteps, reverse):
    """The timesteps in reading order, as the int64 array the compiled loops take."""
    order = np.arange(timesteps, dtype=np.int64)
    return order[::-1].copy() if reverse else order


COMPILED_LOOPS = True  # False: always the Python loops (tests compare the two)


def _compiled_loop(dtype):
    """numpy's gemm for the compiled time loops in ``dtype``, or None: use the Python loop."""
    functions = numpy_gemm() if COMPILED_LOOPS else None
    return None if functions is None else functions.get(np.dtype(dtype).type)



class _Recurrent(Layer):
    """What LSTM and GRU share: configuration, shapes, the time loop's order and output buffer."""

    gates = 4
    _reverse = False  # set on Bidirectional's backward copy: run the sequence from its end

    def __init__(self, units, *, return_sequences=False):
        self.units = check_positive_int(units, "units")
        if not isinstance(return_sequences, bool):
            raise ValueError(f"return_sequences must be True or False. Received: "
                             f"return_sequences={return_sequences!r}.")
        self.return_sequences = return_sequences

    def output_shape(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(f"{type(self).__name__} expects sequences of shape (n, timesteps, "
                             f"features). Received input_shape={tuple(input_shape)!r} (without "
                             "the batch axis). Add Reshape((timesteps, features)) first.")
        return (input_shape[0], self.units) if self.return_sequences else (self.units,)

    def weight_shapes(self, input_shape):
        width = self.gates * self.units
        return {"kernel": (input_shape[-1], width), "recurrent_kernel": (self.units, width),
                "bias": self._bias_shape()}

    def init_weights(self, input_shape, rng):
        width = self.gates * self.units
        return {"kernel": _glorot_uniform((input_shape[-1], width), rng),
                "recurrent_kernel": _orthogonal(self.units, width, rng),
                "bias": self._initial_bias()}

    def forward(self, x, weights, theta, *, training=False, rng=None):
        x_steps = self._time_major_input(x, weights["kernel"].shape[0])
        outputs = self._new_outputs(x_steps, 1)
        cache = self.forward_into(outputs, 0, x_steps, weights)
        return self._merged(outputs), cache

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        dx_steps, grads = self.backward_from(self._split(dy, 1), 0, weights, cache,
                                             need_input_grad=need_input_grad)
        return _batch_major(dx_steps), grads

    def _new_outputs(self, x_steps, directions):
        """The (n, timesteps or 1, directions, units) buffer the kernels write hidden states to,
        for the time-major input ``x_steps``."""
        steps = x_steps.shape[0] if self.return_sequences else 1
        return np.empty((x_steps.shape[1], steps, directions, self.units), dtype=x_steps.dtype)

    def _merged(self, outputs):
        """The output buffer as the layer's output: directions side by side (a view)."""
        n, steps, directions, units = outputs.shape
        merged = outputs.reshape(n, steps, directions * units)
        return merged if self.return_sequences else merged[:, 0]

    def _split(self, dy, directions):
        """An output gradient in the buffer's (n, timesteps or 1, directions, units) shape."""
        dy = np.ascontiguousarray(dy)
        return dy.reshape(dy.shape[0], -1, directions, self.units)

    def _time_major_input(self, x, features):
        """The (n, timesteps, features) input, checked, as a time-major C-contiguous copy."""
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[2] != features:
            raise ValueError(f"{type(self).__name__} expects inputs of shape (n, timesteps, "
                             f"{features}). Received: x.shape={x.shape}.")
        if x.shape[1] == 0:
            raise ValueError(f"{type(self).__name__} needs at least one timestep. Received: "
                             f"x.shape={x.shape}.")
        return np.ascontiguousarray(x.transpose(1, 0, 2))

    def _out_step(self, t):
        """Where step t's hidden state goes in the output buffer (one slot without sequences)."""
        return t if self.return_sequences else 0


class LSTM(_Recurrent):
    """Long short-term memory layer, as ``keras.layers.LSTM`` (tanh, sigmoid gates).

    Gates are ``(i, f, c, o)`` in that order along the last axis of ``kernel`` (features, 4 units),
    ``recurrent_kernel`` (units, 4 units) and ``bias`` (4 units,): Keras's layout, so Keras weights
    load as they are. Initial values as Keras: Glorot uniform kernel, orthogonal recurrent kernel,
    zero bias with the forget gate's part at 1. The initial state is zero.

    Args:
        units: size of the hidden and cell state.
        return_sequences: True: output every timestep's hidden state, (n, timesteps, units);
            False (default): only the last one, (n, units).

    Raises:
        ValueError: for units that is not a positive int or a return_sequences that is not a
            bool; at build time, for inputs without a time axis.
    """

    kind = "lstm"

    def _bias_shape(self):
        return (4 * self.units,)

    def _initial_bias(self):
        bias = np.zeros(4 * self.units, dtype=np.float32)
        bias[self.units:2 * self.units] = 1.0  # Keras's unit_forget_bias
        return bias

    def forward_into(self, outputs, direction, x_steps, weights):
        """Run the time-major sequence ``x_steps`` (timesteps, n, features), C-contiguous, writing
        hidden states to ``outputs[:, :, direction]``.

        ``outputs`` is (n, timesteps or 1, directions, units), C-contiguous; returns the cache.
        """
        steps, n, features = x_steps.shape
        units, dtype = self.units, x_steps.dtype
        kernel, recurrent_kernel, bias = (weights[k]
                                          for k in ("kernel", "recurrent_kernel", "bias"))
        # One GEMM for every timestep's input projection; the bias is added inside the kernel.
        projections = (x_steps.reshape(steps * n, features) @ kernel).reshape(steps, n, 4 * units)
        gates = np.empty((4, steps, n, units), dtype)  # one array per gate: i, f, c, o
        cells = np.empty((steps + 1, n, units), dtype)  # cells[steps]: the zero initial state
        cells[steps] = 0
        tanh_cells = np.empty((steps, n, units), dtype)
        states = np.empty((steps, n, units), dtype)  # states[t]: the h that step t starts from
        cache = dict(x=x_steps, states=states, gates=gates, cells=cells, tanh_cells=tanh_cells)
        # Both loops take U in the input's dtype, C order: the same product, the same bits.
        recurrent_kernel = np.ascontiguousarray(recurrent_kernel, dtype)
        block = step_product_block(n, units, 4 * units, dtype)
        gemm = _compiled_loop(dtype)
        if gemm is not None:
            loops.lstm_forward(gemm, *gates, cells, tanh_cells, outputs, states, projections,
                               recurrent_kernel,
                               bias.astype(dtype, copy=False), _step_order(steps, self._reverse),
                               self.return_sequences, direction, block)
            return cache
        recurrent = np.zeros((n, 4 * units), dtype)
        carry = np.zeros((n, units), dtype)
        order = _step_order(steps, self._reverse).tolist()
        states[order[0]] = 0
        for k, t in enumerate(order):
            if k:  # the first step starts from h = 0: no recurrent product
                step_times_matrix_into(recurrent, states[t], recurrent_kernel, block)
            t_next = order[k + 1] if k + 1 < steps else -1
            kernels.lstm_step_into(*gates, cells, tanh_cells, carry, outputs, states, projections,
                                   recurrent, bias, t, t_next, self._out_step(t), direction)
        return cache

    def backward_from(self, doutputs, direction, weights, cache, *, need_input_grad=True):
        """Gradients for the output gradient ``doutputs[:, :, direction]`` (C-contiguous).

        Returns ``(dx or None, grads)`` as ``Layer.backward``, but dx time-major, as the input.
        """
        x_steps, states, gates = cache["x"], cache["states"], cache["gates"]
        steps, n, features = x_steps.shape
        units, dtype = self.units, x_steps.dtype
        # A contiguous copy of U.T: BLAS runs the per-step dgates @ U.T ~30% faster from it.
        recurrent_transposed = np.ascontiguousarray(weights["recurrent_kernel"].T, dtype)
        dgates = np.empty((steps, n, 4 * units), dtype)
        dbias = np.zeros((4, units), dtype)
        block = step_product_block(n, 4 * units, units, dtype)
        gemm = _compiled_loop(dtype)
        if gemm is not None:
            loops.lstm_backward(gemm, dgates, dbias, doutputs, *gates, cache["cells"],
                                cache["tanh_cells"], recurrent_transposed,
                                _step_order(steps, self._reverse), self.return_sequences,
                                direction, block)
            return _input_and_weight_grads(x_steps, states, dgates, dgates, weights,
                                           dbias.reshape(-1), need_input_grad)
        dcells = np.zeros((n, units), dtype)
        dstates = np.zeros((n, units), dtype)
        order = _step_order(steps, self._reverse).tolist()
        for k in range(steps - 1, -1, -1):
            t = order[k]
            out_t = self._out_step(t) if (self.return_sequences or k == steps - 1) else -1
            kernels.lstm_step_back_into(dgates, dcells, dbias, doutputs, dstates, *gates,
                                        cache["cells"], cache["tanh_cells"], t,
                                        order[k - 1] if k else steps, out_t, direction)
            if k:
                step_times_matrix_into(dstates, dgates[t], recurrent_transposed, block)
        return _input_and_weight_grads(x_steps, states, dgates, dgates, weights,
                                       dbias.reshape(-1), need_input_grad)


class GRU(_Recurrent):
    """Gated recurrent unit, as ``keras.layers.GRU`` with ``reset_after=True`` (its default).

    Gates are ``(z, r, h)`` (update, reset, candidate) along the last axis of ``kernel``
    (features, 3 units) and ``recurrent_kernel`` (units, 3 units); ``bias`` is (2, 3 units): the
    input bias row, then the recurrent bias row. The reset gate multiplies the recurrent part of
    the candidate after the matrix product: ``h~ = tanh(x W_h + b_h + r * (h U_h + b'_h))``,
    ``h = z * h_prev + (1 - z) * h~`` (PyTorch's GRU is the same function with gates r, z, n).

    Args:
        units: size of the hidden state.
        return_sequences: True: (n, timesteps, units) outputs; False (default): (n, units).

    Raises:
        ValueError: as :class:`LSTM`.
    """

    kind = "gru"
    gates = 3

    def _bias_shape(self):
        return (2, 3 * self.units)

    def _initial_bias(self):
        return np.zeros((2, 3 * self.units), dtype=np.float32)

    def forward_into(self, outputs, direction, x_steps, weights):
        """As :meth:`LSTM.forward_into`."""
        steps, n, features = x_steps.shape
        units, dtype = self.units, x_steps.dtype
        kernel, recurrent_kernel, bias = (weights[k]
                                          for k in ("kernel", "recurrent_kernel", "bias"))
        projections = (x_steps.reshape(steps * n, features) @ kernel).reshape(steps, n, 3 * units)
        gates = np.empty((4, steps, n, units), dtype)  # z, r, candidate, recurrent part
        states = np.empty((steps, n, units), dtype)
        cache = dict(x=x_steps, states=states, gates=gates)
        recurrent_kernel = np.ascontiguousarray(recurrent_kernel, dtype)
        block = step_product_block(n, units, 3 * units, dtype)
        gemm = _compiled_loop(dtype)
        if gemm is not None:
            loops.gru_forward(gemm, *gates, outputs, states, projections,
                              recurrent_kernel,
                              bias.astype(dtype, copy=False), _step_order(steps, self._reverse),
                              self.return_sequences, direction, block)
            return cache
        recurrent = np.zeros((n, 3 * units), dtype)
        order = _step_order(steps, self._reverse).tolist()
        states[order[0]] = 0
        for k, t in enumerate(order):
            if k:
                step_times_matrix_into(recurrent, states[t], recurrent_kernel, block)
            t_next = order[k + 1] if k + 1 < steps else -1
            kernels.gru_step_into(*gates, outputs, states, projections, recurrent, bias, t, t_next,
                                  self._out_step(t), direction)
        return cache

    def backward_from(self, doutputs, direction, weights, cache, *, need_input_grad=True):
        """As :meth:`LSTM.backward_from`."""
        x_steps, states, gates = cache["x"], cache["states"], cache["gates"]
        steps, n, features = x_steps.shape
        units, dtype = self.units, x_steps.dtype
        recurrent_transposed = np.ascontiguousarray(weights["recurrent_kernel"].T, dtype)
        dinputs = np.empty((steps, n, 3 * units), dtype)
        drecurrent = np.empty((steps, n, 3 * units), dtype)
        dbias = np.zeros((2, 3 * units), dtype)
        dinput_bias, drecurrent_bias = dbias[0].reshape(3, units), dbias[1].reshape(3, units)
        block = step_product_block(n, 3 * units, units, dtype)
        gemm = _compiled_loop(dtype)
        if gemm is not None:
            loops.gru_backward(gemm, dinputs, drecurrent, dinput_bias, drecurrent_bias, doutputs,
                               *gates, states, recurrent_transposed,
                               _step_order(steps, self._reverse), self.return_sequences,
                               direction, block)
            return _input_and_weight_grads(x_steps, states, dinputs, drecurrent, weights, dbias,
                                           need_input_grad)
        dprevious = np.zeros((n, units), dtype)
        dstates = np.zeros((n, units), dtype)
        order = _step_order(steps, self._reverse).tolist()
        for k in range(steps - 1, -1, -1):
            t = order[k]
            out_t = self._out_step(t) if (self.return_sequences or k == steps - 1) else -1
            kernels.gru_step_back_into(dinputs, drecurrent, dinput_bias, drecurrent_bias,
                                       dprevious, doutputs, dstates, *gates, states, t, out_t,
                                       direction)
            if k:
                step_times_matrix_into(dstates, drecurrent[t], recurrent_transposed, block)
        return _input_and_weight_grads(x_steps, states, dinputs, drecurrent, weights, dbias,
                                       need_input_grad)


def _input_and_weight_grads(x_steps, states, dinputs, drecurrent, weights, dbias,
                            need_input_grad):
    """The GEMMs over all timesteps at once: dkernel, drecurrent_kernel and dx (time-major)."""
    steps, n, features = x_steps.shape
    rows = steps * n
    dinputs, drecurrent = dinputs.reshape(rows, -1), drecurrent.reshape(rows, -1)
    grads = {"kernel": x_steps.reshape(rows, features).T @ dinputs,
             "recurrent_kernel": states.reshape(rows, -1).T @ drecurrent, "bias": dbias}
    if not need_input_grad:
        return None, grads
    return (dinputs @ weights["kernel"].T).reshape(steps, n, features), grads


def _batch_major(x_steps):
    """A time-major (timesteps, n, features) array as the (n, timesteps, features) copy layers
    exchange (None stays None)."""
    return None if x_steps is None else np.ascontiguousarray(x_steps.transpose(1, 0, 2))


class Bidirectional(Layer):
    """Runs ``layer`` forwards and a copy of it backwards in time; outputs are concatenated.

    As ``keras.layers.Bidirectional(layer)`` (merge_mode "concat"): with return_sequences the
    backward direction's output at position t is its state after reading steps T-1 .. t, and
    without, its state after reading the whole reversed sequence. Weights are the layer's own
    local names prefixed ``"forward/"`` and ``"backward/"``.

    Args:
        layer: an ``LSTM`` or ``GRU`` (its configuration is used for both directions).

    Raises:
        TypeError: if ``layer`` is not an LSTM or GRU.
    """

    kind = "bidirectional"

    def __init__(self, layer):
        if not isinstance(layer, _Recurrent):
            raise TypeError(f"Bidirectional wraps an LSTM or GRU layer. Received: {layer!r}.")
        self.layer = copy.copy(layer)
        self.layer._reverse = False
        self._backward_layer = copy.copy(layer)
        self._backward_layer._reverse = True

    def _directions(self):
        return (("forward", self.layer, 0), ("backward", self._backward_layer, 1))

    def output_shape(self, input_shape):
        shape = self.layer.output_shape(input_shape)
        return shape[:-1] + (2 * shape[-1],)

    def weight_shapes(self, input_shape):
        return {f"{prefix}/{name}": shape for prefix, layer, _ in self._directions()
                for name, shape in layer.weight_shapes(input_shape).items()}

    def init_weights(self, input_shape, rng):
        return {f"{prefix}/{name}": value for prefix, layer, _ in self._directions()
                for name, value in layer.init_weights(input_shape, rng).items()}

    @staticmethod
    def _local(weights, prefix):
        start = len(prefix) + 1
        return {name[start:]: value for name, value in weights.items()
                if name.startswith(prefix + "/")}

    def forward(self, x, weights, theta, *, training=False, rng=None):
        x_steps = self.layer._time_major_input(x, weights["forward/kernel"].shape[0])  # for both
        outputs = self.layer._new_outputs(x_steps, 2)
        caches = [layer.forward_into(outputs, direction, x_steps, self._local(weights, prefix))
                  for prefix, layer, direction in self._directions()]
        return self.layer._merged(outputs), caches

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        doutputs = self.layer._split(dy, 2)
        dx, grads = None, {}
        for (prefix, layer, direction), direction_cache in zip(self._directions(), cache):
            d, local = layer.backward_from(doutputs, direction, self._local(weights, prefix),
                                           direction_cache, need_input_grad=need_input_grad)
            grads.update({f"{prefix}/{name}": value for name, value in local.items()})
            if d is not None:
                if dx is None:
                    dx = d
                else:
                    dx += d
        return _batch_major(dx), grads

    def __repr__(self):
        return f"Bidirectional({self.layer!r})"
