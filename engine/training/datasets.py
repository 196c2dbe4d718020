"""Loading labelled data from files, checking it, splitting it, and reading it in chunks.

Formats (see :func:`load_dataset`): a folder with ``features.npy`` and ``labels.npy``
(memory-mapped, so data larger than RAM is read in chunks as training needs it), an ``.npz``
(keys ``x``/``y`` or ``x_train``/``y_train`` with optional ``x_test``/``y_test``; loaded into
memory, as zip members cannot be mapped), or an HDF5 file (dataset names as options; read lazily).

Features are any array-like with ``shape``, ``len`` and row indexing: a numpy array, an
``np.memmap``, an ``h5py.Dataset`` or a :class:`Subset` of one. :func:`take` reads rows from any of
them (in increasing order, which memory maps and HDF5 read fastest, then put back in the order
asked) as float32.
"""
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["DataError", "Dataset", "Feed", "Subset", "Standardizer", "load_dataset", "describe",
           "check_features",
           "check_labels", "as_labels", "check_every_class", "stratified_split", "take"]

_CHUNK_BYTES = 64 << 20  # rows are checked and reduced in chunks of about this many bytes


class DataError(ValueError):
    """Data that cannot be trained on; the message names the file (or array) and the problem."""


@dataclass
class Dataset:
    """Features and labels read from ``source``, with the file's own test split if it has one."""

    x: object
    y: np.ndarray
    source: str
    x_test: object = None
    y_test: np.ndarray = None
    class_names: list = None
    labels_source: str = None
    test_source: str = None


class Subset:
    """Rows ``indices`` of an array-like, without copying them (``take`` reads them on demand).

    ``name`` is what error messages call it (default: the file behind ``base``, if any)."""

    def __init__(self, base, indices, name=None):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.shape = (len(self.indices),) + tuple(base.shape[1:])
        self.dtype = base.dtype
        self.name = name or describe(base, None)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, rows):
        return take(self.base, self.indices[rows])


def describe(x, default):
    """How error messages name ``x``: its file for a memory map or HDF5 dataset, else default."""
    if isinstance(x, Subset):
        return x.name or default
    if isinstance(x, np.memmap) and getattr(x, "filename", None):
        return x.filename
    file = getattr(getattr(x, "file", None), "filename", None)  # h5py.Dataset
    return f"{file}[{x.name.lstrip('/')}]" if file else default


def take(x, rows):
    """Rows ``rows`` (an int array) of the array-like ``x`` as a float32 array, in that order."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(x, Subset):
        return take(x.base, x.indices[rows])
    if type(x) is np.ndarray:
        return np.asarray(x[rows], dtype=np.float32)
    # Memory maps and HDF5 read fastest (HDF5 only) in increasing order, without repeats.
    unique, inverse = np.unique(rows, return_inverse=True)
    block = np.asarray(x[unique] if len(unique) else x[0:0], dtype=np.float32)
    return block[inverse]


def row_chunks(x, rows=None):
    """Yield ``(start, stop)`` row ranges of about 64 MiB of ``x``'s features (``rows``: count)."""
    count = len(x) if rows is None else rows
    per_row = max(1, int(np.prod(x.shape[1:])) * 4)
    step = max(1, _CHUNK_BYTES // per_row)
    for start in range(0, count, step):
        yield start, min(count, start + step)


def load_dataset(path, *, x_key=None, y_key=None):
    """Load features and labels from a folder, an ``.npz`` or an HDF5 file.

    Args:
        path: a folder holding ``features.npy`` and ``labels.npy`` (optionally ``test_features.npy``
            and ``test_labels.npy``, and ``class_names.txt`` with one name per line), a ``.npz``
            file, or an HDF5 file (``.h5``/``.hdf5``).
        x_key, y_key: HDF5 dataset names (default ``"x"``/``"y"``, or ``"features"``/``"labels"``
            when those exist); the test split is read from ``x_test``/``y_test`` when present.
    Returns:
        a :class:`Dataset`.
    Raises:
        FileNotFoundError: missing path or files. DataError: unreadable or inconsistent contents.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path {path!r} does not exist. Give a folder with "
                                "features.npy and labels.npy, an .npz file or an HDF5 file.")
    if os.path.isdir(path):
        return _load_folder(path)
    if path.endswith(".npz"):
        return _load_npz(path)
    if path.endswith((".h5", ".hdf5", ".hdf")):
        return _load_hdf5(path, x_key, y_key)
    raise DataError(f"{path!r}: unknown data format. Use a folder with features.npy and "
                    "labels.npy, an .npz file, or an .h5/.hdf5 file.")


def _load_folder(path):
    def npy(name, required=True):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            if required:
                raise FileNotFoundError(f"{file!r} does not exist: a data folder holds "
                                        "features.npy and labels.npy.")
            return None
        try:
            return np.load(file, mmap_mode="r", allow_pickle=False)
        except ValueError as error:
            raise DataError(f"{file!r}: cannot read it as a numeric .npy array "
                            f"({error}).") from None

    names_file = os.path.join(path, "class_names.txt")
    names = None
    if os.path.exists(names_file):
        with open(names_file, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    x_test, y_test = npy("test_features.npy", False), npy("test_labels.npy", False)
    if (x_test is None) != (y_test is None):
        raise DataError(f"{path!r} has only one of test_features.npy and test_labels.npy.")
    labels = as_labels(npy("labels.npy"), os.path.join(path, "labels.npy"))
    if y_test is not None:
        y_test = as_labels(y_test, os.path.join(path, "test_labels.npy"))
    return Dataset(npy("features.npy"), labels, os.path.join(path, "features.npy"), x_test, y_test,
                   names, os.path.join(path, "labels.npy"), os.path.join(path, "test_features.npy"))


def open_npz(path):
    """``np.load`` of an .npz archive (no pickles), or a DataError naming the file."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{path!r}: cannot read it as an .npz archive ({error}).") from None


def _load_npz(path):
    with open_npz(path) as archive:
        keys = set(archive.files)
        if {"x", "y"} <= keys:
            train = ("x", "y")
        elif {"x_train", "y_train"} <= keys:
            train = ("x_train", "y_train")
        else:
            raise DataError(f"{path!r} holds keys {sorted(keys)}; expected 'x' and 'y', or "
                            "'x_train' and 'y_train' (with optional 'x_test' and 'y_test').")
        if ("x_test" in keys) != ("y_test" in keys):
            raise DataError(f"{path!r} has only one of 'x_test' and 'y_test'.")
        try:
            arrays = {key: archive[key] for key in keys if key.startswith(("x", "y", "class"))}
        except ValueError as error:  # object arrays need pickle, which is refused
            raise DataError(f"{path!r}: {error}. Store numeric arrays only.") from None
    names = arrays.get("class_names")
    y_test = arrays.get("y_test")
    if y_test is not None:
        y_test = as_labels(y_test, f"{path}[y_test]")
    return Dataset(arrays[train[0]], as_labels(arrays[train[1]], f"{path}[{train[1]}]"),
                   f"{path}[{train[0]}]", arrays.get("x_test"), y_test,
                   None if names is None else [str(n) for n in names], f"{path}[{train[1]}]",
                   f"{path}[x_test]")


def _load_hdf5(path, x_key, y_key):
    import h5py
    from engine.core.hdf5_checks import DAMAGED_FILE_ERRORS
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"{path!r}: cannot read it as an HDF5 file ({error}).") from None
    try:
        return _hdf5_dataset(f, path, x_key, y_key)
    except DataError:
        f.close()
        raise
    except ValueError as error:  # a check of engine.core.hdf5_checks
        f.close()
        raise DataError(str(error)) from None
    except DAMAGED_FILE_ERRORS as error:
        f.close()
        raise DataError(f"{path!r}: cannot read it: the file is damaged ({error}).") from None


def _hdf5_dataset(f, path, x_key, y_key):
    import h5py
    from engine.core.hdf5_checks import check_total_storage, checked_child, checked_dataset
    if x_key is None:
        x_key, y_key = ("features", y_key or "labels") if "features" in f and "x" not in f else \
            ("x", y_key or "y")
    y_key = y_key or "y"
    for key in (x_key, y_key):
        if key not in f or not isinstance(f[key], h5py.Dataset):
            raise DataError(f"{path!r} has no dataset {key!r}. Its datasets: "
                            f"{sorted(k for k in f if isinstance(f[k], h5py.Dataset))}. Name them "
                            "with --x-key/--y-key (x_key=, y_key=).")
    test = "x_test" in f and "y_test" in f
    # Before reading anything: links out of the file, external or virtual storage, and declared
    # shapes the file cannot hold are refused (a crafted file of a few KB can declare terabytes).
    used, size = [], os.path.getsize(path)
    for key, kinds in ((x_key, "fiub"), (y_key, "fiu")) + (
            (("x_test", "fiub"), ("y_test", "fiu")) if test else ()):
        used.append(checked_child(f, key, repr(path)))
        checked_dataset(used[-1], repr(path), size, kinds)
    check_total_storage(used, repr(path), size)
    # The file stays open while the Dataset object is referenced: features are read lazily.
    return Dataset(f[x_key], as_labels(f[y_key][()], f"{path}[{y_key}]"), f"{path}[{x_key}]",
                   f["x_test"] if test else None,
                   as_labels(f["y_test"][()], f"{path}[y_test]") if test else None, None,
                   f"{path}[{y_key}]", f"{path}[x_test]")


def as_labels(values, source):
    """Labels as an in-memory int64 vector (8 bytes per example), or a DataError naming source."""
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[1] > 1:
        raise DataError(f"{source}: labels have shape {values.shape}; expected one integer class "
                        "per example. Convert one-hot labels with labels.argmax(axis=1).")
    values = values.reshape(len(values)) if values.ndim == 2 else values
    if values.ndim != 1:
        raise DataError(f"{source}: labels must be 1-D. Received shape {values.shape}.")
    if values.dtype.kind in "iu":
        return values.astype(np.int64, copy=False)
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (np.mod(values, 1) != 0))
        if len(bad) == 0:
            return values.astype(np.int64)
        raise DataError(f"{source}: labels must be integer class indices; label {bad[0]} is "
                        f"{values[bad[0]].item()!r}.")
    raise DataError(f"{source}: labels must be integer class indices. Received dtype "
                    f"{values.dtype}.")


def check_features(x, source, *, num_labels=None, finite=True):
    """Raise DataError unless ``x`` is real numeric, at least 2-D, with ``num_labels`` rows and
    (``finite``) no NaN or infinity, read in chunks of about 64 MiB."""
    shape = tuple(x.shape)
    if len(shape) < 2 or shape[0] == 0:
        raise DataError(f"{source}: features must have shape (examples, features...) with at least "
                        f"one example. Received shape {shape}.")
    if np.dtype(x.dtype).kind not in "fiub":
        raise DataError(f"{source}: features must be real numbers. Received dtype {x.dtype}.")
    if num_labels is not None and num_labels != shape[0]:
        raise DataError(f"{source}: {shape[0]} examples but {num_labels} labels. Each example "
                        "needs exactly one label.")
    if finite and np.dtype(x.dtype).kind == "f":
        for start, stop in row_chunks(x):
            block = np.asarray(x[start:stop])
            finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
            if not finite.all():
                row = start + int(np.argmin(finite))
                row = int(x.indices[row]) if isinstance(x, Subset) else row  # the file's row
                raise DataError(f"{source}: example {row} holds NaN or infinite values. Clean or "
                                "impute them before training.")


def check_labels(y, num_classes, source):
    """Raise DataError unless every label is in [0, num_classes)."""
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        bad = int(np.flatnonzero((y < 0) | (y >= num_classes))[0])
        raise DataError(f"{source}: labels must be class indices in [0, {num_classes}); label "
                        f"{bad} is {y[bad]}.")


def check_every_class(y, num_classes, source, split="training"):
    """Raise DataError if a class has no example in ``y`` (the training split)."""
    counts = np.bincount(y, minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        raise DataError(f"{source}: class(es) {missing.tolist()} have no example in the {split} "
                        f"split ({len(y)} examples, {num_classes} classes). Every class needs "
                        "at least one; check the labels or use a smaller validation/test fraction.")


def stratified_split(y, fraction, seed, source="data"):
    """Indices ``(kept, held_out)`` with ``fraction`` of the examples held out, every class in
    proportion (scikit-learn's ``train_test_split(stratify=y)``), reproducible from ``seed``."""
    from sklearn.model_selection import train_test_split
    indices = np.arange(len(y))
    if fraction <= 0:
        return indices, indices[:0]
    try:
        kept, held = train_test_split(indices, test_size=fraction, random_state=seed, stratify=y)
    except ValueError as error:
        raise DataError(f"{source}: cannot split off {fraction:.0%} stratified by class: {error}. "
                        "Every class needs at least 2 examples; use a smaller fraction or more "
                        "data.") from None
    return np.sort(kept), np.sort(held)


class Standardizer:
    """Per-feature ``(x - mean) / std`` with statistics of the training split (std 0 -> 1).

    Stored in checkpoints (``arrays``: ``standardize/mean`` and ``standardize/std``) and applied
    again at evaluation.
    """

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def fit(cls, x):
        """Statistics of every row of ``x``, accumulated in float64 chunk by chunk."""
        total = np.zeros(x.shape[1:], np.float64)
        squares = np.zeros(x.shape[1:], np.float64)
        for start, stop in row_chunks(x):
            block = take(x, np.arange(start, stop)).astype(np.float64)
            total += block.sum(axis=0)
            squares += np.square(block).sum(axis=0)
        mean = total / len(x)
        std = np.sqrt(np.maximum(squares / len(x) - mean ** 2, 0.0))
        return cls(mean, np.where(std > 1e-12, std, 1.0))

    def __call__(self, block):
        return ((block - self.mean) / self.std).astype(np.float32, copy=False)

    def arrays(self):
        return {"standardize/mean": self.mean, "standardize/std": self.std}

    @classmethod
    def from_arrays(cls, arrays):
        if "standardize/mean" not in arrays:
            return None
        return cls(arrays["standardize/mean"], arrays["standardize/std"])


class Feed:
    """Features and labels as the processor gets them: in memory when they fit ``limit_bytes``
    (standardized once), otherwise read (and standardized) segment by segment."""

    def __init__(self, x, y, standardizer, limit_bytes):
        self.y, self.source, self.standardizer = y, x, standardizer
        row_bytes = 4 * int(np.prod(x.shape[1:]))
        self.segment_rows = max(1, int(limit_bytes) // row_bytes)
        self.in_memory = len(y) * row_bytes <= limit_bytes
        self.x = None
        if self.in_memory:
            if type(x) is np.ndarray and standardizer is None:
                self.x = x  # run_parallel copies it into shared memory itself
            else:
                self.x = np.empty((len(y),) + tuple(x.shape[1:]), np.float32)
                for start, stop in row_chunks(x, len(y)):
                    self.x[start:stop] = self._read(np.arange(start, stop))

    def _read(self, rows):
        block = take(self.source, rows)
        return block if self.standardizer is None else self.standardizer(block)

    def segments(self, order, step_rows):
        """``(x, y)`` blocks of ``order``'s rows, each a multiple of ``step_rows`` but the last."""
        rows = max(step_rows, self.segment_rows // step_rows * step_rows)
        for start in range(0, len(order), rows):
            index = order[start:start + rows]
            yield self._read(index), self.y[index]
