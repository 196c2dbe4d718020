"""The model contract, checked once in the parent before any worker starts.

The protocol itself is documented in the ``models`` package docstring (``models/__init__.py``).
:func:`check_model_contract` runs it on one or two examples and raises
:class:`ModelContractError` naming the method, the key, what was expected and what was found, so
a model that would broadcast a wrong-shaped gradient or return one row of predictions fails here
instead of training silently or failing inside a worker.
"""
import inspect
import numbers
from collections.abc import Mapping

import numpy as np

from engine.core.errors import EngineError

_SEE = "See the model protocol in the models package docstring (models/__init__.py)."


class ModelContractError(EngineError, TypeError, ValueError):
    """The model does not follow the model protocol (caught as TypeError or ValueError too)."""

    def __init__(self, method, problem):
        self.method, self.problem = method, problem
        super().__init__(f"{method}: {problem} {_SEE}")


def loss_and_grads_options(model):
    """(takes_rng, takes_out): which optional keywords ``model.loss_and_grads`` accepts.

    ``rng`` is passed only to a model that declares it (or takes ``**kwargs``); ``out`` (a dict of
    float32 views to write the gradients into, no copy) only to one that names it.
    """
    try:
        parameters = inspect.signature(model.loss_and_grads).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False, False
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return "rng" in parameters or var_keyword, "out" in parameters


def _check_arrays(method, what, values, expected_shapes):
    """``values`` maps exactly the names of ``expected_shapes`` to float32-castable arrays."""
    if not isinstance(values, Mapping):
        raise ModelContractError(method, f"{what} must be a dict of arrays keyed like the state. "
                                         f"Found {type(values).__name__}.")
    missing = sorted(set(expected_shapes) - set(values))
    extra = sorted(set(values) - set(expected_shapes))
    if missing or extra:
        raise ModelContractError(method, f"{what} must have exactly the keys of the state. Missing "
                                         f"{missing}, unexpected {extra}.")
    for name, shape in expected_shapes.items():
        try:
            array = np.asarray(values[name])
        except Exception as error:  # noqa: BLE001 - anything that is not array-like
            raise ModelContractError(method, f"{what}[{name!r}] is not an array: {error}.") from None
        if array.dtype == object or not np.issubdtype(array.dtype, np.number) or \
                np.issubdtype(array.dtype, np.complexfloating):
            raise ModelContractError(method, f"{what}[{name!r}] must be a real numeric array "
                                             f"castable to float32. Found dtype {array.dtype}.")
        if array.shape != tuple(shape):
            raise ModelContractError(method, f"{what}[{name!r}] must have shape {tuple(shape)} "
                                             f"(no broadcasting). Found shape {array.shape}.")


def check_model_contract(model, state, x, y, num_outputs=None):
    """Dry-run the model protocol on ``x``, ``y`` (one or two examples) at ``state``.

    Checks: ``loss_and_grads`` returns ``(loss, grads)`` or ``(loss, grads, theta)`` with a finite
    scalar loss, gradients with exactly the keys and shapes of ``state.weights``, theta (if
    returned) with those of ``state.theta``, and leaves ``state`` unchanged; ``predict`` returns
    ``(n, num_outputs)``. Returns the number of outputs ``predict`` gave.

    Raises:
        ModelContractError: what the model returned instead, and which method and key.
    """
    takes_rng, _ = loss_and_grads_options(model)
    before = state.buffer.copy()
    kwargs = {"rng": np.random.default_rng(0)} if takes_rng else {}
    try:
        returned = model.loss_and_grads(state, x, y, **kwargs)
    except TypeError as error:
        raise ModelContractError("loss_and_grads", f"calling loss_and_grads(state, x, y"
                                 f"{', rng=...' if takes_rng else ''}) raised TypeError: "
                                 f"{error}.") from error
    if not isinstance(returned, (tuple, list)) or len(returned) not in (2, 3):
        raise ModelContractError("loss_and_grads", "must return (loss, grads) or (loss, grads, "
                                 f"theta). Found {type(returned).__name__}"
                                 f"{f' of length {len(returned)}' if hasattr(returned, '__len__') else ''}.")
    loss, grads = returned[0], returned[1]
    if isinstance(loss, np.ndarray) and loss.ndim == 0:
        loss = loss[()]
    if isinstance(loss, (bool, np.bool_)) or not isinstance(loss, numbers.Real):
        raise ModelContractError("loss_and_grads", "the loss must be a Python float or a 0-d "
                                 f"array (the mean over the examples). Found "
                                 f"{type(loss).__name__}{getattr(returned[0], 'shape', '')}.")
    if not np.isfinite(float(loss)):
        raise ModelContractError("loss_and_grads", f"the loss of a dry run at the initial state is "
                                                   f"{float(loss)}, not finite.")
    _check_arrays("loss_and_grads", "grads", grads,
                  {name: view.shape for name, view in state.weights.items()})
    if len(returned) == 3:
        _check_arrays("loss_and_grads", "theta", returned[2],
                      {name: view.shape for name, view in state.theta.items()})
    if not np.array_equal(before.view(np.uint32), state.buffer.view(np.uint32)):
        weights_before, theta_before = state.layout.views(before)
        changed = [name for name, view in state.weights.items()
                   if not np.array_equal(view, weights_before[name])]
        changed += [name for name, view in state.theta.items()
                    if not np.array_equal(view, theta_before[name])]
        state.buffer[...] = before
        raise ModelContractError("loss_and_grads", f"must not modify the state it is given; it "
                                                   f"changed {changed}. Work on copies.")
    predictions = np.asarray(model.predict(state, x))
    expected_rows = len(x)
    if predictions.ndim != 2 or predictions.shape[0] != expected_rows or (
            num_outputs is not None and predictions.shape[1] != num_outputs):
        expected = f"({expected_rows}, {num_outputs if num_outputs is not None else 'num_outputs'})"
        raise ModelContractError("predict", f"must return one row of class scores per example, "
                                            f"shape {expected}. Found shape {predictions.shape}.")
    return int(predictions.shape[1])
