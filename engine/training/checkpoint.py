"""Training checkpoints: a NetworkState file plus everything a resumed run needs, in HDF5.

Layout (format ``engine.Checkpoint``, version 1). The file is first a valid ``NetworkState`` file
(``NetworkState.load(path)`` reads its weights, theta and metadata), with one extra group:

    /checkpoint                     attrs: format, format_version, trainer (JSON: epoch, history,
                                           schedule and callback states)
    /checkpoint/processor/<i>       ``ParallelBatchProcessor.training_state()``: its arrays (the
                                    optimizer buffers) as datasets, its other values (step count,
                                    shuffle RNG state) in the group's ``values`` JSON attribute
    /checkpoint/arrays/<i>          named float arrays (standardization statistics, the best state
                                    of EarlyStopping)
    Datasets are named by index; their names are in the group's ``names`` JSON attribute.

Only numeric datasets and JSON attributes are read back: loading never unpickles or evaluates
anything from the file. Writing is atomic: the whole file is written to a temporary name in the
same folder, flushed to disk, then renamed over the destination, so an exception or a crash
mid-write leaves the previous checkpoint intact.
"""
import json
import os
from dataclasses import dataclass, field

import numpy as np

from engine.core.state import NetworkState, check_format

FORMAT_NAME = "engine.Checkpoint"
FORMAT_VERSION = 1

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint"]


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        state: the NetworkState (weights and theta).
        metadata: the JSON metadata given at save time (the run's configuration).
        training_state: ``ParallelBatchProcessor.training_state()`` as saved, or None.
        trainer: JSON dict of the trainer (``epoch`` = epochs completed, ``history``, ...), or {}.
        arrays: dict of name -> float array.
    """

    state: NetworkState
    metadata: dict = field(default_factory=dict)
    training_state: dict = None
    trainer: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)


def save_checkpoint(path, state, *, metadata=None, training_state=None, trainer=None, arrays=None):
    """Write a checkpoint atomically (see the module docstring for the layout).

    Args:
        path: destination ``.h5`` file; its folder is created if missing.
        state: the NetworkState to store.
        metadata: JSON-serialisable dict (e.g. the run's configuration).
        training_state: ``processor.training_state()`` (optimizer buffers, step, shuffle RNG).
        trainer: JSON-serialisable dict of trainer progress.
        arrays: dict of name -> numeric array.
    """
    import h5py
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = f"{path}.partial-{os.getpid()}"
    try:
        # Serialise the JSON parts first: an unserialisable value fails before any file exists.
        trainer_json = json.dumps(trainer or {})
        processor_arrays = processor_json = None
        if training_state is not None:  # whatever the processor returns: arrays, then the rest
            processor_arrays = {k: v for k, v in training_state.items()
                                if isinstance(v, np.ndarray)}
            processor_json = json.dumps({k: v for k, v in training_state.items()
                                         if k not in processor_arrays})
        state.save(temporary, metadata=metadata)  # NetworkState's own layout, then ours beside it
        with h5py.File(temporary, "a") as f:
            group = f.create_group("checkpoint")
            group.attrs["format"] = FORMAT_NAME
            group.attrs["format_version"] = FORMAT_VERSION
            group.attrs["trainer"] = trainer_json
            if training_state is not None:
                processor = _write_arrays(group, "processor", processor_arrays)
                processor.attrs["values"] = processor_json
            _write_arrays(group, "arrays", dict(arrays or {}))
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
        _fsync_folder(folder)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def load_checkpoint(path):
    """Read a checkpoint (or a plain NetworkState file, which has no training parts).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is not a readable checkpoint, or was written by a newer format.
    """
    import h5py
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist.")
    state, metadata = NetworkState.load(path, return_metadata=True)
    checkpoint = Checkpoint(state=state, metadata=metadata)
    with h5py.File(path, "r") as f:
        if "checkpoint" not in f:
            return checkpoint
        group = f["checkpoint"]
        check_format(group.attrs, FORMAT_NAME, FORMAT_VERSION,
                     f"{path!r} (its 'checkpoint' group)")
        checkpoint.trainer = json.loads(group.attrs.get("trainer", "{}"))
        if "processor" in group:
            checkpoint.training_state = {**json.loads(group["processor"].attrs["values"]),
                                         **_read_arrays(group["processor"], path)}
        checkpoint.arrays = _read_arrays(group["arrays"], path)
    return checkpoint


def _write_arrays(parent, name, arrays):
    group = parent.create_group(name)
    group.attrs["names"] = json.dumps(list(arrays))
    for index, array in enumerate(arrays.values()):
        group.create_dataset(str(index), data=np.asarray(array))
    return group


def _read_arrays(group, path):
    names = json.loads(group.attrs["names"])
    return {name: _numeric(group[str(i)], path) for i, name in enumerate(names)}


def _numeric(dataset, path):
    if dataset.dtype.kind not in "fiu":
        raise ValueError(f"{path!r}: dataset {dataset.name} has dtype {dataset.dtype}; a "
                         "checkpoint holds only numeric arrays.")
    return dataset[()]


def _fsync_folder(folder):
    """Make the rename itself durable (POSIX); harmless where directories cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
