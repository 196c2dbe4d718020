"""Optimizers on flat float32 buffers.

An optimizer here holds only hyper-parameters. Its per-parameter state (momentum, Adam moments)
lives in a buffer the processor owns, shaped ``(optimizer.num_buffers, num_weights)``, and every
update touches only ``[start, stop)``: in ``sync="gradients"`` mode worker *i* updates slice *i* of
the shared parameters and keeps only that slice of optimizer state.

``update_into(params_out, buffers_out, params, buffers, grads, ...)`` reads one copy of the
parameters and optimizer state and writes another (or the same, for an in-place update): with two
copies, an update interrupted by a dying worker can simply be run again. It returns 0.0 when every
new parameter is finite and NaN otherwise, so a diverging step is refused before it becomes the
state. An optimizer may also offer ``update_from_mean_into`` (Adam does), which forms the weighted
mean of two gradient slots inside the update; workers use it when nothing clips.

Every scalar reaches the kernels as a Python ``float`` (or ``int`` for bounds) whatever type the
caller used: the owner compiles the kernels for exactly those types before it forks, and a worker
that met another type (an ``int`` step count, ``momentum=0``) would run LLVM itself, costing about
half a second and 100 MB of resident memory in every worker.
"""
from dataclasses import dataclass

from engine.core import kernels


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent; plain unless ``momentum`` > 0 (optionally Nesterov)."""

    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1). Received: momentum={self.momentum!r}.")
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0. Received: momentum=0.0.")

    @property
    def num_buffers(self):
        return 1 if self.momentum > 0 else 0

    def update_into(self, params_out, buffers_out, params, buffers, grads, start, stop,
                    learning_rate, step, scale):
        velocity_out, velocity = (buffers_out[0], buffers[0]) if self.num_buffers else (grads, grads)
        return kernels.sgd_into(params_out, velocity_out, params, velocity, grads, int(start),
                                int(stop), float(learning_rate), float(self.momentum),
                                bool(self.nesterov), float(scale))


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba); ``weight_decay`` > 0 makes it AdamW (decoupled decay)."""

    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-7
    weight_decay: float = 0.0

    def __post_init__(self):
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1). Received: {name}={value!r}.")
        if self.epsilon <= 0 or self.weight_decay < 0:
            raise ValueError(f"epsilon must be > 0 and weight_decay >= 0. Received: "
                             f"epsilon={self.epsilon!r}, weight_decay={self.weight_decay!r}.")

    num_buffers = 2

    def update_into(self, params_out, buffers_out, params, buffers, grads, start, stop,
                    learning_rate, step, scale):
        return kernels.adam_into(params_out, buffers_out[0], buffers_out[1], params, buffers[0],
                                 buffers[1], grads, int(start), int(stop), float(learning_rate),
                                 float(self.beta1), float(self.beta2), float(self.epsilon),
                                 float(step), float(self.weight_decay), float(scale))

    def update_from_mean_into(self, params_out, buffers_out, params, buffers, first,
                              first_coefficient, last, last_coefficient, start, stop,
                              learning_rate, step):
        """``update_into`` with the gradient ``first_coefficient * first + last_coefficient *
        last`` (a weighted mean of two slots) formed inside the update, unclipped; returns (its
        sum of squares, 0.0 or NaN). ``kernels.adam_mean_into`` says why."""
        return kernels.adam_mean_into(params_out, buffers_out[0], buffers_out[1], params,
                                      buffers[0], buffers[1], first, float(first_coefficient),
                                      last, float(last_coefficient), int(start), int(stop),
                                      float(learning_rate), float(self.beta1), float(self.beta2),
                                      float(self.epsilon), float(step), float(self.weight_decay))


def fuses_slot_mean(optimizer):
    """Whether the workers may call ``optimizer.update_from_mean_into`` instead of its
    ``update_into``: only if the class that defines the fused update also defines (or inherits
    from the one that defines) the plain one. A subclass of Adam that overrides ``update_into``
    alone keeps its own rule: the fused update would skip it."""
    cls = type(optimizer)
    if getattr(cls, "update_from_mean_into", None) is None:
        return False

    def owner(name):
        return next(klass for klass in cls.__mro__ if name in vars(klass))
    return issubclass(owner("update_from_mean_into"), owner("update_into"))


def AdamW(weight_decay=0.01, **options):
    """Adam with decoupled weight decay (Loshchilov & Hutter)."""
    return Adam(weight_decay=weight_decay, **options)


_BY_NAME = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(optimizer):
    """Turn ``"sgd"``, ``"adam"``, ``"adamw"`` or an optimizer object into an optimizer object."""
    if isinstance(optimizer, str):
        if optimizer.lower() not in _BY_NAME:
            raise ValueError(f"unknown optimizer {optimizer!r}. Use one of {sorted(_BY_NAME)} or an "
                             "optimizer object such as engine.SGD(momentum=0.9).")
        return _BY_NAME[optimizer.lower()]()
    if not (hasattr(optimizer, "update_into") and hasattr(optimizer, "num_buffers")):
        raise TypeError(f"optimizer must be a name or an object with update_into and num_buffers "
                        f"(engine.SGD, engine.Adam, engine.AdamW). Received: {optimizer!r}.")
    return optimizer
