"""Sequential: a stack of layers that implements the model protocol (see ``models/__init__.py``)."""
import copy
import math

import numpy as np

from engine.core.state import NetworkState
from models.layers.base import Layer, is_positive_int
from models.layers import softmax, softmax_cross_entropy

# predict() and loss() run this many examples at a time, so evaluating a whole data set does not
# hold every hidden activation at once. Inference has no batch statistics, so chunking is exact.
_EVAL_CHUNK = 8192


class LayerModel:
    """What Sequential and Graph share: the loss, the checks of x and y, predict/loss/evaluation
    in chunks, ``with_loss`` and ``to_keras``. A subclass sets ``input_shape``, ``num_outputs``,
    ``weight_shapes``, ``theta_shapes`` and ``loss_fn``, and implements ``init_state``, ``logits``
    and ``forward_backward``."""

    loss_fn = None  # a class default, so models pickled before loss_fn existed still load

    def with_loss(self, loss_fn):
        """A copy of this model (same layers) that trains and evaluates with ``loss_fn``.

        Args:
            loss_fn: an object with ``value_and_grad(logits, labels) -> (mean loss, dlogits)``,
                such as ``models.losses.FocalLoss(gamma=2.0)``, or None for cross-entropy.
        """
        model = copy.copy(self)
        model.loss_fn = check_loss_fn(loss_fn)
        return model

    @property
    def num_weights(self):
        """Number of trainable values."""
        return sum(math.prod(shape) for shape in self.weight_shapes.values())

    def loss_and_grads(self, state, x, y, *, rng=None, out=None):
        """Mean cross-entropy and its gradient in training mode; ``state`` is not modified.

        Args:
            state: a ``NetworkState`` from ``init_state`` (or a copy, average or checkpoint of one).
            x: float32 examples, shape (n, *input_shape). y: integer labels, shape (n,).
            rng: ``np.random.Generator`` for dropout masks; a fresh ``default_rng()`` if None.
            out: optional dict of float32 arrays keyed like ``state.weights`` (the engine's
                gradient slot): the gradients are written there (layers that can, such as Dense,
                write them straight from their matrix products) and ``out`` is returned.

        Returns:
            ``(loss, grads)``, or ``(loss, grads, theta)`` if the model has theta: the running
            statistics after this step. ``grads`` has the keys and shapes of ``state.weights``.
        """
        x, y = self._check_batch(x, y)
        if out is not None and getattr(self, "writes_into_out", False):
            loss, grads, theta = self.forward_backward(state.weights, state.theta, x, y, rng=rng,
                                                       out=out)
        else:
            loss, grads, theta = self.forward_backward(state.weights, state.theta, x, y, rng=rng)
        if out is not None:
            for name, target in out.items():
                if grads[name] is not target:
                    np.copyto(target, grads[name])
            grads = out
        return (loss, grads, theta) if self.theta_shapes else (loss, grads)

    def predict(self, state, x):
        """Class probabilities, shape (n, num_outputs), float32, in inference mode."""
        x = self._check_examples(x)
        return self._evaluate(state, x, None)[0]

    def loss(self, state, x, y):
        """Mean loss (cross-entropy or ``loss_fn``) in inference mode (no dropout, BatchNorm
        running statistics)."""
        x, y = self._check_batch(x, y)
        return self._evaluate(state, x, y)[1]

    def predict_and_loss(self, state, x, y):
        """``(predict(state, x), loss(state, x, y))`` from one forward pass (the engine's
        evaluation uses it when a model has it)."""
        x, y = self._check_batch(x, y)
        return self._evaluate(state, x, y)

    def _evaluate(self, state, x, y):
        probabilities, total = [], 0.0
        for i in range(0, len(x), _EVAL_CHUNK):
            logits = self.logits(state.weights, state.theta, x[i:i + _EVAL_CHUNK])
            probabilities.append(softmax(logits))
            if y is not None:
                total += self._value_and_grad(logits, y[i:i + _EVAL_CHUNK])[0] * len(logits)
        if not probabilities:
            return np.empty((0, self.num_outputs), np.float32), 0.0
        predictions = probabilities[0] if len(probabilities) == 1 else np.concatenate(probabilities)
        return predictions, (total / len(x) if y is not None else None)

    def _value_and_grad(self, logits, y):
        if self.loss_fn is None:
            return softmax_cross_entropy(logits, y)
        return self.loss_fn.value_and_grad(logits, y)

    def _check_examples(self, x):
        x = np.asarray(x, dtype=np.float32)  # no copy when x is already float32
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"x must have shape (n, {', '.join(map(str, self.input_shape))}) for "
                             f"this model. Received: x.shape={x.shape}.")
        return x

    def _check_batch(self, x, y):
        x, y = self._check_examples(x), np.asarray(y)
        if y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise ValueError(f"y must be integer class labels of shape ({len(x)},), one per example. "
                             f"Received: y.shape={y.shape}, y.dtype={y.dtype}. Convert one-hot labels "
                             "with y.argmax(axis=1) and float labels with y.astype(np.int64).")
        if len(x) == 0:
            raise ValueError("a loss needs at least one example. Received x with 0 rows.")
        return x, y

    def to_keras(self, state):
        """A ``keras.Model`` with this model's architecture and ``state``'s weights and theta, ready
        for ``.save("model.keras")`` (imports TensorFlow; see ``models.keras_interop``)."""
        from models.keras_interop import to_keras
        return to_keras(self, state)


class Sequential(LayerModel):
    """A stack of layers ending in logits, trained with mean softmax cross-entropy (or ``loss_fn``).

    Parameters are named ``"{kind}_{index}/{local name}"`` with the layer's position in ``layers``:
    ``"dense_0/kernel"``, ``"batchnorm_1/gamma"``; theta likewise (``"batchnorm_1/running_mean"``).

    Args:
        layers: list of ``Layer`` instances; the last one must output (n, num_outputs) logits.
        input_shape: shape of one example, without the batch axis.
        loss_fn: None (softmax cross-entropy) or a loss from ``models.losses`` (focal loss, label
            smoothing, class weights); :meth:`with_loss` sets it on a copy of any Sequential model.

    Raises:
        ValueError: if a layer does not fit the shape its predecessor produces.
    """

    def __init__(self, layers, input_shape, *, loss_fn=None):
        layers = list(layers)
        if not layers or not all(isinstance(layer, Layer) for layer in layers):
            raise ValueError(f"layers must be a non-empty list of models.layers.Layer instances. "
                             f"Received: layers={layers!r}.")
        self.layers = layers
        self.input_shape = check_input_shape(input_shape)
        self.loss_fn = check_loss_fn(loss_fn)
        self.weight_shapes, self.theta_shapes = {}, {}
        # Per layer: (input shape, [(local name, full name)] of weights, same of theta).
        self._plan = []
        shape = self.input_shape
        for index, layer in enumerate(layers):
            prefix = f"{layer.kind}_{index}"
            try:
                output_shape = layer.output_shape(shape)
            except ValueError as error:
                raise ValueError(f"layer {index} ({layer!r}): {error}") from None
            names = []
            for table, shapes in ((self.weight_shapes, layer.weight_shapes(shape)),
                                  (self.theta_shapes, layer.theta_shapes(shape))):
                names.append([(local, f"{prefix}/{local}") for local in shapes])
                table.update({f"{prefix}/{local}": tuple(s) for local, s in shapes.items()})
            self._plan.append((shape, names[0], names[1]))
            shape = output_shape
        if len(shape) != 1:
            raise ValueError(f"the last layer must output (n, num_outputs) logits. Received output "
                             f"shape {shape} per example. End with Flatten() and Dense(num_classes).")
        self.num_outputs = shape[0]
        # Layers before the first one with weights need no input gradient: backward stops there.
        self._first_trainable = next((i for i, (_, w, _) in enumerate(self._plan) if w), len(layers))
        self._uses_rng = any(layer.uses_rng for layer in layers)

    def init_state(self, seed):
        """A new ``NetworkState``; the same ``seed`` always gives the same float32 values."""
        rng = np.random.default_rng(seed)
        weights, theta = {}, {}
        for layer, (shape, weight_names, theta_names) in zip(self.layers, self._plan):
            initial = layer.init_weights(shape, rng)
            weights.update({full: initial[local] for local, full in weight_names})
            initial = layer.init_theta(shape)
            theta.update({full: initial[local] for local, full in theta_names})
        return NetworkState(weights, theta)

    def logits(self, weights, theta, x, *, training=False, rng=None):
        """The last layer's output for ``x``, from plain dicts of arrays, in ``x``'s dtype."""
        return self._forward(weights, theta, x, training=training, rng=rng)[0]

    writes_into_out = True  # forward_backward takes out= (see loss_and_grads)

    def forward_backward(self, weights, theta, x, y, *, rng=None, out=None):
        """The dtype-generic core of ``loss_and_grads`` on plain dicts of arrays, unchecked.

        Returns ``(loss, grads, new_theta)``; runs in float64 when given float64 arrays. With
        ``out`` (float32 arrays by full weight name), layers that accept ``out=`` in ``backward``
        write their gradients there.
        """
        if rng is None and self._uses_rng:
            rng = np.random.default_rng()
        logits, caches = self._forward(weights, theta, x, training=True, rng=rng)
        loss, gradient = self._value_and_grad(logits, y)
        grads, new_theta = {}, {}
        for index in reversed(range(self._first_trainable, len(self.layers))):
            layer, (_, weight_names, theta_names) = self.layers[index], self._plan[index]
            options = {}
            if out is not None and weight_names and getattr(layer, "writes_into_out", False):
                options["out"] = {local: out[full] for local, full in weight_names}
            gradient, layer_grads = layer.backward(
                {local: weights[full] for local, full in weight_names}, caches[index], gradient,
                need_input_grad=index > self._first_trainable, **options)
            grads.update({full: layer_grads[local] for local, full in weight_names})
        for index, (_, _, theta_names) in enumerate(self._plan):
            if theta_names:
                updated = self.layers[index].updated_theta(
                    {local: theta[full] for local, full in theta_names}, caches[index])
                new_theta.update({full: updated[local] for local, full in theta_names})
        return loss, {name: grads[name] for name in self.weight_shapes}, new_theta

    def _forward(self, weights, theta, x, *, training, rng):
        caches = []
        for layer, (_, weight_names, theta_names) in zip(self.layers, self._plan):
            x, cache = layer.forward(x, {local: weights[full] for local, full in weight_names},
                                     {local: theta[full] for local, full in theta_names},
                                     training=training, rng=rng)
            caches.append(cache)
        return x, caches

    def __repr__(self):
        loss = "" if self.loss_fn is None else f", loss_fn={self.loss_fn!r}"
        return f"Sequential({self.layers!r}, input_shape={self.input_shape!r}{loss})"


def check_input_shape(input_shape):
    """``input_shape`` as a tuple of ints; raises ValueError unless it is positive ints."""
    if isinstance(input_shape, (int, np.integer)):
        input_shape = (input_shape,)
    input_shape = tuple(input_shape)
    if not input_shape or not all(is_positive_int(d) for d in input_shape):
        raise ValueError(f"input_shape must be a tuple of positive ints (one example, no batch "
                         f"axis). Received: input_shape={input_shape!r}.")
    return tuple(int(d) for d in input_shape)


def check_loss_fn(loss_fn):
    if loss_fn is not None and not callable(getattr(loss_fn, "value_and_grad", None)):
        raise TypeError(f"loss_fn must be None or have value_and_grad(logits, labels) -> (loss, "
                        f"dlogits), e.g. models.losses.FocalLoss(). Received: {loss_fn!r}.")
    return loss_fn
