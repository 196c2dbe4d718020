"""The loss a training run asks for, from a name or a ``models.losses`` object."""
__all__ = ["make_loss"]


def make_loss(loss, *, label_smoothing=0.0, class_weight=None, gamma=2.0, alpha=1.0):
    """A ``models.losses`` object (or None for plain cross-entropy) from a name or an object."""
    from models.losses import CrossEntropy, FocalLoss
    if loss is None or isinstance(loss, str) and loss in ("ce", "cross_entropy"):
        if not label_smoothing and class_weight is None:
            return None  # the models' own softmax cross-entropy: the same maths, less work
        return CrossEntropy(label_smoothing=label_smoothing, class_weight=class_weight)
    if isinstance(loss, str) and loss == "focal":
        return FocalLoss(gamma=gamma, alpha=alpha, label_smoothing=label_smoothing,
                         class_weight=class_weight)
    if isinstance(loss, str):
        raise ValueError(f"unknown loss {loss!r}. Use 'cross_entropy' ('ce'), 'focal', or a loss "
                         "object from models.losses.")
    if not callable(getattr(loss, "value_and_grad", None)):
        raise TypeError(f"loss must be a name or have value_and_grad(logits, labels). Received: "
                        f"{loss!r}.")
    return loss
