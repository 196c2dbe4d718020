"""Numba kernels on flat float32 buffers, each with a NumPy reference twin (``*_ref``).

Every kernel takes whole C-contiguous buffers plus a ``[start, stop)`` range and touches only that
range: worker *i* calls it on its own slice, so N workers together cover the buffer once
(a reduce-scatter) and no process repeats another's work. Passing whole buffers with integer bounds,
rather than sliced views, keeps the arrays' layout known to numba so the inner loops vectorize.

Kernels write into their first argument(s) and end in ``_into``. Reduction order is fixed (slot 0,
then 1, ...), so a run is bitwise reproducible for a given number of workers.
"""
import numpy as np
from numba import njit

# Columns reduced per tile: the float64 accumulator (32 KiB) stays in L1/L2 while N slots stream
# through it, so each slot is read once and the output written once.
_TILE = 4096


@njit(cache=True, nogil=True)
def weighted_mean_into(out, slots, coefficients, start, stop, want_sum_squares):
    """out[start:stop] = sum_k coefficients[k] * slots[k, start:stop]; returns sum(out**2) or 0."""
    accumulator = np.empty(_TILE, np.float64)
    total = 0.0
    for tile_start in range(start, stop, _TILE):
        width = min(_TILE, stop - tile_start)
        c = coefficients[0]
        for j in range(width):
            accumulator[j] = c * slots[0, tile_start + j]
        for k in range(1, slots.shape[0]):
            c = coefficients[k]
            for j in range(width):
                accumulator[j] += c * slots[k, tile_start + j]
        for j in range(width):
            out[tile_start + j] = accumulator[j]
        if want_sum_squares:
            # Four independent partial sums break the add-latency chain of a single accumulator.
            s0 = s1 = s2 = s3 = 0.0
            j = 0
            while j + 4 <= width:
                s0 += accumulator[j] * accumulator[j]
                s1 += accumulator[j + 1] * accumulator[j + 1]
                s2 += accumulator[j + 2] * accumulator[j + 2]
                s3 += accumulator[j + 3] * accumulator[j + 3]
                j += 4
            while j < width:
                s0 += accumulator[j] * accumulator[j]
                j += 1
            total += (s0 + s1) + (s2 + s3)
    return total


def weighted_mean_ref(slots, coefficients):
    """NumPy twin of :func:`weighted_mean_into` over the whole buffer."""
    return (np.asarray(coefficients, np.float64)[:, None] * slots.astype(np.float64)).sum(0).astype(
        np.float32)


@njit(cache=True, nogil=True)
def sum_squares(values, start, stop):
    """sum(values[start:stop]**2) in float64."""
    s0 = s1 = s2 = s3 = 0.0
    j = start
    while j + 4 <= stop:
        s0 += np.float64(values[j]) * values[j]
        s1 += np.float64(values[j + 1]) * values[j + 1]
        s2 += np.float64(values[j + 2]) * values[j + 2]
        s3 += np.float64(values[j + 3]) * values[j + 3]
        j += 4
    while j < stop:
        s0 += np.float64(values[j]) * values[j]
        j += 1
    return (s0 + s1) + (s2 + s3)


def clip_scale(global_norm, clip_norm):
    """Factor that scales gradients to a global norm of at most ``clip_norm`` (1.0 when None)."""
    if clip_norm is None or not np.isfinite(global_norm) or global_norm <= clip_norm:
        return 1.0
    return float(clip_norm / global_norm)


@njit(cache=True, nogil=True)
def sgd_into(params_out, velocity_out, params, velocity, grads, start, stop, learning_rate,
             momentum, nesterov, scale):
    """SGD step on [start, stop): reads params/velocity, writes params_out/velocity_out.

    velocity = momentum * velocity - lr * g;  params += velocity  (Nesterov: momentum*velocity - lr*g).
    The outputs may be the inputs (in place) or other buffers (so a step can be re-run). Returns
    0.0 when every new parameter is finite, NaN otherwise.
    """
    lr = np.float32(learning_rate)
    mu = np.float32(momentum)
    s = np.float32(scale)
    non_finite = np.float32(0.0)
    if momentum == 0.0:
        for j in range(start, stop):
            p = params[j] - lr * (s * grads[j])
            params_out[j] = p
            non_finite += p - p  # NaN for NaN and +-inf, 0 otherwise
    else:
        for j in range(start, stop):
            g = s * grads[j]
            v = mu * velocity[j] - lr * g
            velocity_out[j] = v
            if nesterov:
                p = params[j] + (mu * v - lr * g)
            else:
                p = params[j] + v
            params_out[j] = p
            non_finite += p - p
    return non_finite


def sgd_ref(params, velocity, grads, learning_rate, momentum, nesterov, scale):
    """NumPy twin of :func:`sgd_into` (returns new params and velocity)."""
    g = np.float32(scale) * grads
    if momentum == 0.0:
        return params - np.float32(learning_rate) * g, velocity
    v = np.float32(momentum) * velocity - np.float32(learning_rate) * g
    step = np.float32(momentum) * v - np.float32(learning_rate) * g if nesterov else v
    return params + step, v


@njit(cache=True, nogil=True)
def adam_into(params_out, m_out, v_out, params, m, v, grads, start, stop, learning_rate, beta1,
              beta2, epsilon, step, weight_decay, scale):
    """Adam (weight_decay=0) or AdamW (decoupled weight decay) step on [start, stop).

    Reads params/m/v, writes params_out/m_out/v_out (which may be the same arrays). ``step`` is the
    1-based update count used for bias correction. Returns 0.0 when every new parameter is finite,
    NaN otherwise.
    """
    b1 = np.float32(beta1)
    b2 = np.float32(beta2)
    one_minus_b1 = np.float32(1.0 - beta1)
    one_minus_b2 = np.float32(1.0 - beta2)
    # Bias corrections folded into the step size: lr * sqrt(1-b2^t) / (1-b1^t), and eps scaled to
    # match p -= lr * m_hat / (sqrt(v_hat) + eps) exactly.
    correction2 = np.sqrt(1.0 - beta2 ** step)
    lr_t = np.float32(learning_rate * correction2 / (1.0 - beta1 ** step))
    eps_t = np.float32(epsilon * correction2)
    decay = np.float32(1.0 - learning_rate * weight_decay)
    s = np.float32(scale)
    non_finite = np.float32(0.0)
    for j in range(start, stop):
        g = s * grads[j]
        mj = b1 * m[j] + one_minus_b1 * g
        vj = b2 * v[j] + one_minus_b2 * (g * g)
        m_out[j] = mj
        v_out[j] = vj
        p = params[j]
        if weight_decay != 0.0:
            p = p * decay
        p = p - lr_t * mj / (np.sqrt(vj) + eps_t)
        params_out[j] = p
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
