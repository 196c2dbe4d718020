"""KerasModel: a single-input, single-output Keras classifier in the engine's model protocol.

Where TensorFlow runs
---------------------
The owner process (the one holding ``ParallelBatchProcessor``) should stay free of TensorFlow: its
import alone costs seconds and hundreds of MB, and a process that has loaded it must not fork. So a
``KerasModel`` holds plain data only (the model's JSON config or a builder function, the names and
shapes of its variables, its loss configuration), and everything that needs TensorFlow runs
elsewhere:

* describing a builder's model (variable names and shapes, initial weights for a seed) runs once
  per seed in a short-lived forked child (:func:`in_tensorflow_process`), unless TensorFlow is
  already loaded here, in which case it runs here;
* each worker builds the Keras model once, on its first step, with TensorFlow's intra-op threads set
  to the worker's share of the cores and inter-op threads to 1; every step then assigns the shared
  state into the model's variables (nothing is rebuilt) and runs one compiled ``tf.function``.

Made from a ``keras.Model`` object, TensorFlow is already loaded in this process, so the engine
starts its workers with ``spawn`` (``engine.parallel.pool.default_start_method``): that works, but the script
needs an ``if __name__ == "__main__":`` guard, and each worker pays the imports (a few seconds).
A builder function keeps the parent free of TensorFlow and the workers forked.
"""
import functools
import os
import pickle
import sys
import traceback
from dataclasses import dataclass, field, replace

import numpy as np

from engine.core.state import NetworkState, StateLayout

__all__ = ["KerasModel", "in_tensorflow_process", "tensorflow_available"]


def tensorflow_available():
    """True when TensorFlow can be imported (checked without importing it)."""
    import importlib.util
    return importlib.util.find_spec("tensorflow") is not None


@dataclass(frozen=True)
class KerasSpec:
    """Everything the owner knows about a Keras model, as plain data (no TensorFlow objects)."""

    weight_shapes: tuple      # ((name, shape), ...) of model.trainable_weights, in that order
    theta_shapes: tuple       # same for model.non_trainable_weights (e.g. BatchNorm statistics)
    input_shape: tuple        # one example, without the batch axis
    output_units: int         # size of the model's last axis (1 for a sigmoid binary head)
    from_logits: bool         # the model outputs logits rather than probabilities
    loss_config: object       # the compiled Keras loss, serialised (a name or a config dict)
    compile_config: object    # model.get_compile_config(), for the exported .keras file
    num_seed_generators: int  # random layers (Dropout, RNN dropout) whose seeds we set per step
    architecture: str = None  # model.to_json(), or None when a builder makes the model
    initial_buffer: np.ndarray = field(default=None, repr=False, compare=False)

    @property
    def layout(self):
        return StateLayout(self.weight_shapes, self.theta_shapes)

    @property
    def num_outputs(self):
        """Classes the engine sees: a one-unit sigmoid head is two classes, [1 - p, p]."""
        return 2 if self.output_units == 1 else self.output_units


class KerasModel:
    """A Keras classifier trained by the engine: picklable plain data, TensorFlow only in workers.

    Args:
        model: a built ``keras.Model`` (one input, one output: softmax, sigmoid or logits), shipped
            to workers as its JSON config plus weights, or a zero-argument function returning one
            (``functools.partial(builder, **kwargs)`` for arguments), called in each worker.
        loss_fn: None to train with the Keras model's compiled loss (sparse categorical
            cross-entropy when it is not compiled), or an engine loss from ``models.losses``
            (``FocalLoss``, ``CrossEntropy(label_smoothing=..., class_weight=...)``).
        custom_objects: custom layer classes by name, as for ``keras.models.model_from_json``.
        jit_compile: compile the training step with XLA.
        unroll_rnns: in the workers, unroll every recurrent layer over its timesteps (the same
            maths, fewer per-step overheads; the first step traces for longer). Exports keep the
            layers as given.

    Labels are integer class indices; a one-unit sigmoid head is treated as two classes and
    ``predict`` returns ``[1 - p, p]``. ``init_state(seed)`` returns the given model's weights (a
    model object: ``seed`` is ignored) or the builder's fresh weights under ``seed``.

    Example:
        model = KerasModel(functools.partial(models.keras_zoo.imu_cnn_bilstm, dropout=0.3))
        with ParallelBatchProcessor(model, batch_size=64, optimizer="adam") as proc:
            state, results = proc.run_parallel(x, y, model.init_state(0), {"learning_rate": 1e-3})
        model.save_keras(state, "imu.keras")
    """

    # The engine's contract dry run calls a model in the owner; this one must not run there
    # (TensorFlow in the owner would make forking workers unsafe), and it is the engine's own
    # adapter, tested against Keras itself.
    dry_run_in_owner = False

    def __init__(self, model, *, loss_fn=None, custom_objects=None, jit_compile=False,
                 unroll_rnns=False):
        self.custom_objects = dict(custom_objects or {})
        self.jit_compile, self.unroll_rnns = bool(jit_compile), bool(unroll_rnns)
        self.loss_fn = _check_loss_fn(loss_fn)
        self._specs = {}      # seed -> KerasSpec (a builder gives new weights per seed)
        self._runtime = None  # the TensorFlow side, built lazily where the maths runs
        if _is_keras_model(model):
            self.builder = None
            self._fixed_spec = describe_keras_model(model)
        elif callable(model):
            self.builder = model
            self._fixed_spec = None
        else:
            raise TypeError(f"model must be a keras.Model or a zero-argument function that builds "
                            f"one. Received: {type(model).__name__}.")

    # -- the model protocol ----------------------------------------------------------------------
    @property
    def input_shape(self):
        return self.spec().input_shape

    @property
    def num_outputs(self):
        return self.spec().num_outputs

    def spec(self, seed=None):
        """The model's :class:`KerasSpec` (for a builder: its weights under ``seed``; None: any
        seed already described, so a worker never has to describe the model again)."""
        if self._fixed_spec is not None:
            return self._fixed_spec
        if seed is None:
            seed = next(iter(self._specs), 0)
        if seed not in self._specs:
            self._specs[seed] = _describe_builder_cached(self.builder, seed, self.custom_objects)
        return self._specs[seed]

    def init_state(self, seed=0):
        spec = self.spec(seed)
        if spec.initial_buffer is None:  # unpickled: a builder can describe its model again
            if self.builder is None:
                raise RuntimeError("this KerasModel was unpickled without its initial weights; "
                                   "call init_state in the process that made it.")
            spec = self._specs[seed] = _describe_builder_cached(self.builder, seed,
                                                                self.custom_objects)
        return NetworkState.from_buffer(spec.layout, spec.initial_buffer.copy())

    def loss_and_grads(self, state, x, y, *, rng=None):
        """Mean training-mode loss of (x, y), its gradient, and the new non-trainable values."""
        runtime = self._get_runtime()
        rng = np.random.default_rng() if rng is None else rng
        seeds = (rng.integers(0, 2**31 - 1, size=(runtime.num_seed_generators, 2))
                 if runtime.num_seed_generators else None)
        loss, flat = runtime.loss_and_grads(state.buffer, x, y, seeds)
        grads, theta = runtime.layout.views(flat)
        return (loss, grads, theta) if theta else (loss, grads)

    def predict(self, state, x):
        """Class probabilities, shape (n, num_outputs), in inference mode."""
        return self._get_runtime().predict(state.buffer, x)

    def loss(self, state, x, y):
        """Mean loss in inference mode (no dropout, BatchNorm moving statistics)."""
        return self._get_runtime().loss(state.buffer, x, y)

    # -- beyond the protocol ---------------------------------------------------------------------
    def with_loss(self, loss_fn):
        """A copy of this model that trains with ``loss_fn`` (``models.losses``; None: Keras')."""
        model = self._copy()
        model.loss_fn = _check_loss_fn(loss_fn)
        return model

    def to_keras(self, state):
        """A new ``keras.Model`` holding ``state`` (compiled like the original). Imports TF here."""
        from engine.backends._keras_runtime import KerasRuntime
        return KerasRuntime(self.spec(), self._options(unroll_rnns=False)).export(state.buffer)

    def save_keras(self, state, path):
        """Save ``state`` in this model as a ``.keras`` file (``keras.models.load_model`` reads it).

        Runs in a short-lived child process unless TensorFlow is already loaded here, so the
        training script stays free of TensorFlow. Returns the path.
        """
        path = os.fspath(path)
        if not path.endswith(".keras"):
            raise ValueError(f"a Keras model file must end in '.keras'. Received: path={path!r}.")
        problem = self.spec().layout.describe_mismatch(state.layout)
        if problem:
            raise ValueError(f"the state to export does not match this model: {problem}.")
        return in_tensorflow_process(_save_keras, self, state.buffer, path)

    def __repr__(self):
        source = f"builder={_name_of(self.builder)}" if self.builder is not None else "config"
        loss = "" if self.loss_fn is None else f", loss_fn={self.loss_fn!r}"
        return f"KerasModel({source}{loss})"

    # -- internals -------------------------------------------------------------------------------
    def _options(self, **overrides):
        options = dict(loss_config=None if self.loss_fn is None else self.loss_fn.get_config(),
                       custom_objects=self.custom_objects, jit_compile=self.jit_compile,
                       unroll_rnns=getattr(self, "unroll_rnns", False), builder=self.builder)
        return {**options, **overrides}

    def _get_runtime(self):
        if self._runtime is None:
            from engine.backends._keras_runtime import KerasRuntime
            self._runtime = KerasRuntime(self.spec(), self._options())
        return self._runtime

    def _copy(self):
        model = KerasModel.__new__(KerasModel)
        model.__dict__.update(self.__dict__)
        model._specs, model._runtime = dict(self._specs), None
        return model

    def __getstate__(self):
        # Workers need names, shapes and the architecture, not the initial weights (they read the
        # shared state), nor this process's TensorFlow objects.
        state = dict(self.__dict__)
        state["_runtime"] = None
        state["_specs"] = {seed: replace(spec, initial_buffer=None)
                           for seed, spec in self._specs.items()}
        if self._fixed_spec is not None:
            state["_fixed_spec"] = replace(self._fixed_spec, initial_buffer=None)
        return state


# -- describing a model (runs where TensorFlow is loaded) ------------------------------------------
def describe_keras_model(model):
    """The :class:`KerasSpec` of a built ``keras.Model``, initial weights included."""
    import keras
    if len(model.inputs or []) != 1 or len(model.outputs or []) != 1:
        raise ValueError(f"KerasModel takes a model with one input and one output. Received a "
                         f"model with {len(model.inputs or [])} inputs and "
                         f"{len(model.outputs or [])} outputs.")
    weights, theta = model.trainable_weights, model.non_trainable_weights
    for variable in weights + theta:
        if not np.dtype(variable.dtype) == np.float32:
            raise ValueError(f"KerasModel trains float32 variables. Received {variable.path!r} of "
                             f"dtype {variable.dtype}. Build the model with the float32 policy.")
    names = _unique_names([v.path for v in weights + theta])
    loss = getattr(model, "loss", None)
    if isinstance(loss, (dict, list, tuple)):
        raise ValueError("KerasModel takes a model compiled with one loss. Received a "
                         f"{type(loss).__name__} of losses.")
    loss_config = None if loss is None else (loss if isinstance(loss, str)
                                              else keras.losses.serialize(loss))
    try:
        compile_config = model.get_compile_config() if model.compiled else None
    except Exception:  # a compile config that does not serialise is only lost in the export
        compile_config = None
    output_units = int(model.outputs[0].shape[-1])
    seed_generators = [v for v in model.non_trainable_variables
                       if id(v) not in {id(w) for w in theta}]
    buffer = np.concatenate([np.asarray(v.numpy(), np.float32).ravel() for v in weights + theta]
                            ) if weights or theta else np.zeros(0, np.float32)
    architecture = model.to_json()
    return KerasSpec(
        weight_shapes=tuple((n, tuple(v.shape)) for n, v in zip(names, weights)),
        theta_shapes=tuple((n, tuple(v.shape)) for n, v in zip(names[len(weights):], theta)),
        input_shape=tuple(int(d) for d in model.inputs[0].shape[1:]),
        output_units=output_units,
        from_logits=_outputs_logits(model, loss_config),
        loss_config=loss_config, compile_config=compile_config,
        num_seed_generators=len(seed_generators), architecture=architecture,
        initial_buffer=buffer.astype(np.float32))


def _describe_builder(builder, seed, custom_objects):
    import keras
    keras.utils.set_random_seed(seed)
    with keras.utils.custom_object_scope(custom_objects):
        model = builder()
    if not _is_keras_model(model):
        raise TypeError(f"the builder {_name_of(builder)} must return a keras.Model. Received: "
                        f"{type(model).__name__}.")
    return replace(describe_keras_model(model), architecture=None)


_DESCRIPTIONS = {}


def _describe_builder_cached(builder, seed, custom_objects):
    """One child process per (builder, seed) for the life of this process."""
    try:
        key = (pickle.dumps(builder), seed)
    except Exception:  # an unpicklable builder (a closure) is described every time
        key = None
    if key is None or key not in _DESCRIPTIONS:
        spec = in_tensorflow_process(_describe_builder, builder, seed, custom_objects)
        if key is None:
            return spec
        _DESCRIPTIONS[key] = spec
    return _DESCRIPTIONS[key]


def _outputs_logits(model, loss_config):
    config = loss_config.get("config", {}) if isinstance(loss_config, dict) else {}
    if "from_logits" in config:
        return bool(config["from_logits"])
    activation = getattr(model.layers[-1], "activation", None)
    return getattr(activation, "__name__", "") == "linear"


def _unique_names(paths):
    names, seen = [], {}
    for path in paths:
        count = seen.get(path, 0)
        seen[path] = count + 1
        names.append(path if count == 0 else f"{path}_{count}")
    return names


def _is_keras_model(obj):
    keras = sys.modules.get("keras")  # a keras.Model exists only once keras is imported
    return keras is not None and isinstance(obj, keras.Model)


def _name_of(function):
    if isinstance(function, functools.partial):
        arguments = ", ".join(f"{k}={v!r}" for k, v in function.keywords.items())
        return f"{_name_of(function.func)}({arguments})"
    return getattr(function, "__qualname__", repr(function))


def _check_loss_fn(loss_fn):
    if loss_fn is None:
        return None
    if not callable(getattr(loss_fn, "get_config", None)):
        raise TypeError(f"loss_fn must be None or a loss from models.losses (CrossEntropy, "
                        f"FocalLoss). Received: {loss_fn!r}.")
    config = loss_fn.get_config()
    if config.get("class_weight") == "balanced":
        raise ValueError('class_weight="balanced" must be resolved from the training labels first: '
                         "loss.with_class_weight(weights), or let engine.fit do it.")
    return loss_fn


def _save_keras(model, buffer, path):
    model.to_keras(NetworkState.from_buffer(model.spec().layout, buffer)).save(path)
    return path


# -- running TensorFlow code away from a TensorFlow-free process -----------------------------------
def in_tensorflow_process(function, *args):
    """``function(*args)``, run where TensorFlow may be imported; returns its (picklable) result.

    Here when TensorFlow is already loaded (nothing to protect) or fork is unavailable; otherwise
    in a forked child that exits afterwards, so this process never loads TensorFlow and can keep
    forking workers. The child's exception is raised here with its traceback.
    """
    if "tensorflow" in sys.modules or not hasattr(os, "fork"):
        return function(*args)
    import multiprocess
    context = multiprocess.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(sender, function, args), daemon=True,
                              name="engine-keras-probe")
    process.start()
    sender.close()
    try:
        ok, payload = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"the TensorFlow helper process died (exit code {process.exitcode}) "
                           f"while running {_name_of(function)}.") from None
    finally:
        receiver.close()
    process.join()
    if not ok:
        error_type, message = payload
        raise error_type(message)
    return payload


def _child_main(sender, function, args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        result = (True, function(*args))
    except Exception as error:
        kind = type(error) if isinstance(error, (ValueError, TypeError)) else RuntimeError
        result = (False, (kind, f"{error}\n\nIn the TensorFlow helper process:\n"
                                f"{traceback.format_exc()}"))
    sender.send(result)
    sender.close()
