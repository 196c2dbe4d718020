"""Dense, activations, Dropout, reshaping, BatchNorm, and the softmax cross-entropy loss."""
import math
import numbers

import numpy as np

from models.layers.base import Layer, check_init, check_positive_int, initial_kernel
from models.layers.batchnorm_kernels import batch_norm_backward_into, batch_norm_forward_into
from models.layers.loss_kernels import softmax_cross_entropy_into, softmax_cross_entropy_ref

__all__ = ["Dense", "Identity", "ReLU", "Dropout", "Reshape", "Flatten", "BatchNorm", "BinaryLogits",
           "softmax", "softmax_cross_entropy"]


class Dense(Layer):
    """Fully connected layer ``y = x @ kernel + bias`` on inputs of shape (n, features).

    Args:
        units: number of outputs.
        init: "he" (default, before a ReLU) or "glorot".
        activation: None or ``"relu"``, applied in place after the bias (Keras's
            ``Dense(activation="relu")``).
    """

    kind = "dense"
    activation = None  # a class default, so models pickled before it existed still load

    def __init__(self, units, *, init="he", activation=None):
        self.units = check_positive_int(units, "units")
        self.init = check_init(init)
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu'. Received: activation="
                             f"{activation!r}. Add other activations as their own layer.")
        self.activation = activation

    def output_shape(self, input_shape):
        if len(input_shape) != 1:
            raise ValueError(f"Dense expects inputs of shape (n, features). Received input_shape="
                             f"{tuple(input_shape)!r} (without the batch axis). Add Flatten() first.")
        return (self.units,)

    def weight_shapes(self, input_shape):
        (features,) = input_shape
        return {"kernel": (features, self.units), "bias": (self.units,)}

    def init_weights(self, input_shape, rng):
        (features,) = input_shape
        kernel = initial_kernel((features, self.units), features, self.units, self.init, rng)
        return {"kernel": kernel, "bias": np.zeros(self.units, dtype=np.float32)}

    def forward(self, x, weights, theta, *, training=False, rng=None):
        y = x @ weights["kernel"]
        y += weights["bias"]
        if self.activation == "relu":
            np.maximum(y, 0, out=y)
            return y, (x, y)
        return y, x

    writes_into_out = True  # backward(out=...) writes the gradients into given arrays

    def backward(self, weights, cache, dy, *, need_input_grad=True, out=None):
        if self.activation == "relu":
            x, y = cache
            dy = dy * (y > 0)
        else:
            x = cache
        # x.T and kernel.T are strided views: BLAS reads them transposed, nothing is copied.
        if out is not None and out["kernel"].dtype == dy.dtype:
            np.matmul(x.T, dy, out=out["kernel"])  # straight into the engine's gradient slot
            np.sum(dy, axis=0, out=out["bias"])
            grads = out
        else:
            grads = {"kernel": x.T @ dy, "bias": dy.sum(axis=0)}
        return (dy @ weights["kernel"].T if need_input_grad else None), grads


class Identity(Layer):
    """Passes its input through: holds a place in a Sequential, whose parameter names count layers."""

    kind = "identity"


class ReLU(Layer):
    """Element-wise ``max(x, 0)``."""

    kind = "relu"

    def forward(self, x, weights, theta, *, training=False, rng=None):
        y = np.maximum(x, 0)
        return y, y

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        return (dy * (cache > 0) if need_input_grad else None), {}


class Dropout(Layer):
    """Inverted dropout: in training, zero each value with probability ``rate`` and scale the rest.

    Scaling by 1/(1 - rate) in training keeps the expected activation, so inference is the identity.
    """

    kind = "dropout"
    uses_rng = True

    def __init__(self, rate):
        if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be a float in [0, 1). Received: rate={rate!r}.")
        self.rate = float(rate)

    def forward(self, x, weights, theta, *, training=False, rng=None):
        if not training or self.rate == 0.0:
            return x, None
        if rng is None:
            rng = np.random.default_rng()
        keep = rng.random(x.shape, dtype=x.dtype) >= self.rate
        mask = keep * x.dtype.type(1.0 / (1.0 - self.rate))  # scaled mask, in x's dtype
        return x * mask, mask

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        if not need_input_grad:
            return None, {}
        return (dy if cache is None else dy * cache), {}


class Reshape(Layer):
    """Reshape each example to ``target_shape`` (e.g. (40,) -> (40, 1) for a 1-channel Conv1D)."""

    kind = "reshape"

    def __init__(self, target_shape):
        self.target_shape = tuple(int(d) for d in target_shape)

    def output_shape(self, input_shape):
        if math.prod(input_shape) != math.prod(self.target_shape):
            raise ValueError(f"cannot reshape examples of shape {tuple(input_shape)} to "
                             f"{self.target_shape}: the sizes differ.")
        return self.target_shape

    def forward(self, x, weights, theta, *, training=False, rng=None):
        return x.reshape((x.shape[0],) + self.target_shape), x.shape

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        return (dy.reshape(cache) if need_input_grad else None), {}


class Flatten(Reshape):
    """Flatten each example to one axis: (n, length, channels) -> (n, length * channels)."""

    kind = "flatten"

    def __init__(self):  # no target shape: it follows from the input shape
        pass

    def output_shape(self, input_shape):
        return (math.prod(input_shape),)

    def forward(self, x, weights, theta, *, training=False, rng=None):
        return x.reshape(x.shape[0], -1), x.shape


class BatchNorm(Layer):
    """Batch normalization over the last (feature or channel) axis.

    Training normalizes with the batch mean and (biased) variance and moves the running statistics
    towards them: ``running = momentum * running + (1 - momentum) * batch`` (the Keras convention).
    Inference uses the running statistics. ``gamma``/``beta`` are weights; ``running_mean`` and
    ``running_var`` are theta.
    """

    kind = "batchnorm"

    def __init__(self, *, momentum=0.9, epsilon=1e-5):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1). Received: momentum={momentum!r}.")
        if not epsilon > 0.0:
            raise ValueError(f"epsilon must be positive. Received: epsilon={epsilon!r}.")
        self.momentum, self.epsilon = float(momentum), float(epsilon)

    def weight_shapes(self, input_shape):
        return {"gamma": (input_shape[-1],), "beta": (input_shape[-1],)}

    def theta_shapes(self, input_shape):
        return {"running_mean": (input_shape[-1],), "running_var": (input_shape[-1],)}

    def init_weights(self, input_shape, rng):
        return {"gamma": np.ones(input_shape[-1], np.float32),
                "beta": np.zeros(input_shape[-1], np.float32)}

    def init_theta(self, input_shape):
        return {"running_mean": np.zeros(input_shape[-1], np.float32),
                "running_var": np.ones(input_shape[-1], np.float32)}

    def forward(self, x, weights, theta, *, training=False, rng=None):
        gamma, beta = weights["gamma"], weights["beta"]
        if not training:
            # Fold the running statistics into one scale and shift per channel.
            inv_std = 1.0 / np.sqrt(theta["running_var"] + self.epsilon)
            scale = gamma * inv_std
            shift = beta - theta["running_mean"] * scale
            return x * scale + shift, {"x": x, "mean": theta["running_mean"], "inv_std": inv_std}
        x = np.ascontiguousarray(x)
        rows = x.reshape(-1, x.shape[-1])
        channels, dtype = x.shape[-1], x.dtype
        y, x_hat = np.empty_like(x), np.empty_like(x)
        mean, var, inv_std = (np.empty(channels, dtype) for _ in range(3))
        batch_norm_forward_into(y.reshape(rows.shape), x_hat.reshape(rows.shape), rows,
                                gamma.astype(dtype, copy=False), beta.astype(dtype, copy=False),
                                self.epsilon, mean, var, inv_std)
        return y, {"x_hat": x_hat, "inv_std": inv_std, "mean": mean, "var": var}

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        scale = weights["gamma"] * cache["inv_std"]
        if "x_hat" not in cache:  # inference statistics are constants: an affine map per channel
            x_hat = (cache["x"] - cache["mean"]) * cache["inv_std"]
            axes = tuple(range(dy.ndim - 1))
            grads = {"gamma": np.sum(dy * x_hat, axis=axes), "beta": dy.sum(axis=axes)}
            return (dy * scale if need_input_grad else None), grads
        # The batch mean and variance depend on x too, which gives
        # dx = gamma / std * (dy - mean(dy) - x_hat * mean(dy * x_hat)).
        dy = np.ascontiguousarray(dy)
        x_hat, channels = cache["x_hat"], dy.shape[-1]
        grads = {"gamma": np.empty(channels, dy.dtype), "beta": np.empty(channels, dy.dtype)}
        dx = np.empty_like(dy) if need_input_grad else None
        batch_norm_backward_into(None if dx is None else dx.reshape(-1, channels), grads["gamma"],
                                 grads["beta"], dy.reshape(-1, channels),
                                 x_hat.reshape(-1, channels), scale.astype(dy.dtype, copy=False))
        return dx, grads

    def updated_theta(self, theta, cache):
        m = self.momentum
        return {"running_mean": m * theta["running_mean"] + (1.0 - m) * cache["mean"],
                "running_var": m * theta["running_var"] + (1.0 - m) * cache["var"]}


class BinaryLogits(Layer):
    """A one-unit sigmoid head as two-class logits: z -> [0, z], so softmax gives [1 - s(z), s(z)]
    and softmax cross-entropy equals binary cross-entropy (Keras's ``Dense(1, "sigmoid")``)."""

    kind = "binary_logits"

    def output_shape(self, input_shape):
        if tuple(input_shape) != (1,):
            raise ValueError(f"BinaryLogits takes one logit per example, shape (n, 1). Received "
                             f"input_shape={tuple(input_shape)!r}. Put Dense(1) before it.")
        return (2,)

    def forward(self, x, weights, theta, *, training=False, rng=None):
        return np.concatenate([np.zeros_like(x), x], axis=1), None

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        return (dy[:, 1:].copy() if need_input_grad else None), {}


def softmax(logits):
    """Row-wise softmax, stable for large logits (the row maximum is subtracted first)."""
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    exp /= exp.sum(axis=1, keepdims=True)
    return exp


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy of integer labels and its gradient with respect to the logits.

    Args:
        logits: (n, num_classes) array.
        labels: (n,) integer class indices in [0, num_classes).

    Returns:
        ``(loss, dlogits)``: the mean loss as a Python float and an array shaped like ``logits``.
        One numba pass in float32 and float64 (``models.layers.loss_kernels``), NumPy otherwise.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    n, num_classes = logits.shape
    if logits.dtype in (np.float32, np.float64) and labels.dtype.kind in "iu":
        dlogits = np.empty_like(logits)
        loss, bad_row = softmax_cross_entropy_into(dlogits, logits, labels)
        if bad_row < 0:
            return float(loss), dlogits
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be class indices in [0, {num_classes}). Received labels in "
                         f"[{labels.min()}, {labels.max()}].")
    return softmax_cross_entropy_ref(logits, labels)

