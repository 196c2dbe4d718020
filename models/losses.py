"""Classification losses on logits: cross-entropy and focal loss, label smoothing, class weights.

A loss object maps ``(logits, labels)`` to ``(mean loss, dlogits)``; ``Sequential.with_loss(loss)``
makes a model train with it. Every loss here is a MEAN over examples of a per-example term, which is
what lets the engine combine shard gradients weighted by shard size. That is why class weights
scale each example's term and the sum is divided by the number of examples (the Keras convention),
not by the sum of the weights (PyTorch's): a ratio of sums would not combine across shards.

With ``p = softmax(z)``, targets ``q = (1 - s) * onehot(y) + s / K`` (label smoothing ``s``, K
classes), per-class ``alpha`` and focusing ``gamma``, the per-example term is

    l = w[y] * sum_c alpha_c * q_c * (1 - p_c)**gamma * (-log p_c)

gamma=0, alpha=1, s=0, w=1 is plain softmax cross-entropy. The objects are small and picklable (they
travel to every worker with the model) and describe themselves with ``get_config()``.
"""
import numbers

import numpy as np

__all__ = ["CrossEntropy", "FocalLoss", "loss_from_config"]


class CrossEntropy:
    """Mean softmax cross-entropy, optionally with label smoothing and per-class weights.

    Args:
        label_smoothing: s in [0, 1): the target puts 1 - s + s/K on the label and s/K elsewhere.
        class_weight: None, a sequence of K positive weights (or a dict class -> weight), or
            ``"balanced"``, resolved from the training labels by :meth:`with_class_weight`
            (``engine.fit`` does it with scikit-learn's ``compute_class_weight``).
    """

    kind = "cross_entropy"

    def __init__(self, *, label_smoothing=0.0, class_weight=None):
        if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real)
                or not 0.0 <= label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must be a float in [0, 1). Received: "
                             f"label_smoothing={label_smoothing!r}. Use 0.1 for the usual amount.")
        self.label_smoothing = float(label_smoothing)
        self.class_weight = _check_class_weight(class_weight)
        self.gamma, self.alpha = 0.0, 1.0

    def with_class_weight(self, class_weight):
        """A copy of this loss with other class weights (a sequence, dict or None)."""
        config = self.get_config()
        config["class_weight"] = _check_class_weight(class_weight)
        return loss_from_config(config)

    def value_and_grad(self, logits, labels):
        """``(mean loss as a float, dloss/dlogits)`` for (n, K) logits and (n,) integer labels.

        Runs in the dtype of ``logits`` (float32 in training, float64 in gradient tests).
        """
        return _value_and_grad(logits, labels, self.gamma, self.alpha, self.label_smoothing,
                               self._weights(logits.shape[1]))

    def value(self, logits, labels):
        """The mean loss alone (for evaluation)."""
        return self.value_and_grad(logits, labels)[0]

    def get_config(self):
        """A JSON-serialisable description; ``loss_from_config`` rebuilds the loss from it."""
        weight = self.class_weight
        return {"kind": self.kind, "label_smoothing": self.label_smoothing,
                "class_weight": weight if isinstance(weight, (str, type(None))) else
                [float(v) for v in weight]}

    def _weights(self, num_classes):
        weight = self.class_weight
        if isinstance(weight, str):
            raise ValueError('class_weight="balanced" must be resolved from the training labels '
                             "first: loss.with_class_weight(weights), or let engine.fit do it.")
        if weight is not None and len(weight) != num_classes:
            raise ValueError(f"class_weight has {len(weight)} entries but the model has "
                             f"{num_classes} classes.")
        return weight

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "kind")
        return f"{type(self).__name__}({fields})"


class FocalLoss(CrossEntropy):
    """Focal loss (Lin et al., 2017) for softmax outputs: down-weights well-classified examples.

    Args:
        gamma: focusing parameter >= 0; the term of class c is scaled by (1 - p_c)**gamma.
            0 gives cross-entropy.
        alpha: balancing factor, a positive float for every class or a sequence of K floats.
            1.0 (default) leaves the loss scale alone; Keras' 0.25 only divides the loss by 4.
        label_smoothing, class_weight: as for :class:`CrossEntropy`.
    """

    kind = "focal"

    def __init__(self, *, gamma=2.0, alpha=1.0, label_smoothing=0.0, class_weight=None):
        super().__init__(label_smoothing=label_smoothing, class_weight=class_weight)
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not gamma >= 0:
            raise ValueError(f"gamma must be a number >= 0. Received: gamma={gamma!r}. "
                             "The focal loss paper uses gamma=2.")
        self.gamma = float(gamma)
        if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
            if not alpha > 0:
                raise ValueError(f"alpha must be positive. Received: alpha={alpha!r}.")
            self.alpha = float(alpha)
        else:
            self.alpha = _positive_vector(alpha, "alpha")

    def _weights(self, num_classes):
        if isinstance(self.alpha, np.ndarray) and len(self.alpha) != num_classes:
            raise ValueError(f"alpha has {len(self.alpha)} entries but the model has {num_classes} "
                             "classes.")
        return super()._weights(num_classes)

    def get_config(self):
        config = super().get_config()
        config["gamma"] = self.gamma
        config["alpha"] = self.alpha if isinstance(self.alpha, float) else \
            [float(v) for v in self.alpha]
        return config


def loss_from_config(config):
    """Rebuild a loss from ``get_config()`` output. Only the kinds defined here are accepted."""
    config = dict(config)
    kind = config.pop("kind", None)
    classes = {cls.kind: cls for cls in (CrossEntropy, FocalLoss)}
    if kind not in classes:
        raise ValueError(f"unknown loss kind {kind!r}. Known kinds: {sorted(classes)}.")
    return classes[kind](**config)


def _value_and_grad(logits, labels, gamma, alpha, smoothing, class_weight):
    n, num_classes = logits.shape
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be class indices in [0, {num_classes}). Received labels in "
                         f"[{labels.min()}, {labels.max()}].")
    dtype, rows = logits.dtype, np.arange(n)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # stable log-softmax
    p = np.exp(log_p)
    target = np.full(logits.shape, smoothing / num_classes, dtype=dtype)
    target[rows, labels] += dtype.type(1.0 - smoothing)
    if not isinstance(alpha, float) or alpha != 1.0:
        target *= np.asarray(alpha, dtype=dtype)  # alpha_c * q_c, broadcast over rows
    if gamma == 0.0:
        per_class = -target * log_p
        # h_c = p_c * dl/dp_c; the softmax Jacobian then gives dl/dz_j = h_j - p_j * sum_c h_c.
        h = -target
    else:
        one_minus_p = np.maximum(1.0 - p, 0.0)
        modulator = one_minus_p ** gamma
        per_class = -target * modulator * log_p
        # d/dp [(1-p)^g (-log p)] * p = -(1-p)^g + g (1-p)^(g-1) p log p. The second term tends to
        # 0 as p -> 1 for g > 0 but evaluates 0 * inf there in floating point: write 0.
        with np.errstate(divide="ignore", invalid="ignore"):
            focal_term = np.where(one_minus_p > 0, gamma * one_minus_p ** (gamma - 1.0) * p * log_p,
                                  0.0).astype(dtype, copy=False)
        h = -target * (modulator - focal_term)
    per_example = per_class.sum(axis=1)
    dlogits = h - p * h.sum(axis=1, keepdims=True)
    scale = np.full(n, 1.0 / n, dtype=dtype)
    if class_weight is not None:
        example_weight = np.asarray(class_weight, dtype=dtype)[labels]
        per_example *= example_weight
        scale *= example_weight
    dlogits *= scale[:, None]
    return float(per_example.mean()), dlogits


def _check_class_weight(class_weight):
    if class_weight is None:
        return None
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ValueError(f"class_weight must be None, 'balanced', a sequence or a dict. "
                             f"Received: class_weight={class_weight!r}.")
        return class_weight
    if isinstance(class_weight, dict):
        keys = sorted(int(k) for k in class_weight)
        if keys != list(range(len(keys))):
            raise ValueError(f"a class_weight dict needs every class 0..K-1 as a key. Received "
                             f"keys {keys}.")
        class_weight = [class_weight[k] if k in class_weight else class_weight[str(k)]
                        for k in keys]
    return _positive_vector(class_weight, "class_weight")


def _positive_vector(values, name):
    try:
        vector = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of positive numbers. Received: "
                         f"{name}={values!r}.") from None
    if vector.ndim != 1 or len(vector) < 2 or not np.all(np.isfinite(vector)) or \
            not np.all(vector > 0):
        raise ValueError(f"{name} must be a sequence of at least 2 positive finite numbers, one "
                         f"per class. Received: {name}={values!r}.")
    return vector
