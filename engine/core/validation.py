"""Checks at the public boundary: every bad argument fails here, before any worker starts.

Each error says what was wrong, what was received, and what to do instead.
"""
import numbers

import numpy as np

SYNC_MODES = ("gradients", "states")
START_METHODS = ("fork", "spawn", "forkserver")
_MODEL_METHODS = ("init_state", "loss_and_grads", "predict")


def _positive_int(name, value, hint):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int. Received: {name}={value!r}. {hint}")
    return int(value)


def check_processor_options(num_processes, batch_size, sync, update_interval, timeout_s,
                            start_method, seed, micro_batch_size=None, max_restarts=3):
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, numbers.Integral) or \
            max_restarts < 0:
        raise ValueError(f"max_restarts must be an int >= 0. Received: max_restarts={max_restarts!r}"
                         ". Use 0 to fail on the first dead worker.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int. Received: seed={seed!r}.")
    if num_processes is not None:
        _positive_int("num_processes", num_processes,
                      "Use num_processes=None for one process per usable core.")
    _positive_int("batch_size", batch_size, "It is the global batch, split across processes.")
    if num_processes is not None and batch_size < num_processes:
        raise ValueError(f"batch_size must be at least num_processes so that every process gets an "
                         f"example. Received: batch_size={batch_size}, num_processes={num_processes}."
                         f" Use batch_size>={num_processes} or fewer processes.")
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {SYNC_MODES}. Received: sync={sync!r}.")
    _positive_int("update_interval", update_interval,
                  "Use update_interval=1 to average states after every step.")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(
            timeout_s, numbers.Real) or not timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds or None. Received: "
                         f"timeout_s={timeout_s!r}.")
    if micro_batch_size is not None:
        _positive_int("micro_batch_size", micro_batch_size,
                      "Use None to run each worker's whole shard at once.")
    if start_method is not None and start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS} or None. Received: "
                         f"start_method={start_method!r}.")


def check_model(model):
    if model is None:
        raise ValueError("a model is required. Pass model=... to ParallelBatchProcessor, for example "
                         "models.MLP(sizes=(40, 256, 10)).")
    missing = [name for name in _MODEL_METHODS if not callable(getattr(model, name, None))]
    if missing:
        raise TypeError(f"model must provide {list(_MODEL_METHODS)}; {type(model).__name__} lacks "
                        f"{missing}. See the model protocol in the models package docstring.")


def check_params(params):
    """Return (learning_rate, update_weights, clip_norm) from the per-call ``params`` dict.

    ``learning_rate`` is a number, or a function of the optimizer step (0-based, counted across
    calls) returning one: a per-step schedule such as linear warmup."""
    params = dict(params or {})
    unknown = set(params) - {"learning_rate", "update_weights", "clip_norm"}
    if unknown:
        raise ValueError(f"unknown params keys {sorted(unknown)}. Known keys: learning_rate, "
                         "update_weights, clip_norm.")
    update_weights = params.get("update_weights", True)
    if not isinstance(update_weights, (bool, np.bool_)):
        raise ValueError(f"params['update_weights'] must be True or False. Received: "
                         f"{update_weights!r}.")
    learning_rate = params.get("learning_rate")
    if update_weights and not callable(learning_rate):
        check_learning_rate(learning_rate)
    clip_norm = params.get("clip_norm")
    if clip_norm is not None and (isinstance(clip_norm, bool) or not isinstance(
            clip_norm, numbers.Real) or not clip_norm > 0):
        raise ValueError(f"params['clip_norm'] must be a positive number or None. Received: "
                         f"{clip_norm!r}.")
    if not callable(learning_rate):
        learning_rate = float(learning_rate or 0.0)
    return learning_rate, bool(update_weights), None if clip_norm is None else float(clip_norm)


def check_learning_rate(learning_rate, step=None):
    """A learning rate must be a finite number >= 0 (``step`` names where a schedule gave it)."""
    if (learning_rate is None or isinstance(learning_rate, bool)
            or not isinstance(learning_rate, numbers.Real) or not np.isfinite(learning_rate)
            or learning_rate < 0):
        where = "" if step is None else f" (returned by the learning-rate schedule for step {step})"
        raise ValueError(f"params['learning_rate'] must be a finite number >= 0, or a function of "
                         f"the step returning one. Received: {learning_rate!r}{where}.")
    return float(learning_rate)


def check_state(state, expected_layout, what="initial_state"):
    from engine.core.state import NetworkState
    if not isinstance(state, NetworkState):
        raise TypeError(f"{what} must be a NetworkState. Received: {type(state).__name__}. Build one "
                        "with model.init_state(seed) or NetworkState.load(path).")
    problem = expected_layout.describe_mismatch(state.layout)
    if problem:
        raise ValueError(f"{what} does not match the model: {problem}. Build the state with "
                         "model.init_state(seed) or load a checkpoint of this model.")
    if not np.all(np.isfinite(state.buffer)):
        raise ValueError(f"{what} holds NaN or infinite values. Start from a finite state.")


def check_data(examples, labels, feature_shape, num_outputs):
    """Validate and return (examples as an array, labels as int64)."""
    examples = np.asarray(examples)
    labels = np.asarray(labels)
    if examples.ndim == 0 or len(examples) == 0:
        raise ValueError(f"examples must hold at least one example. Received shape {examples.shape}.")
    if examples.dtype == object or not np.issubdtype(examples.dtype, np.number) or \
            np.issubdtype(examples.dtype, np.complexfloating):
        raise ValueError(f"examples must be a real numeric array. Received dtype {examples.dtype}.")
    if labels.ndim != 1 or len(labels) != len(examples):
        raise ValueError(f"labels must be a 1-D array with one label per example. Received "
                         f"{len(examples)} examples and labels of shape {labels.shape}.")
    if tuple(examples.shape[1:]) != tuple(feature_shape):
        raise ValueError(f"examples have feature shape {tuple(examples.shape[1:])} but the model takes "
                         f"{tuple(feature_shape)}. Reshape the data or build the model for this shape.")
    if not np.all(np.isfinite(examples)):
        bad = int(np.flatnonzero(~np.isfinite(examples.reshape(len(examples), -1)).all(axis=1))[0])
        raise ValueError(f"examples hold NaN or infinite values (first at example {bad}). Clean or "
                         "impute them before training.")
    if labels.dtype == object or not (np.issubdtype(labels.dtype, np.integer) or (
            np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels))
            and np.all(np.mod(labels, 1) == 0))):
        raise ValueError(f"labels must be integer class indices. Received dtype {labels.dtype}"
                         f"{' with non-integer values' if labels.dtype.kind == 'f' else ''}.")
    if labels.min() < 0 or labels.max() >= num_outputs:
        raise ValueError(f"labels must be in [0, {num_outputs}) for a model with {num_outputs} "
                         f"outputs. Received labels from {labels.min()} to {labels.max()}.")
    return examples, labels.astype(np.int64, copy=False)
