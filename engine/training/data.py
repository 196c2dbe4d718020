"""Bundled data sets."""
import hashlib
import json
import os
import tempfile
import zipfile

import numpy as np

_CACHE_ENV = "ENGINE_CACHE_DIR"
_MNIST1D_DTYPES = {"x": np.float32, "y": np.int64, "x_test": np.float32, "y_test": np.int64}


def cache_directory():
    """Where generated data sets are kept: ``$ENGINE_CACHE_DIR`` if set (an empty value turns the
    cache off: returns None), else ``$XDG_CACHE_HOME/engine``, else ``~/.cache/engine``."""
    configured = os.environ.get(_CACHE_ENV)
    if configured is not None:
        return configured or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "engine")


def load_mnist1d(seed=None):
    """MNIST-1D (Greydanus & Kobak), generated offline: 4,000 training and 1,000 test examples.

    Uses ``mnist1d``'s ``make_dataset(get_dataset_args())`` (never its downloading path), so it
    needs no network. Generating takes seconds (longer than the demo's training on two cores), so
    the arrays are kept in :func:`cache_directory` under a name made of mnist1d's version and the
    generator's arguments; a missing, unreadable or mismatching file is generated again, and a
    directory that cannot be written just means no cache. Returns ``(x_train, y_train, x_test,
    y_test)``: float32 features of length 40 and int64 labels in [0, 10).
    """
    from mnist1d.data import get_dataset_args
    args = get_dataset_args()
    if seed is not None:
        args.seed = seed
    path = _mnist1d_cache_path(args)
    data = _read_cached(path) if path else None
    if data is None:
        from mnist1d.data import make_dataset
        generated = make_dataset(args)
        data = {key: generated[key].astype(dtype) for key, dtype in _MNIST1D_DTYPES.items()}
        if path:
            _write_cached(path, data)
    return tuple(data[key] for key in _MNIST1D_DTYPES)


def _mnist1d_cache_path(args):
    directory = cache_directory()
    if directory is None:
        return None
    from importlib.metadata import PackageNotFoundError, version
    try:
        generator = version("mnist1d")
    except PackageNotFoundError:
        generator = "unknown"
    settings = json.dumps(vars(args), sort_keys=True, default=repr)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:16]
    return os.path.join(directory, f"mnist1d-{generator}-{digest}.npz")


def _read_cached(path):
    """The arrays in ``path``, or None when the file is missing or not a complete cache file."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            data = {key: stored[key] for key in _MNIST1D_DTYPES}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if any(data[key].dtype != dtype for key, dtype in _MNIST1D_DTYPES.items()) or \
            len(data["x"]) != len(data["y"]) or len(data["x_test"]) != len(data["y_test"]):
        return None
    return data


def _write_cached(path, data):
    """Write atomically (a temporary file renamed into place), so a reader never sees half a file;
    failing to write only costs the next call the generation time."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **data)
        os.replace(temporary, path)
    except OSError:
        pass
    finally:  # whatever failed, no temporary file is left behind
        if os.path.exists(temporary):
            os.unlink(temporary)
