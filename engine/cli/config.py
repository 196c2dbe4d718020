"""The configuration of a ``train`` run: defaults, parsing of ``--model-arg``, and building the
model, loss, schedule and callbacks it describes.

``timeout`` None is the trainer's "auto" hang detection, 0 turns it off. A configuration is a plain
JSON-serialisable dict (written to ``output_dir/config.json`` and into
every checkpoint), so ``evaluate`` and ``--resume`` rebuild exactly what was trained.
"""
import ast
import math
import os
import time

from engine.training.schedules import make_schedule

__all__ = ["DEFAULTS", "parse_model_args", "parse_phases", "build_phases", "build_model", "build_loss", "build_schedule",
           "build_callbacks", "default_output_dir"]

# Tuned for the bundled MNIST-1D with the paper's CNN: Adam 1e-2, batch 100 (see docs/cli.md).
DEFAULTS = {
    "data": None, "x_key": None, "y_key": None, "model": "cnn1d", "model_args": {},
    "epochs": 150, "batch_size": 100, "lr": 1e-2, "workers": None, "sync": "gradients",
    "update_interval": 1, "optimizer": "adam", "loss": "ce", "focal_gamma": 2.0,
    "focal_alpha": 1.0, "label_smoothing": 0.0, "class_weights": None, "schedule": "constant",
    "warmup_epochs": 0, "min_lr": 0.0, "step_epochs": 30, "lr_factor": 0.1, "plateau_patience": 10,
    "clip_norm": None, "grad_accum": 1, "val_split": 0.1, "test_split": 0.2, "standardize": False,
    "early_stopping": None, "monitor": "val_loss", "checkpoint_every": None, "tensorboard": False,
    "export_keras": False, "freeze": None, "phases": None, "init_from": None,
    "output_dir": None, "resume": None, "seed": 0, "progress": True,
    "device": "auto", "mixed_precision": False, "xla": False, "timeout": None, "timeline": None,
    "cluster": None,
}


def parse_model_args(pairs):
    """``["channels=32", "kernel_sizes=5,3,3", "batchnorm=true"]`` -> dict of Python values.

    Values are Python literals (ints, floats, tuples, quoted strings); ``true``/``false`` are
    booleans; anything else stays a string. Nothing is evaluated beyond literals.
    """
    values = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg takes key=value (e.g. channels=32). Received: {pair!r}.")
        if text.lower() in ("true", "false"):
            values[key] = text.lower() == "true"
            continue
        try:
            values[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[key] = text
    return values


_PHASE_KEYS = ("epochs", "freeze", "lr", "schedule", "reset_optimizer")


def parse_phases(text):
    """``"epochs=5,freeze=conv*,lr=1e-3; epochs=10,lr=1e-4"`` -> a list of phase dicts.

    Phases are separated by ``;``, their fields by ``,``; ``freeze`` takes fnmatch patterns
    separated by ``|`` (empty: nothing frozen), ``lr`` and ``schedule`` default to ``--lr`` and
    ``--schedule``, ``reset_optimizer`` (true/false) to true. Returns JSON-safe dicts.
    """
    phases = []
    for number, chunk in enumerate((part.strip() for part in text.split(";")), 1):
        if not chunk:
            continue
        phase = {}
        for field in (f.strip() for f in chunk.split(",")):
            key, sep, value = field.partition("=")
            key = key.strip()
            if not sep or key not in _PHASE_KEYS:
                raise ValueError(f"--phases: phase {number} has {field!r}; a phase is key=value "
                                 f"fields separated by commas, keys {list(_PHASE_KEYS)}, e.g. "
                                 "'epochs=5,freeze=conv*,lr=1e-3; epochs=10,lr=1e-4'.")
            value = value.strip()
            try:
                if key == "epochs":
                    phase[key] = int(value)
                elif key == "lr":
                    phase[key] = float(value)
                elif key == "freeze":
                    phase[key] = [p.strip() for p in value.split("|") if p.strip()]
                elif key == "reset_optimizer":
                    if value.lower() not in ("true", "false"):
                        raise ValueError(value)
                    phase[key] = value.lower() == "true"
                else:
                    phase[key] = value
            except ValueError:
                raise ValueError(f"--phases: phase {number}: {key}={value!r} is not valid (epochs "
                                 "is an int, lr a number, reset_optimizer true or false).") \
                    from None
        if "epochs" not in phase:
            raise ValueError(f"--phases: phase {number} ({chunk!r}) names no epochs=N.")
        phases.append(phase)
    if not phases:
        raise ValueError(f"--phases names no phase. Received: {text!r}.")
    return phases


def build_phases(config):
    """The trainer's phase plan for ``config["phases"]`` (each phase's schedule built from the
    run's schedule options over the phase's epochs at its rate), or None."""
    if not config.get("phases"):
        return None
    plan = []
    for phase in config["phases"]:
        rate = phase.get("lr", config["lr"])
        schedule = build_schedule({**config, "lr": rate, "epochs": phase["epochs"],
                                   "schedule": phase.get("schedule", config["schedule"])})
        plan.append(dict(epochs=phase["epochs"], freeze=phase.get("freeze", []),
                         learning_rate=rate, schedule=schedule,
                         reset_optimizer=phase.get("reset_optimizer", True)))
    return plan


def build_model(name, model_args, feature_shape, num_classes):
    """Build a registered model, filling the arguments the data determines.

    ``input_shape``, ``input_dim`` and ``num_classes`` come from the data unless given; for
    ``mlp``, ``hidden=256,128`` gives ``sizes=(features, 256, 128, classes)`` (default hidden 256).
    Returns ``(model, resolved_args)``; the args are what ``models.get_model(name, **args)`` takes.
    """
    from models import get_model, model_signature
    parameters = model_signature(name).parameters
    args = {key: tuple(v) if isinstance(v, list) else v for key, v in dict(model_args).items()}
    feature_shape = tuple(int(d) for d in feature_shape)
    if "input_shape" in parameters:
        args.setdefault("input_shape", feature_shape)
    if "input_dim" in parameters or "sizes" in parameters:
        if len(feature_shape) != 1:
            raise ValueError(f"model {name!r} takes 1-D feature vectors; the data has examples of "
                             f"shape {feature_shape}. Use --model cnn1d, or flatten the features.")
    if "input_dim" in parameters:
        args.setdefault("input_dim", feature_shape[0])
    if "num_classes" in parameters:
        args.setdefault("num_classes", num_classes)
    if "sizes" in parameters and "sizes" not in args:
        hidden = args.pop("hidden", (256,))
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        args["sizes"] = (feature_shape[0],) + hidden + (num_classes,)
    return get_model(name, **args), args


def build_loss(config):
    """The loss object (or None: plain cross-entropy) the configuration asks for."""
    from engine.training.trainer import make_loss
    if config["loss"] not in ("ce", "focal"):
        raise ValueError(f"loss must be 'ce' or 'focal'. Received: {config['loss']!r}.")
    if config["class_weights"] not in (None, "balanced"):
        raise ValueError(f"class_weights must be 'balanced' or absent. Received: "
                         f"{config['class_weights']!r}.")
    return make_loss(config["loss"], label_smoothing=config["label_smoothing"],
                     class_weight=config["class_weights"], gamma=config["focal_gamma"],
                     alpha=config["focal_alpha"])


def build_schedule(config):
    return make_schedule(config["schedule"], config["lr"], epochs=config["epochs"],
                         warmup_epochs=config["warmup_epochs"], step_epochs=config["step_epochs"],
                         factor=config["lr_factor"], patience=config["plateau_patience"],
                         monitor=config["monitor"], min_learning_rate=config["min_lr"])


def build_callbacks(config, output_dir):
    """EarlyStopping, periodic checkpoints and TensorBoard as configured (the trainer adds the
    CSV log, last/best checkpoints and the progress bar itself)."""
    from engine.training.callbacks import EarlyStopping, ModelCheckpoint, TensorBoard
    callbacks = []
    if config["early_stopping"]:
        callbacks.append(EarlyStopping(monitor=config["monitor"], patience=config["early_stopping"],
                                       restore_best_weights=True))
    if config["checkpoint_every"]:
        callbacks.append(ModelCheckpoint(
            os.path.join(output_dir, "checkpoints", "epoch_{epoch:04d}.h5"),
            every_n_epochs=config["checkpoint_every"]))
    if config["tensorboard"]:
        callbacks.append(TensorBoard(os.path.join(output_dir, "tensorboard")))
    return callbacks


def default_output_dir(config):
    return os.path.join("runs", f"{config['model']}-{time.strftime('%Y%m%d-%H%M%S')}")


def to_json(value):
    """Make a configuration value JSON-safe (tuples to lists, NaN/inf to None)."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
