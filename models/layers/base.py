"""The layer contract shared by every layer, and the weight initializers.

A layer holds only its configuration; its arrays live in a ``NetworkState`` and are passed in, so a
model is a small picklable object and one model can run any number of states:

    y, cache = layer.forward(x, weights, theta, training=..., rng=...)
    dx, grads = layer.backward(weights, cache, dy, need_input_grad=True)
    new_theta = layer.updated_theta(theta, cache)      # only layers with theta (BatchNorm)

Layers with several inputs (``MergeLayer``) take and return lists; only ``models.Graph`` runs them.
``weights``/``theta``/``grads`` are dicts keyed by local names ("kernel", "bias", ...); the container
prefixes them ("dense_0/kernel"). The maths runs in the dtype of its inputs, so float32 stays
float32 (no Python-side float64 scalars) and float64 works for finite-difference tests.
"""
import math

import numpy as np

_INITIALIZERS = ("he", "glorot")


def initial_kernel(shape, fan_in, fan_out, init, rng):
    """A float32 kernel: He normal (std sqrt(2/fan_in), for ReLU) or Glorot uniform."""
    if init == "he":
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_in))
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def is_positive_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def check_positive_int(value, name):
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive int. Received: {name}={value!r}.")
    return int(value)


def check_init(init):
    if init not in _INITIALIZERS:
        raise ValueError(f"init must be one of {_INITIALIZERS}. Received: init={init!r}. Use 'he' "
                         "before a ReLU and 'glorot' for the output layer.")
    return init


class Layer:
    """Base class: a parameter-free layer that passes its input through unchanged.

    ``kind`` names the layer in parameter names; shapes exclude the batch axis. Subclasses override
    what they need: shapes and initial values of their weights and theta, ``forward`` (returns the
    output and whatever ``backward`` needs) and ``backward`` (returns the input gradient, or None
    when ``need_input_grad`` is False, and the weight gradients). Neither modifies its arguments.
    """

    kind = "layer"
    uses_rng = False  # True if training-mode forward draws random numbers (Dropout)

    def output_shape(self, input_shape):
        """Shape of one output example; raises ValueError if ``input_shape`` does not fit."""
        return tuple(input_shape)

    def weight_shapes(self, input_shape):
        return {}

    def theta_shapes(self, input_shape):
        return {}

    def init_weights(self, input_shape, rng):
        return {}

    def init_theta(self, input_shape):
        return {}

    def forward(self, x, weights, theta, *, training=False, rng=None):
        return x, None

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        return (dy if need_input_grad else None), {}

    def updated_theta(self, theta, cache):
        """New theta after a training-mode forward pass that returned ``cache``."""
        return {}

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class MergeLayer(Layer):
    """Base class of layers with several inputs (Add, Concatenate), for ``models.Graph``.

    The same contract with lists: ``output_shape(input_shapes)``, ``forward(xs, ...)`` and
    ``backward(...)`` returning one input gradient per input (None each when not needed).
    """

    kind = "merge"

    def output_shape(self, input_shapes):
        raise NotImplementedError

    def weight_shapes(self, input_shapes):
        return {}

    def theta_shapes(self, input_shapes):
        return {}


def check_num_classes(value):
    if not is_positive_int(value) or value < 2:
        raise ValueError(f"num_classes must be an int >= 2. Received: num_classes={value!r}.")
    return int(value)
