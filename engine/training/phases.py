"""Phase plans: consecutive runs of epochs, each with its own frozen weights, rate and schedule.

The two-phase fine-tuning recipe (train a new head on a frozen base, then unfreeze the top layers
at a lower rate) is a plan of two phases:

    fit(model, x, y, phases=[dict(epochs=5, freeze=["conv*"], learning_rate=1e-3),
                             dict(epochs=10, freeze=["conv1d_1/*"], learning_rate=1e-4)])

Phase k covers the epochs after those of phases 1..k-1. At its first epoch the trainer calls
``processor.set_frozen(freeze)`` and, for every phase but the first, ``reset_optimizer()`` (unless
``reset_optimizer=False``): Keras' recipe compiles the model again, which gives the thawed
weights fresh moments too. The schedule of a phase runs over that phase's epochs only (its epoch
0 is the phase's first). A plan is plain JSON (``to_json``), stored in every checkpoint, so a
resumed run continues in the phase its epoch belongs to.
"""
import numbers
from dataclasses import dataclass

from engine.training.schedules import Schedule, make_schedule

__all__ = ["Phase", "make_plan", "phase_index", "plan_to_json"]

_KEYS = ("epochs", "freeze", "learning_rate", "schedule", "reset_optimizer")


@dataclass(frozen=True)
class Phase:
    """One phase of a plan (see the module docstring).

    Attributes:
        epochs: epochs in this phase. start: its first epoch (0-based, over the whole run).
        freeze: fnmatch patterns of the weights kept fixed (empty: all trainable).
        learning_rate: the phase's base rate. schedule: a schedule name or Schedule object.
        reset_optimizer: forget momentum / Adam moments and the step count at the phase's start.
    """

    epochs: int
    start: int
    freeze: tuple
    learning_rate: float
    schedule: object
    reset_optimizer: bool


def make_plan(phases, *, learning_rate, schedule):
    """Check a list of phase dicts (or Phase objects) and return the Phases, with their starts.

    Args:
        phases: e.g. ``[dict(epochs=5, freeze=["conv*"], learning_rate=1e-3), dict(epochs=10)]``;
            keys ``epochs`` (required), ``freeze``, ``learning_rate``, ``schedule``,
            ``reset_optimizer`` (default True).
        learning_rate, schedule: the trainer's, for phases that name none.
    Raises:
        ValueError/TypeError naming the phase (1-based) and the key.
    """
    if isinstance(phases, (str, bytes, dict)) or not hasattr(phases, "__iter__"):
        raise TypeError(f"phases must be a list of dicts such as [dict(epochs=5, freeze=['conv*']"
                        f"), dict(epochs=10)]. Received: {phases!r}.")
    plan, start = [], 0
    for number, given in enumerate(phases, 1):
        where = f"phases[{number - 1}] (phase {number})"
        if isinstance(given, Phase):
            given = {key: getattr(given, key) for key in _KEYS}
        if not isinstance(given, dict):
            raise TypeError(f"{where} must be a dict. Received: {given!r}.")
        unknown = sorted(set(given) - set(_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; a phase takes {list(_KEYS)}.")
        epochs = given.get("epochs")
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
            raise ValueError(f"{where}: epochs must be a positive int (the epochs of this phase)"
                             f". Received: epochs={epochs!r}.")
        freeze = given.get("freeze") or ()
        freeze = (freeze,) if isinstance(freeze, str) else tuple(freeze)
        rate = given.get("learning_rate", learning_rate)
        phase_schedule = given.get("schedule")
        if phase_schedule is None:
            if isinstance(schedule, Schedule):
                raise ValueError(f"{where} names no schedule and the trainer's schedule is a "
                                 f"Schedule object ({schedule!r}), which has its own rate: give "
                                 "the phase schedule= (a name or a Schedule).")
            phase_schedule = schedule
        if not isinstance(phase_schedule, (str, Schedule)):
            raise TypeError(f"{where}: schedule must be a name or a Schedule. Received: "
                            f"{phase_schedule!r}.")
        reset = given.get("reset_optimizer", True)
        if not isinstance(reset, bool):
            raise TypeError(f"{where}: reset_optimizer must be True or False. Received: "
                            f"{reset!r}.")
        plan.append(Phase(int(epochs), start, freeze, rate, phase_schedule, reset))
        start += int(epochs)
    if not plan:
        raise ValueError("phases is empty; give at least one phase, e.g. [dict(epochs=10)].")
    return plan


def plan_epochs(phases, epochs, *, freeze, learning_rate, schedule):
    """The trainer's phase plan (one phase without ``phases``) and the last epoch to train.

    Args:
        phases: the trainer's ``phases=`` (None, or as for :func:`make_plan`).
        epochs: the last epoch; required without phases, at most their total (the default) with.
        freeze, learning_rate, schedule: the trainer's, for the single phase without ``phases``.
    Returns:
        ``(plan, epochs)``.
    """
    if phases is None:
        _check_epochs(epochs)
        freeze = freeze or ()
        plan = [Phase(epochs, 0, tuple(freeze) if isinstance(freeze, (list, tuple))
                      else (freeze,), learning_rate, schedule, False)]
        return plan, epochs
    plan = make_plan(phases, learning_rate=learning_rate, schedule=schedule)
    total = sum(phase.epochs for phase in plan)
    if epochs is None:
        return plan, total
    _check_epochs(epochs)
    if epochs > total:
        raise ValueError(f"epochs={epochs} is past the end of the phases ({total} epochs in "
                         "all). Leave epochs out to train every phase, or add a phase.")
    return plan, epochs


def _check_epochs(epochs):
    # The same message as the trainer's other positive-int options.
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs must be a positive int. Received: epochs={epochs!r}. It is the "
                         "number of the last epoch to train.")


def phase_schedules(plan):
    """One Schedule per phase, each over that phase's epochs."""
    return [phase.schedule if isinstance(phase.schedule, Schedule) else
            make_schedule(phase.schedule, phase.learning_rate, epochs=phase.epochs)
            for phase in plan]


def phase_index(plan, epoch):
    """Index (0-based) of the phase that epoch ``epoch`` (0-based) belongs to."""
    for index, phase in enumerate(plan):
        if epoch < phase.start + phase.epochs:
            return index
    return len(plan) - 1


def plan_to_json(plan):
    """The plan as JSON values (what checkpoints record and resume compares)."""
    return [{"epochs": p.epochs, "freeze": list(p.freeze), "learning_rate": p.learning_rate,
             "schedule": p.schedule if isinstance(p.schedule, str) else repr(p.schedule),
             "reset_optimizer": p.reset_optimizer} for p in plan]
