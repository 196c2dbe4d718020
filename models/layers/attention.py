"""Attention over the time axis of (n, time, features) inputs: additive attention pooling
(Bahdanau) and multi-head self-attention (as ``keras.layers.MultiHeadAttention(x, x)``).

Both run as batched BLAS GEMMs (``np.matmul`` over (n, heads) stacks) plus a row softmax; the
backward passes are the same GEMMs transposed, with the softmax Jacobian applied row by row as
``p * (g - sum(p * g))``.
"""
import math
import numbers

import numpy as np

from models.layers.base import Layer, check_positive_int, initial_kernel


def _softmax(z, axis):
    exp = np.exp(z - z.max(axis=axis, keepdims=True))
    exp /= exp.sum(axis=axis, keepdims=True)
    return exp


def _softmax_grad(p, dp, axis):
    return p * (dp - np.sum(p * dp, axis=axis, keepdims=True))


def _check_sequence(input_shape, name):
    if len(input_shape) != 2:
        raise ValueError(f"{name} expects inputs of shape (n, time, features). Received "
                         f"input_shape={tuple(input_shape)!r} (without the batch axis).")


class AttentionPooling(Layer):
    """Additive attention pooling: ``score_t = v . tanh(W h_t + b)``, ``alpha = softmax_t(score)``,
    output ``sum_t alpha_t h_t``: (n, time, features) -> (n, features).

    The weights are Keras's ``Dense(units, tanh)`` (``hidden/kernel``, ``hidden/bias``) and
    ``Dense(1, use_bias=False)`` (``score/kernel``) of ``models.keras_zoo.lstm_attention``.

    Args:
        units: size of the tanh hidden layer that scores each step.
    """

    kind = "attention_pooling"

    def __init__(self, units):
        self.units = check_positive_int(units, "units")

    def output_shape(self, input_shape):
        _check_sequence(input_shape, "AttentionPooling")
        return (input_shape[1],)

    def weight_shapes(self, input_shape):
        features = input_shape[-1]
        return {"hidden/kernel": (features, self.units), "hidden/bias": (self.units,),
                "score/kernel": (self.units, 1)}

    def init_weights(self, input_shape, rng):
        features = input_shape[-1]
        return {"hidden/kernel": initial_kernel((features, self.units), features, self.units,
                                                "glorot", rng),
                "hidden/bias": np.zeros(self.units, np.float32),
                "score/kernel": initial_kernel((self.units, 1), self.units, 1, "glorot", rng)}

    def forward(self, x, weights, theta, *, training=False, rng=None):
        hidden = np.tanh(x @ weights["hidden/kernel"] + weights["hidden/bias"])  # (n, t, units)
        alpha = _softmax((hidden @ weights["score/kernel"])[..., 0], axis=1)    # (n, t)
        context = np.matmul(alpha[:, None, :], x)[:, 0]                         # (n, features)
        return context, (x, hidden, alpha)

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        x, hidden, alpha = cache
        n, steps, features = x.shape
        dalpha = np.matmul(x, dy[:, :, None])[..., 0]                           # (n, t)
        dscore = _softmax_grad(alpha, dalpha, axis=1)
        dpre = dscore[:, :, None] * weights["score/kernel"][:, 0]                # (n, t, units)
        dpre *= 1 - hidden * hidden
        hidden_rows, dpre_rows = hidden.reshape(-1, self.units), dpre.reshape(-1, self.units)
        grads = {"hidden/kernel": x.reshape(-1, features).T @ dpre_rows,
                 "hidden/bias": dpre_rows.sum(axis=0),
                 "score/kernel": hidden_rows.T @ dscore.reshape(-1, 1)}
        if not need_input_grad:
            return None, grads
        dx = dpre @ weights["hidden/kernel"].T
        dx += alpha[:, :, None] * dy[:, None, :]
        return dx, grads


class MultiHeadSelfAttention(Layer):
    """Multi-head self-attention: ``keras.layers.MultiHeadAttention(heads, key_dim)(x, x)``.

    Per head, ``softmax(q k^T / sqrt(key_dim)) v`` with q, k, v linear projections of x (value_dim
    = key_dim), then an output projection back to the input's feature size. In training, dropout
    zeroes attention weights (after the softmax, as Keras does). Weights: ``{query,key,value}/
    kernel`` (features, heads, key_dim), ``.../bias`` (heads, key_dim), ``attention_output/kernel``
    (heads, key_dim, features), ``attention_output/bias`` (features,): the Keras layout.

    Args:
        heads: number of attention heads.
        key_dim: size of each head's query, key and value.
        dropout: rate of dropout on the attention weights, in [0, 1).
    """

    kind = "multi_head_attention"
    uses_rng = True

    def __init__(self, heads, key_dim, *, dropout=0.0):
        self.heads = check_positive_int(heads, "heads")
        self.key_dim = check_positive_int(key_dim, "key_dim")
        if (not isinstance(dropout, numbers.Real) or isinstance(dropout, bool)
                or not 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a float in [0, 1). Received: dropout={dropout!r}.")
        self.dropout = float(dropout)

    def output_shape(self, input_shape):
        _check_sequence(input_shape, "MultiHeadSelfAttention")
        return tuple(input_shape)

    def weight_shapes(self, input_shape):
        features, h, k = input_shape[-1], self.heads, self.key_dim
        shapes = {}
        for part in ("query", "key", "value"):
            shapes.update({f"{part}/kernel": (features, h, k), f"{part}/bias": (h, k)})
        shapes.update({"attention_output/kernel": (h, k, features),
                       "attention_output/bias": (features,)})
        return shapes

    def init_weights(self, input_shape, rng):
        features, width = input_shape[-1], self.heads * self.key_dim
        weights = {}
        for name, shape in self.weight_shapes(input_shape).items():
            if name.endswith("bias"):
                weights[name] = np.zeros(shape, np.float32)
            elif name.startswith("attention_output"):
                weights[name] = initial_kernel(shape, width, features, "glorot", rng)
            else:
                weights[name] = initial_kernel(shape, features, width, "glorot", rng)
        return weights

    def _projection(self, weights):
        """One (features, 3 * heads * key_dim) kernel and its bias: q, k, v in one GEMM."""
        kernel = np.concatenate([weights[f"{p}/kernel"].reshape(weights[f"{p}/kernel"].shape[0], -1)
                                 for p in ("query", "key", "value")], axis=1)
        bias = np.concatenate([weights[f"{p}/bias"].reshape(-1) for p in ("query", "key", "value")])
        return kernel, bias

    def forward(self, x, weights, theta, *, training=False, rng=None):
        n, steps, features = x.shape
        h, k = self.heads, self.key_dim
        kernel, bias = self._projection(weights)
        qkv = (x.reshape(-1, features) @ kernel + bias).reshape(n, steps, 3, h, k)
        qkv = qkv.transpose(2, 0, 3, 1, 4)                                  # (3, n, h, t, k)
        q = qkv[0] * x.dtype.type(1.0 / math.sqrt(k))
        keys, values = qkv[1], qkv[2]
        probs = _softmax(np.matmul(q, keys.transpose(0, 1, 3, 2)), axis=-1)  # (n, h, t, t)
        mask = None
        if training and self.dropout > 0.0:
            if rng is None:
                rng = np.random.default_rng()
            mask = (rng.random(probs.shape, dtype=x.dtype) >= self.dropout) * x.dtype.type(
                1.0 / (1.0 - self.dropout))
            dropped = probs * mask
        else:
            dropped = probs
        context = np.matmul(dropped, values).transpose(0, 2, 1, 3).reshape(n * steps, h * k)
        y = context @ weights["attention_output/kernel"].reshape(h * k, features)
        y += weights["attention_output/bias"]
        return y.reshape(n, steps, features), (x, q, keys, values, probs, mask, dropped, context)

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        x, q, keys, values, probs, mask, dropped, context = cache
        n, steps, features = x.shape
        h, k = self.heads, self.key_dim
        dy_rows = dy.reshape(-1, features)
        output_kernel = weights["attention_output/kernel"].reshape(h * k, features)
        grads = {"attention_output/kernel": (context.T @ dy_rows).reshape(h, k, features),
                 "attention_output/bias": dy_rows.sum(axis=0)}
        dcontext = (dy_rows @ output_kernel.T).reshape(n, steps, h, k).transpose(0, 2, 1, 3)
        ddropped = np.matmul(dcontext, values.transpose(0, 1, 3, 2))        # (n, h, t, t)
        dvalues = np.matmul(dropped.transpose(0, 1, 3, 2), dcontext)        # (n, h, t, k)
        dprobs = ddropped if mask is None else ddropped * mask
        dscores = _softmax_grad(probs, dprobs, axis=-1)
        scale = x.dtype.type(1.0 / math.sqrt(k))
        dq = np.matmul(dscores, keys) * scale
        dkeys = np.matmul(dscores.transpose(0, 1, 3, 2), q)
        dqkv = np.stack([dq, dkeys, dvalues]).transpose(1, 3, 0, 2, 4).reshape(n * steps, 3 * h * k)
        kernel, _ = self._projection(weights)
        dkernel = x.reshape(-1, features).T @ dqkv
        dbias = dqkv.sum(axis=0)
        for index, part in enumerate(("query", "key", "value")):
            columns = slice(index * h * k, (index + 1) * h * k)
            grads[f"{part}/kernel"] = dkernel[:, columns].reshape(features, h, k)
            grads[f"{part}/bias"] = dbias[columns].reshape(h, k)
        if not need_input_grad:
            return None, grads
        return (dqkv @ kernel.T).reshape(n, steps, features), grads
