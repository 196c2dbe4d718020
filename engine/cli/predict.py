"""``engine predict``: class probabilities of a trained checkpoint for every example of a file.

    python -m engine predict --checkpoint runs/cnn1d-.../model.h5 --data new.npy --output p.csv

The features are read from an ``.npy`` file, a folder with ``features.npy``, an ``.npz`` (key ``x``,
``x_test`` or ``features``) or an HDF5 file (``--x-key``, default ``x`` or ``features``); labels are
optional (when the file has them they are checked, and the accuracy is printed). The features get
the checks of ``train`` (real numbers, at least one example, no NaN or infinity, read in chunks)
and must have the model's input shape. Large files are read chunk by chunk (memory-mapped) and
predicted by every core; the output is a CSV (``example, predicted, [predicted_name,]
probability_<class>...``) or an ``.npz`` (``predicted``, ``probabilities``[, ``class_names``]).
"""
import csv
import os
import sys

import numpy as np

from engine.training.datasets import (DataError, as_labels, check_features, check_labels,
                                      open_npz, row_chunks, take)

__all__ = ["add_predict_command", "load_features", "run_predict"]


def add_predict_command(commands):
    """Register ``predict`` on the CLI's subparsers."""
    command = commands.add_parser(
        "predict", help="class probabilities of a checkpoint for every example of a file",
        description="Predict every example of --data with a checkpoint written by 'engine train' "
        "(its standardization applied) and write one row per example: the predicted class and "
        "the class probabilities, as CSV or .npz.")
    command.add_argument("--checkpoint", required=True, metavar="PATH",
                         help="model.h5 or checkpoints/*.h5 of a run")
    command.add_argument("--data", required=True, metavar="PATH", help="an .npy file, a folder "
                         "with features.npy (labels.npy optional), an .npz (x, x_test or "
                         "features) or an HDF5 file")
    command.add_argument("--output", required=True, metavar="FILE", help="predictions.csv or "
                         "predictions.npz")
    command.add_argument("--x-key", help="HDF5 dataset or .npz key of the features")
    command.add_argument("--workers", type=int, help="worker processes for large inputs "
                         "(default: every usable core; 1: this process only)")
    return command


def load_features(path, *, x_key=None):
    """Features (memory-mapped where the format allows), labels or None, class names or None.

    Returns:
        ``(x, y, source, class_names)``.
    Raises:
        FileNotFoundError: missing path. DataError: unreadable file or missing keys.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path {path!r} does not exist. Give an .npy file, a folder "
                                "with features.npy, an .npz file or an HDF5 file.")
    if os.path.isdir(path):
        names_file = os.path.join(path, "class_names.txt")
        names = None
        if os.path.exists(names_file):
            with open(names_file, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        x = _npy(os.path.join(path, "features.npy"))
        labels_file = os.path.join(path, "labels.npy")
        y = as_labels(_npy(labels_file), labels_file) if os.path.exists(labels_file) else None
        return x, y, os.path.join(path, "features.npy"), names
    if path.endswith(".npy"):
        return _npy(path), None, path, None
    if path.endswith(".npz"):
        return _npz(path, x_key)
    if path.endswith((".h5", ".hdf5", ".hdf")):
        return _hdf5(path, x_key)
    raise DataError(f"{path!r}: unknown data format. Use an .npy file, a folder with features.npy, "
                    "an .npz file or an .h5/.hdf5 file.")


def _npy(file):
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file!r} does not exist: a data folder holds features.npy.")
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise DataError(f"{file!r}: cannot read it as a numeric .npy array ({error}).") from None


def _npz(path, x_key):
    with open_npz(path) as archive:
        keys = set(archive.files)
        candidates = [x_key] if x_key else ["x", "x_test", "features"]
        found = next((key for key in candidates if key in keys), None)
        if found is None:
            raise DataError(f"{path!r} holds keys {sorted(keys)}; expected one of {candidates} for "
                            "the features (or name it with --x-key).")
        label_key = {"x": "y", "x_test": "y_test", "features": "labels"}.get(found)
        try:
            x = archive[found]
            y = archive[label_key] if label_key in keys else None
            names = archive["class_names"] if "class_names" in keys else None
        except ValueError as error:  # object arrays need pickle, which is refused
            raise DataError(f"{path!r}: {error}. Store numeric arrays only.") from None
    y = None if y is None else as_labels(y, f"{path}[{label_key}]")
    return x, y, f"{path}[{found}]", None if names is None else [str(n) for n in names]


def _hdf5(path, x_key):
    import h5py
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"{path!r}: cannot read it as an HDF5 file ({error}).") from None
    key = x_key or ("features" if "features" in f and "x" not in f else "x")
    if key not in f or not isinstance(f[key], h5py.Dataset):
        datasets = sorted(name for name in f if isinstance(f[name], h5py.Dataset))
        f.close()
        raise DataError(f"{path!r} has no dataset {key!r}. Its datasets: {datasets}; name the "
                        "features with --x-key.")
    label_key = {"x": "y", "features": "labels"}.get(key)
    y = as_labels(f[label_key][()], f"{path}[{label_key}]") if label_key and label_key in f \
        else None
    return f[key], y, f"{path}[{key}]", None


def run_predict(checkpoint_path, data, output, *, x_key=None, workers=None, out=None):
    """Predict every example of ``data`` with the checkpoint and write ``output`` (.csv or .npz).

    Returns:
        ``{"examples", "output", "accuracy" (None without labels)}``.
    Raises:
        ValueError (DataError) for bad data, shapes or output names; FileNotFoundError.
    """
    from engine.training.inference import Predictor, load_trained_model
    out = out or sys.stdout
    output = os.fspath(output)
    if not output.endswith((".csv", ".npz")):
        raise ValueError(f"--output must end in .csv or .npz. Received: {output!r}.")
    model, state, standardizer, metadata = load_trained_model(checkpoint_path)
    x, y, source, class_names = load_features(data, x_key=x_key)
    check_features(x, source, num_labels=None if y is None else len(y))
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise DataError(f"{source}: examples have shape {tuple(x.shape[1:])}, the model in "
                        f"{checkpoint_path} takes {tuple(model.input_shape)}.")
    if y is not None:
        check_labels(y, int(model.num_outputs), source)
    if class_names is not None and len(class_names) != model.num_outputs:
        class_names = None  # names of another labelling: columns by index instead
    probabilities = np.empty((len(x), int(model.num_outputs)), np.float32)
    with Predictor(model, state, standardizer=standardizer, num_processes=workers,
                   check_finite=False) as predictor:  # check_features read every row already
        for start, stop in row_chunks(x):
            probabilities[start:stop] = predictor(take(x, np.arange(start, stop)))
    predicted = probabilities.argmax(axis=1).astype(np.int64)
    _write(output, predicted, probabilities, class_names)
    accuracy = None if y is None else float(np.mean(predicted == y))
    scored = "" if accuracy is None else f"; accuracy {accuracy:.4f} against its labels"
    print(f"predicted {len(x)} examples of {source} with {metadata['model_name']}{scored}",
          file=out)
    print(f"predictions in {os.path.abspath(output)}", file=out)
    return {"examples": len(x), "output": os.path.abspath(output), "accuracy": accuracy}


def _write(output, predicted, probabilities, class_names):
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    temporary = f"{output}.partial-{os.getpid()}"
    try:
        if output.endswith(".npz"):
            arrays = {"predicted": predicted, "probabilities": probabilities}
            if class_names is not None:
                arrays["class_names"] = np.asarray(class_names, dtype=str)
            with open(temporary, "wb") as f:
                np.savez(f, **arrays)
        else:
            labels = class_names or [str(k) for k in range(probabilities.shape[1])]
            with open(temporary, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["example", "predicted"] + (["predicted_name"] if class_names
                                                            else [])
                                + [f"probability_{label}" for label in labels])
                for row, (klass, values) in enumerate(zip(predicted, probabilities)):
                    named = [class_names[klass]] if class_names else []
                    writer.writerow([row, int(klass)] + named + [f"{v:.7g}" for v in values])
        os.replace(temporary, output)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
