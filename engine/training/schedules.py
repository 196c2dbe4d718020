"""Learning-rate schedules, evaluated once per epoch.

Granularity: the trainer runs one ``ParallelBatchProcessor.run_parallel`` pass per epoch with one
learning rate (``params["learning_rate"]``), so every schedule here is a function of the epoch
index (0-based) and the rate is constant within an epoch. Warmup is therefore linear over whole
epochs. ``ReduceLROnPlateau`` also reads the epoch's logs through :meth:`Schedule.update`.

A schedule's mutable state (only the plateau schedule has any) round-trips through
``get_state``/``set_state`` as JSON-serialisable values, so a resumed run continues exactly.
"""
import math
import numbers

__all__ = ["Schedule", "Constant", "StepDecay", "WarmupCosine", "ReduceLROnPlateau",
           "make_schedule", "SCHEDULE_NAMES"]

SCHEDULE_NAMES = ("constant", "step", "warmup-cosine", "plateau")


def _check_rate(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0. Received: {name}={value!r}.")
    return float(value)


def _check_count(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}. Received: {name}={value!r}.")
    return int(value)


class Schedule:
    """Base class: ``schedule(epoch)`` is the learning rate of that epoch (0-based)."""

    def __call__(self, epoch):
        raise NotImplementedError

    def update(self, epoch, logs):
        """Called after each epoch with its logs (losses, metrics); most schedules ignore it."""

    def get_state(self):
        return {}

    def set_state(self, state):
        pass

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Constant(Schedule):
    """The same learning rate every epoch."""

    def __init__(self, learning_rate):
        self.learning_rate = _check_rate(learning_rate, "learning_rate")

    def __call__(self, epoch):
        return self.learning_rate


class StepDecay(Schedule):
    """``learning_rate * factor ** (epoch // step_epochs)``: multiply by ``factor`` every
    ``step_epochs`` epochs."""

    def __init__(self, learning_rate, *, step_epochs=10, factor=0.1):
        self.learning_rate = _check_rate(learning_rate, "learning_rate")
        self.step_epochs = _check_count(step_epochs, "step_epochs", 1)
        if not 0 < factor <= 1:
            raise ValueError(f"factor must be in (0, 1]. Received: factor={factor!r}.")
        self.factor = float(factor)

    def __call__(self, epoch):
        return self.learning_rate * self.factor ** (epoch // self.step_epochs)


class WarmupCosine(Schedule):
    """Linear warmup over ``warmup_epochs``, then cosine decay to ``min_learning_rate``.

    Epoch e < W runs at ``learning_rate * (e + 1) / (W + 1)``; epoch e >= W at
    ``min + (learning_rate - min) * (1 + cos(pi * (e - W) / (total_epochs - W))) / 2``, so the first
    epoch after warmup runs at the full rate and epochs from ``total_epochs`` on at the minimum.
    """

    def __init__(self, learning_rate, *, total_epochs, warmup_epochs=0, min_learning_rate=0.0):
        self.learning_rate = _check_rate(learning_rate, "learning_rate")
        self.total_epochs = _check_count(total_epochs, "total_epochs", 1)
        self.warmup_epochs = _check_count(warmup_epochs, "warmup_epochs", 0)
        if self.warmup_epochs >= self.total_epochs:
            raise ValueError(f"warmup_epochs must be less than total_epochs. Received: "
                             f"warmup_epochs={warmup_epochs}, total_epochs={total_epochs}.")
        self.min_learning_rate = _check_rate(min_learning_rate, "min_learning_rate")

    def __call__(self, epoch):
        warmup, peak, low = self.warmup_epochs, self.learning_rate, self.min_learning_rate
        if epoch < warmup:
            return peak * (epoch + 1) / (warmup + 1)
        progress = min(1.0, (epoch - warmup) / (self.total_epochs - warmup))
        return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ReduceLROnPlateau(Schedule):
    """Multiply the rate by ``factor`` when ``monitor`` has not improved for ``patience`` epochs.

    An improvement beats the best value by more than ``min_delta``. The rate is multiplied after
    ``patience`` counted epochs without one; the ``cooldown`` epochs right after a reduction are
    not counted (Keras counts the last of them, so its cooldown=1 does nothing). The rate never
    drops below ``min_learning_rate``. ``mode``: "min", "max", or "auto" (max for accuracy).
    """

    def __init__(self, learning_rate, *, monitor="val_loss", factor=0.1, patience=10,
                 min_delta=1e-4, cooldown=0, min_learning_rate=0.0, mode="auto"):
        self.learning_rate = _check_rate(learning_rate, "learning_rate")
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1). Received: factor={factor!r}.")
        self.monitor, self.factor = monitor, float(factor)
        self.patience = _check_count(patience, "patience", 1)
        self.cooldown = _check_count(cooldown, "cooldown", 0)
        self.min_delta = abs(float(min_delta))
        self.min_learning_rate = _check_rate(min_learning_rate, "min_learning_rate")
        self.mode = monitor_mode(monitor, mode)
        self._current, self._best, self._wait, self._cooling = self.learning_rate, None, 0, 0

    def __call__(self, epoch):
        return self._current

    def update(self, epoch, logs):
        value = logs.get(self.monitor)
        if value is None or not math.isfinite(value):
            return
        if is_improvement(value, self._best, self.mode, self.min_delta):
            self._best, self._wait = float(value), 0
        elif self._cooling == 0:
            self._wait += 1
        self._cooling = max(0, self._cooling - 1)
        if self._wait >= self.patience and self._current > self.min_learning_rate:
            self._current = max(self._current * self.factor, self.min_learning_rate)
            self._cooling, self._wait = self.cooldown, 0

    def get_state(self):
        return {"current": self._current, "best": self._best, "wait": self._wait,
                "cooling": self._cooling}

    def set_state(self, state):
        self._current, self._best = float(state["current"]), state["best"]
        self._wait, self._cooling = int(state["wait"]), int(state["cooling"])


def monitor_mode(monitor, mode):
    """Resolve "auto" to "max" for accuracy-like names and "min" otherwise; check the value."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max'. Received: mode={mode!r}.")
    if mode == "auto":
        return "max" if "acc" in monitor or monitor.endswith("auc") else "min"
    return mode


def is_improvement(value, best, mode, min_delta=0.0):
    """Whether ``value`` beats ``best`` (None: nothing yet) by more than ``min_delta``."""
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def make_schedule(name, learning_rate, *, epochs, warmup_epochs=0, step_epochs=10, factor=0.1,
                  patience=5, monitor="val_loss", min_learning_rate=0.0):
    """Build a schedule from its CLI name: "constant", "step", "warmup-cosine" or "plateau"."""
    if name == "constant":
        if warmup_epochs:
            raise ValueError("warmup_epochs needs schedule='warmup-cosine'. Received schedule="
                             "'constant'.")
        return Constant(learning_rate)
    if name == "step":
        return StepDecay(learning_rate, step_epochs=step_epochs, factor=factor)
    if name == "warmup-cosine":
        return WarmupCosine(learning_rate, total_epochs=epochs, warmup_epochs=warmup_epochs,
                            min_learning_rate=min_learning_rate)
    if name == "plateau":
        return ReduceLROnPlateau(learning_rate, monitor=monitor, factor=factor, patience=patience,
                                 min_learning_rate=min_learning_rate)
    raise ValueError(f"unknown schedule {name!r}. Known schedules: {list(SCHEDULE_NAMES)}, or pass "
                     "an engine.training.schedules.Schedule object.")
