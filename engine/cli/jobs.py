"""What the ``train`` and ``evaluate`` commands do, callable without the command line (``info``:
engine.cli.system_report).

    results = run_train({**DEFAULTS, "data": "my_data/", "epochs": 20, "output_dir": "runs/a"})
    results = run_evaluate("runs/a/model.h5")

Splits are reproducible: the test split (when the data has none of its own) and then the
validation split are drawn stratified by class from the run's seed, so ``evaluate`` finds the
same test examples from the configuration stored in the checkpoint.
"""
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np

from engine.training.callbacks import Callback
from engine.training.checkpoint import load_checkpoint
from engine.cli.config import (build_callbacks, build_loss, build_model, build_phases,
                           build_schedule, default_output_dir, to_json)
from engine.training.datasets import (DataError, Dataset, Standardizer, Subset, check_every_class,
                             check_features, check_labels, load_dataset, stratified_split)
from engine.cli.reports import write_report
from engine.cli.system_report import blas_kernel_warning
from engine.parallel.system import usable_cores
from engine.training.run_folder import check_run_folder, hold_run_folder, run_folder_of
from engine.training.trainer import Trainer, evaluate

__all__ = ["prepare_data", "run_train", "run_evaluate"]

MNIST1D = "MNIST-1D (bundled)"


@dataclass
class PreparedData:
    """The splits of a run. ``x_*`` are Subsets (or arrays), ``y_*`` int64 labels."""

    x_train: object
    y_train: np.ndarray
    x_val: object
    y_val: np.ndarray
    x_test: object
    y_test: np.ndarray
    source: str
    num_classes: int
    feature_shape: tuple
    class_names: list = None


def _load(config):
    if config["data"] is None:
        from engine.training.data import load_mnist1d
        x, y, x_test, y_test = load_mnist1d()
        return Dataset(x, y, MNIST1D, x_test, y_test, None, MNIST1D, MNIST1D + " test")
    return load_dataset(config["data"], x_key=config["x_key"], y_key=config["y_key"])


def prepare_data(config, *, check_training=True):
    """Load the configured data, check it, and split it into train / validation / test.

    Raises DataError (a ValueError) or FileNotFoundError naming the file and the problem.
    """
    data = _load(config)
    check_features(data.x, data.source, num_labels=len(data.y))
    labels = [data.y] + ([data.y_test] if data.y_test is not None else [])
    num_classes = int(config["model_args"].get("num_classes") or
                      1 + max(int(y.max()) for y in labels if len(y)))
    if num_classes < 2:
        raise DataError(f"{data.labels_source or data.source}: all labels are 0; a classifier "
                        "needs at least 2 classes.")
    check_labels(data.y, num_classes, data.labels_source or data.source)
    if data.x_test is not None:
        x_test, y_test = data.x_test, data.y_test
        check_features(x_test, data.test_source, num_labels=len(y_test))
        check_labels(y_test, num_classes, data.test_source)
        rest = np.arange(len(data.y))
    else:
        if not 0 < config["test_split"] < 1:
            raise ValueError(f"{data.source} has no test split of its own, so test_split must be "
                             f"in (0, 1). Received: {config['test_split']!r}.")
        rest, held = stratified_split(data.y, config["test_split"], config["seed"], data.source)
        x_test, y_test = Subset(data.x, held, data.source + " (test split)"), data.y[held]
    if not 0 <= config["val_split"] < 1:
        raise ValueError(f"val_split must be in [0, 1). Received: {config['val_split']!r}.")
    kept, held = stratified_split(data.y[rest], config["val_split"], config["seed"], data.source)
    train, val = rest[kept], rest[held]
    x_train = Subset(data.x, train, data.source)
    x_val = Subset(data.x, val, data.source + " (validation split)") if len(val) else None
    if check_training:
        check_every_class(data.y[train], num_classes, data.source)
    return PreparedData(x_train, data.y[train], x_val, data.y[val] if len(val) else None, x_test,
                        y_test, data.source, num_classes, tuple(data.x.shape[1:]),
                        data.class_names)


def _run_folder(config):
    """Where the run writes: a resumed run continues in the folder holding its checkpoint."""
    if not config["resume"]:
        return config["output_dir"] or default_output_dir(config)
    folder = run_folder_of(config["resume"])
    given = config["output_dir"]
    if given is not None and os.path.realpath(given) != os.path.realpath(folder):
        raise ValueError(f"a resumed run continues in the folder of its checkpoint, {folder}; "
                         f"--output-dir {given} names another. Drop --output-dir, or copy the run "
                         "folder there and resume from the copy's checkpoints/last.h5.")
    return folder


class _WriteConfig(Callback):
    """Writes config.json when training begins: after a resume has been validated and restored,
    so a resume that fails leaves the run's files as they were."""

    def __init__(self, path, config):
        self.path, self.config = path, config

    def on_train_begin(self, logs=None):
        with open(self.path, "w") as f:
            json.dump(self.config, f, indent=2)


def _timeline_path(config, output_dir):
    path = config.get("timeline")
    if not path:
        return None
    return path if os.path.isabs(path) else os.path.join(output_dir, path)


def _timeout(config):
    value = config.get("timeout")
    if value is None:
        return "auto"
    if value < 0:
        raise ValueError(f"timeout must be a number of seconds > 0, or 0 to turn hang detection "
                         f"off. Received: --timeout {value}.")
    return None if value == 0 else float(value)


def run_train(config, *, out=None):
    """Train as ``config`` says (see engine.cli.config.DEFAULTS) and write the results folder.

    The folder is held exclusively for the whole run; one that already holds a run is refused
    unless ``config["overwrite"]`` or it is the run being resumed (engine.training.run_folder).
    Returns the metrics written to results.json.
    """
    out = out or sys.stdout
    config = dict(config)
    if config.get("phases") and config.get("freeze"):
        raise ValueError("--freeze and --phases do not combine: give each phase its frozen "
                         "weights (e.g. --phases 'epochs=5,freeze=conv*; epochs=10').")
    if config.get("phases") and config.get("epochs") is None:  # every phase's epochs
        config["epochs"] = sum(int(phase["epochs"]) for phase in config["phases"])
    config["output_dir"] = output_dir = _run_folder(config)
    if config["resume"]:
        done = load_checkpoint(config["resume"]).trainer.get("epoch", 0)
        if done >= config["epochs"]:
            raise ValueError(f"{config['resume']} has already trained {done} epochs: pass --epochs "
                             f"above {done} to continue, or use 'engine evaluate' to report on it.")
    cluster = _join_cluster(config)
    if cluster is not None and not cluster.is_root:
        return _train_on_other_rank(config, cluster)
    folder = dict(resuming=bool(config["resume"]), overwrite=config.get("overwrite", False))
    check_run_folder(output_dir, **folder)  # a busy or occupied folder fails before data is read
    trainer, data, model, model_args = _build(config, output_dir, cluster)
    _warn_if_blas_is_held_back(config["model"])
    if config.get("export_keras"):
        _check_keras_export(model, config["model"])
    with hold_run_folder(output_dir, **folder):
        return _train_in(output_dir, config, data, model, model_args, trainer, out)


def _warn_if_blas_is_held_back(model_name):
    """A native model's speed is numpy's BLAS: say so once when OPENBLAS_CORETYPE holds it below
    the CPU (a Keras model runs TensorFlow's oneDNN, which the variable does not touch)."""
    if str(model_name).startswith("keras:"):
        return
    message = blas_kernel_warning()
    if message:
        warnings.warn(message, stacklevel=2)


def _check_keras_export(model, name):
    """--export-keras needs TensorFlow and a model that converts (native layers or Keras)."""
    from engine.backends import tensorflow_available
    if not tensorflow_available():
        raise ValueError("--export-keras needs TensorFlow, which is not installed. Install it with "
                         "pip install -e .[tf], or train without --export-keras.")
    if not (callable(getattr(model, "to_keras", None)) or hasattr(model, "save_keras")):
        raise ValueError(f"--export-keras: model {name!r} ({type(model).__name__}) has no Keras "
                         "form (no to_keras). Use a model built from models.layers.")


def _join_cluster(config):
    """The Cluster of ``--cluster mpi`` (None on one machine)."""
    if not config.get("cluster"):
        return None
    from engine.parallel.cluster import make_cluster
    timeout = _timeout(config)
    return make_cluster(config["cluster"], timeout_s=None if timeout == "auto" else timeout)


def _train_on_other_rank(config, cluster):
    """A rank other than 0 runs the same data, steps and callbacks as rank 0 (early stopping
    must stop every rank alike) into a private folder that is removed, and prints nothing:
    rank 0 writes the run folder for every rank, whose states are the same."""
    with tempfile.TemporaryDirectory(prefix=f"engine_rank{cluster.rank}_") as scratch, \
            open(os.devnull, "w") as quiet:
        config = dict(config, output_dir=scratch, progress=False)
        trainer, data, model, model_args = _build(config, scratch, cluster)
        return _train_in(scratch, config, data, model, model_args, trainer, quiet)


def _build(config, output_dir, cluster=None):
    data = prepare_data(config)
    model, model_args = build_model(config["model"], config["model_args"], data.feature_shape,
                                    data.num_classes)
    trainer = Trainer(
        model, batch_size=config["batch_size"], num_processes=config["workers"],
        sync=config["sync"], update_interval=config["update_interval"],
        optimizer=config["optimizer"], learning_rate=config["lr"],
        schedule=build_schedule(config), loss=build_loss(config), clip_norm=config["clip_norm"],
        grad_accum=config["grad_accum"], callbacks=build_callbacks(config, output_dir),
        output_dir=output_dir, seed=config["seed"], standardize=config["standardize"],
        verbose=config["progress"], device=config["device"],
        mixed_precision=config["mixed_precision"], xla=config["xla"],
        timeout_s=_timeout(config), overwrite=config.get("overwrite", False),
        freeze=config.get("freeze"), phases=build_phases(config), cluster=cluster,
        timeline=_timeline_path(config, output_dir),
        metadata={"config": to_json(config), "model_name": config["model"],
                  "model_args": to_json(model_args)})
    return trainer, data, model, model_args


def _train_in(output_dir, config, data, model, model_args, trainer, out):
    resolved = {"model_args": model_args, "num_classes": data.num_classes,
                "feature_shape": data.feature_shape, "data_source": data.source,
                "examples": {"train": len(data.y_train), "validation": _count(data.y_val),
                             "test": len(data.y_test)},
                "num_processes": trainer.processor_options["num_processes"] or usable_cores()}
    trainer.callbacks.append(_WriteConfig(os.path.join(output_dir, "config.json"),
                                          to_json({**config, "resolved": resolved})))
    state_size = model.init_state(config["seed"]).num_params
    print(f"data: {data.source}: {len(data.y_train)} train / {_count(data.y_val)} validation / "
          f"{len(data.y_test)} test examples of shape {data.feature_shape}, {data.num_classes} "
          f"classes", file=out)
    print(f"model: {config['model']} {model_args} ({state_size:,} parameters); "
          f"{resolved['num_processes']} processes, batch {config['batch_size']}"
          f"{' x ' + str(config['grad_accum']) if config['grad_accum'] > 1 else ''}, "
          f"{config['optimizer']} lr {config['lr']} ({config['schedule']}), "
          f"{config['epochs']} epochs", file=out, flush=True)
    for number, phase in enumerate(config.get("phases") or (), 1):
        print(f"phase {number}: {phase['epochs']} epochs, lr {phase.get('lr', config['lr'])}, "
              f"frozen {phase.get('freeze') or 'nothing'}", file=out)
    if config.get("freeze"):
        print(f"frozen: {config['freeze']}", file=out)
    initial = None if config["resume"] or not config.get("init_from") else \
        _initial_state(model, config["init_from"], config["seed"], out)
    history = trainer.fit(data.x_train, data.y_train, epochs=config["epochs"],
                          validation_data=None if data.x_val is None else (data.x_val, data.y_val),
                          resume=config["resume"], check_data=False,  # prepare_data checked it
                          initial_state=initial)
    if hasattr(model, "save_keras"):  # a Keras model: also export the trained .keras file
        model.save_keras(history.state, os.path.join(output_dir, "model.keras"))
    test = trainer.evaluate(data.x_test, data.y_test)
    extra = {"split": "test", "loss": test["loss"], "checkpoint": "model.h5",
             "data": data.source, "model": config["model"], "epochs_trained": history.epoch[-1]
             if history.epoch else 0}
    results = write_report(output_dir, data.y_test, test["probabilities"], history=history,
                           class_names=data.class_names, extra=extra)
    if config.get("export_keras") and not hasattr(model, "save_keras"):
        # Last: importing TensorFlow in this process is safe only once no more workers will fork.
        model.to_keras(history.state).save(os.path.join(output_dir, "model.keras"))
    best = max(history.history.get("val_accuracy", [float("nan")]))
    print(f"trained {len(history.epoch) and history.epoch[-1]} epochs in "
          f"{sum(history.history.get('epoch_s', [])):.1f} s; best validation accuracy {best:.4f}",
          file=out)
    print(f"test accuracy {results['accuracy']:.4f} (loss {test['loss']:.4f}) on "
          f"{len(data.y_test)} examples", file=out)
    written = sorted(name for name in os.listdir(output_dir) if not name.startswith("."))
    print(f"results in {os.path.abspath(output_dir)}: {', '.join(written)}", file=out)
    return results


def _initial_state(model, path, seed, out):
    """--init-from: the model's initial state with every array of the same name and shape taken
    from the state or checkpoint at ``path`` (a pretrained base; a new head keeps its
    initialisation). Raises ValueError when nothing matches."""
    from engine.core.state import NetworkState
    source = NetworkState.load(path)
    state = model.init_state(seed)
    taken, kept = [], []
    for kind in ("weights", "theta"):
        given = getattr(source, kind)
        for name, array in getattr(state, kind).items():
            if name in given and given[name].shape == array.shape:
                array[...] = given[name]
                taken.append(name)
            else:
                kept.append(name)
    if not taken:
        raise ValueError(f"--init-from {path}: no array of it has a name and shape of this model "
                         f"(it has {list(source.weights)}; the model {list(state.weights)}). "
                         "Start from a checkpoint of the same architecture.")
    print(f"init from {path}: {len(taken)} arrays taken"
          + (f", {len(kept)} kept at their initialisation: {kept}" if kept else ""), file=out)
    return state


def run_evaluate(checkpoint_path, *, data=None, split="test", output_dir=None, workers=None,
                 out=None):
    """Evaluate a checkpoint written by ``train`` and write the report into ``output_dir``.

    ``data`` defaults to the run's own data; ``split`` is "test" (the run's test split), "val",
    "train" or "all" (every example of ``data``).
    """
    out = out or sys.stdout
    checkpoint = load_checkpoint(checkpoint_path)
    metadata = checkpoint.metadata
    if "config" not in metadata or "model_name" not in metadata:
        raise ValueError(f"{checkpoint_path!r} has no run configuration: evaluate needs a "
                         "checkpoint written by 'engine train' (model.h5 or checkpoints/*.h5).")
    if split not in ("test", "val", "train", "all"):
        raise ValueError(f"split must be test, val, train or all. Received: {split!r}.")
    config = dict(metadata["config"])
    if data is not None:
        config["data"] = data
    from models import get_model
    from models.losses import loss_from_config
    model = get_model(metadata["model_name"], **{key: tuple(v) if isinstance(v, list) else v
                                                 for key, v in metadata["model_args"].items()})
    if metadata.get("loss"):
        model = model.with_loss(loss_from_config(metadata["loss"]))
    if split == "all":  # every example of the file: no split to re-derive
        whole = _load(config)
        x, y, source, class_names = whole.x, whole.y, whole.source, whole.class_names
    else:
        try:
            prepared = prepare_data(config, check_training=False)
        except DataError as error:
            if data is None:
                raise
            raise DataError(f"{error} To evaluate every example of {data}, use --split all.") \
                from None
        x, y = {"test": (prepared.x_test, prepared.y_test), "val": (prepared.x_val,
                prepared.y_val), "train": (prepared.x_train, prepared.y_train)}[split]
        source, class_names = prepared.source, prepared.class_names
    if x is None:
        raise ValueError(f"the run has no {split} split (val_split was 0).")
    result = evaluate(model, checkpoint.state, x, y, num_processes=workers,
                      standardizer=Standardizer.from_arrays(checkpoint.arrays))
    if output_dir is None:
        output_dir = os.path.join(run_folder_of(checkpoint_path), "evaluation")
    history = checkpoint.trainer.get("history") or None
    results = write_report(output_dir, y, result["probabilities"], history=history,
                           class_names=class_names, title=split,
                           extra={"split": split, "loss": result["loss"], "data": source,
                                  "checkpoint": os.path.abspath(checkpoint_path),
                                  "model": metadata["model_name"]})
    print(f"{split} accuracy {results['accuracy']:.4f} (loss {result['loss']:.4f}) on {len(y)} "
          f"examples of {source}", file=out)
    print(f"report in {os.path.abspath(output_dir)}", file=out)
    return results


def _count(labels):
    return 0 if labels is None else len(labels)
