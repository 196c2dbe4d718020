"""Numba kernels on flat float32 buffers, each with a NumPy reference twin (``*_ref``).

Every kernel takes whole buffers plus a ``[start, stop)`` range and touches only that range:
worker *i* calls it on its own slice, so N workers together cover the buffer once (a
reduce-scatter) and no process repeats another's work. Kernels write into their first argument(s)
and end in ``_into``. Reduction order is fixed (slot 0, then 1, ...), so a run is bitwise
reproducible for a given number of workers.

Why they are written the way they are (each point measured; see docs/performance.md):
* inner loops run over contiguous *slices* indexed from 0: with ``range(start, stop)`` numba keeps
  a negative-index check that stops LLVM from vectorizing;
* ``error_model="numpy"``: Python's ZeroDivisionError check on ``/`` is a branch that also stops
  vectorization (a division by zero gives inf, as in NumPy);
* ``fastmath={"reassoc", "contract"}`` only: lets the sums vectorize and use FMA, keeps NaN/inf
  semantics (no ``nnan``/``ninf``), so the non-finite checks below still work;
* a weighted mean works tile by tile (8 KiB tiles, in L1) so each slot is read once and the
  output written once, whatever the number of slots.
"""
import numpy as np
from numba import njit

_TILE = 2048
_FAST = dict(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})


@njit(**_FAST)
def _sum_squares_1d(values):
    total = 0.0
    for j in range(values.size):
        value = np.float64(values[j])
        total += value * value
    return total


@njit(**_FAST)
def _scale_into(out, source, coefficient):
    for j in range(out.size):
        out[j] = coefficient * source[j]


@njit(**_FAST)
def _add_scaled_into(out, source, coefficient):
    for j in range(out.size):
        out[j] += coefficient * source[j]


@njit(**_FAST)
def weighted_mean_into(out, slots, coefficients, start, stop, want_sum_squares):
    """out[start:stop] = sum_k coefficients[k] * slots[k, start:stop]; returns sum(out**2) or 0."""
    total = 0.0
    for tile in range(start, stop, _TILE):
        end = min(stop, tile + _TILE)
        target = out[tile:end]
        _scale_into(target, slots[0, tile:end], np.float32(coefficients[0]))
        for k in range(1, slots.shape[0]):
            _add_scaled_into(target, slots[k, tile:end], np.float32(coefficients[k]))
        if want_sum_squares:
            total += _sum_squares_1d(target)
    return total


def weighted_mean_ref(slots, coefficients):
    """NumPy twin of :func:`weighted_mean_into` over the whole buffer."""
    return (np.asarray(coefficients, np.float64)[:, None] * slots.astype(np.float64)).sum(0).astype(
        np.float32)


def sum_squares(values, start, stop):
    """sum(values[start:stop]**2) in float64."""
    return _sum_squares_1d(values[start:stop])


def clip_scale(global_norm, clip_norm):
    """Factor that scales gradients to a global norm of at most ``clip_norm`` (1.0 when None)."""
    if clip_norm is None or not np.isfinite(global_norm) or global_norm <= clip_norm:
        return 1.0
    return float(clip_norm / global_norm)


@njit(**_FAST)
def _sgd_plain(params_out, params, grads, lr):
    non_finite = np.float32(0.0)
    for j in range(params_out.size):
        p = params[j] - lr * grads[j]
        params_out[j] = p
        non_finite += p - p  # NaN for NaN and +-inf, 0 otherwise
    return non_finite


@njit(**_FAST)
def _sgd_momentum(params_out, velocity_out, params, velocity, grads, lr, mu, nesterov):
    non_finite = np.float32(0.0)
    for j in range(params_out.size):
        g = grads[j]
        v = mu * velocity[j] - lr * g
        velocity_out[j] = v
        p = params[j] + (mu * v - lr * g if nesterov else v)
        params_out[j] = p
        non_finite += p - p
    return non_finite


@njit(**_FAST)
def sgd_into(params_out, velocity_out, params, velocity, grads, start, stop, learning_rate,
             momentum, nesterov, scale):
    """SGD step on [start, stop): reads params/velocity, writes params_out/velocity_out.

    velocity = momentum * velocity - lr * g;  params += velocity  (Nesterov: momentum*velocity - lr*g)
    with g = scale * grads. The outputs may be the inputs (in place) or other buffers (so a step
    can be re-run). Returns 0.0 when every new parameter is finite, NaN otherwise.
    """
    lr = np.float32(learning_rate * scale)  # lr * (scale * g) == (lr * scale) * g
    if momentum == 0.0:
        return _sgd_plain(params_out[start:stop], params[start:stop], grads[start:stop], lr)
    return _sgd_momentum(params_out[start:stop], velocity_out[start:stop], params[start:stop],
                         velocity[start:stop], grads[start:stop], lr, np.float32(momentum),
                         nesterov)


def sgd_ref(params, velocity, grads, learning_rate, momentum, nesterov, scale):
    """NumPy twin of :func:`sgd_into` (returns new params and velocity)."""
    g = np.float32(scale) * grads
    if momentum == 0.0:
        return params - np.float32(learning_rate) * g, velocity
    v = np.float32(momentum) * velocity - np.float32(learning_rate) * g
    step = np.float32(momentum) * v - np.float32(learning_rate) * g if nesterov else v
    return params + step, v


@njit(**_FAST)
def _adam_constants(learning_rate, beta1, beta2, epsilon, step, weight_decay):
    """The float32 constants of an Adam step: b1, b2, 1 - b1, 1 - b2, the step size, epsilon and
    the decay factor. Bias corrections folded into the step size, lr * sqrt(1-b2^t) / (1-b1^t),
    and eps scaled to match p -= lr * m_hat / (sqrt(v_hat) + eps) exactly."""
    correction2 = np.sqrt(1.0 - beta2 ** step)
    return (np.float32(beta1), np.float32(beta2), np.float32(1.0 - beta1),
            np.float32(1.0 - beta2),
            np.float32(learning_rate * correction2 / (1.0 - beta1 ** step)),
            np.float32(epsilon * correction2), np.float32(1.0 - learning_rate * weight_decay))


@njit(inline="always", **_FAST)
def _adam_element(g, m, v, p, b1, b2, one_minus_b1, one_minus_b2, lr_t, eps_t, decay):
    """One value's Adam step: (new m, new v, new p). Inlined into the kernels' loops."""
    m = b1 * m + one_minus_b1 * g
    v = b2 * v + one_minus_b2 * (g * g)
    return m, v, p * decay - lr_t * m / (np.sqrt(v) + eps_t)


@njit(**_FAST)
def adam_into(params_out, m_out, v_out, params, m, v, grads, start, stop, learning_rate, beta1,
              beta2, epsilon, step, weight_decay, scale):
    """Adam (weight_decay=0) or AdamW (decoupled weight decay) step on [start, stop).

    Reads params/m/v, writes params_out/m_out/v_out (which may be the same arrays, at some cost:
    LLVM's overlap check then takes its scalar loop). ``step`` is the 1-based update count used
    for bias correction. Returns 0.0 when every new parameter is finite, NaN otherwise.
    """
    p_out, m_o, v_o = params_out[start:stop], m_out[start:stop], v_out[start:stop]
    p_in, m_in, v_in, g_in = params[start:stop], m[start:stop], v[start:stop], grads[start:stop]
    b1, b2, one_minus_b1, one_minus_b2, lr_t, eps_t, decay = _adam_constants(
        learning_rate, beta1, beta2, epsilon, step, weight_decay)
    s = np.float32(scale)
    non_finite = np.float32(0.0)
    for j in range(p_out.size):
        m_o[j], v_o[j], p = _adam_element(s * g_in[j], m_in[j], v_in[j], p_in[j], b1, b2,
                                          one_minus_b1, one_minus_b2, lr_t, eps_t, decay)
        p_out[j] = p
        non_finite += p - p
    return non_finite


def adam_ref(params, m, v, grads, learning_rate, beta1, beta2, epsilon, step, weight_decay, scale):
    """NumPy twin of :func:`adam_into`, written as the textbook formula (returns params, m, v)."""
    g = (scale * grads).astype(np.float64)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** step)
    v_hat = v / (1 - beta2 ** step)
    p = params * (1 - learning_rate * weight_decay)
    p = p - learning_rate * m_hat / (np.sqrt(v_hat) + epsilon)
    return p.astype(np.float32), m.astype(np.float32), v.astype(np.float32)


@njit(**_FAST)
def adam_mean_into(params_out, m_out, v_out, params, m, v, first, first_coefficient, last,
                   last_coefficient, start, stop, learning_rate, beta1, beta2, epsilon, step,
                   weight_decay):
    """Adam (or AdamW) on [start, stop) with the gradient ``first_coefficient * first +
    last_coefficient * last`` formed on the fly; returns (sum of its squares in float64, 0.0 or
    NaN as :func:`adam_into`).

    The weighted mean of two slots fused into the update: with two workers the mean is never
    written and read back (on half the MLP's 1.07M values, 0.30-0.41 ms against 0.52-0.56 ms for
    the two passes with warm caches, 0.61-0.76 ms against 0.91-1.02 ms cold). With more than two,
    ``first`` is the weighted mean of all but the last slot, coefficient 1: written once and read
    once, as the full mean was, so no traffic is saved there. Only this kernel's own results are
    reproducible bitwise: LLVM may contract the two products into an FMA either way round, so they
    can differ in the last bit from :func:`weighted_mean_into` followed by :func:`adam_into`. No
    clipping scale: clipping needs the global norm before the update, so it runs the two passes.
    """
    p_out, m_o, v_o = params_out[start:stop], m_out[start:stop], v_out[start:stop]
    p_in, m_in, v_in = params[start:stop], m[start:stop], v[start:stop]
    a, b = first[start:stop], last[start:stop]
    c_a = np.float32(first_coefficient)
    c_b = np.float32(last_coefficient)
    b1, b2, one_minus_b1, one_minus_b2, lr_t, eps_t, decay = _adam_constants(
        learning_rate, beta1, beta2, epsilon, step, weight_decay)
    squares = 0.0
    non_finite = np.float32(0.0)
    for j in range(p_out.size):
        g = c_a * a[j] + c_b * b[j]
        squares += np.float64(g) * np.float64(g)
        m_o[j], v_o[j], p = _adam_element(g, m_in[j], v_in[j], p_in[j], b1, b2, one_minus_b1,
                                          one_minus_b2, lr_t, eps_t, decay)
        p_out[j] = p
        non_finite += p - p
    return squares, non_finite


def adam_mean_ref(params, m, v, first, first_coefficient, last, last_coefficient, learning_rate,
                  beta1, beta2, epsilon, step, weight_decay):
    """NumPy twin of :func:`adam_mean_into` (returns params, m, v, sum of squares)."""
    grads = (first_coefficient * first.astype(np.float64)
             + last_coefficient * last.astype(np.float64))
    p, m, v = adam_ref(params, m, v, grads, learning_rate, beta1, beta2, epsilon, step,
                       weight_decay, 1.0)
    return p, m, v, float(np.sum(grads * grads))


def warm_up():
    """Compile (or load from numba's cache) every kernel for the argument types workers use.

    Called in the owner before it forks workers, so each worker, and each replacement of a dead
    one, inherits ready machine code instead of spending ~0.5 s loading it on its first step.
    """
    one = np.zeros(16, np.float32)
    two = np.zeros((2, 16), np.float32)
    weighted_mean_into(one, two, np.full(2, 0.5), 0, 16, True)
    sum_squares(one, 0, 16)
    sgd_into(one, one, one, one, one, 0, 16, 0.1, 0.0, False, 1.0)
    adam_into(one, one, one, one, one, one, one, 0, 16, 0.1, 0.9, 0.999, 1e-7, 1.0, 0.0, 1.0)
    adam_mean_into(one, one, one, one, one, one, one, 0.5, one, 0.5, 0, 16, 0.1, 0.9, 0.999, 1e-7,
                   1.0, 0.0)
