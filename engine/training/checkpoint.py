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

from engine.core.hdf5_checks import (DAMAGED_FILE_ERRORS, check_total_storage, checked_child,
                                     checked_dataset, json_attribute, write_checksummed)
from engine.core.state import NetworkState, check_format

FORMAT_NAME = "engine.Checkpoint"
FORMAT_VERSION = 1

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "check_resumable"]


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


def load_checkpoint(path, layout=None):
    """Read a checkpoint (or a plain NetworkState file, which has no training parts).

    Every group, name list, dataset, shape and dtype is checked before anything is read: against
    ``layout`` (a StateLayout, e.g. ``model.init_state(0).layout``) when given, and against the
    file's real size; external storage, virtual datasets and links out of the file are refused.
    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: one line naming the file and what is wrong (unreadable, damaged, crafted,
            another model's layout, or a newer format).
    """
    import h5py
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist.")
    state, metadata = NetworkState.load(path, return_metadata=True, layout=layout)
    checkpoint = Checkpoint(state=state, metadata=metadata)
    where, size = repr(path), os.path.getsize(path)
    try:
        with h5py.File(path, "r") as f:
            if "checkpoint" not in f:
                return checkpoint
            group = checked_child(f, "checkpoint", where, "group")
            check_format(group.attrs, FORMAT_NAME, FORMAT_VERSION,
                         f"{where} (its 'checkpoint' group)")
            checkpoint.trainer = json_attribute(group.attrs, "trainer", where, default={})
            if "processor" in group:
                processor = checked_child(group, "processor", where, "group")
                values = json_attribute(processor.attrs, "values", f"{where} (processor)")
                checkpoint.training_state = {**values, **_read_arrays(processor, where, size)}
            checkpoint.arrays = _read_arrays(checked_child(group, "arrays", where, "group"),
                                             where, size)
    except DAMAGED_FILE_ERRORS as error:  # a truncated or damaged file
        raise ValueError(f"cannot read {where}: it is damaged ({error})") from None
    return checkpoint


def check_resumable(checkpoint, path):
    """Raise ValueError naming ``path`` unless ``checkpoint`` holds everything a trainer's resume
    reads: the processor's optimizer state, step and shuffle stream, and the trainer's epoch and
    shuffle stream."""
    saved, progress, problems = checkpoint.trainer, checkpoint.training_state, []
    if not isinstance(progress.get("optimizer"), np.ndarray):
        problems.append("the optimizer state is missing")
    for key, kind in (("step", int), ("shuffle_rng", dict)):
        if not isinstance(progress.get(key), kind) or isinstance(progress.get(key), bool):
            problems.append(f"the processor's {key!r} is missing or not a JSON {kind.__name__}")
    epoch = saved.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        problems.append(f"'epoch' must be an int >= 0, found {epoch!r}")
    if not isinstance(saved.get("stream_rng"), dict):
        problems.append("'stream_rng' (the shuffle stream) is missing")
    for key in ("history", "schedule", "callbacks"):
        if not isinstance(saved.get(key, {}), dict):
            problems.append(f"{key!r} must be a JSON object")
    if problems:
        raise ValueError(f"{os.fspath(path)!r}: cannot resume from it: its training progress "
                         f"is incomplete or damaged ({'; '.join(problems)}).")


def _write_arrays(parent, name, arrays):
    group = parent.create_group(name)
    group.attrs["names"] = json.dumps(list(arrays))
    for index, array in enumerate(arrays.values()):
        write_checksummed(group, str(index), np.asarray(array))
    return group


def _read_arrays(group, where, file_size):
    """``{name: array}`` of a group written by _write_arrays, each dataset checked first."""
    names = json_attribute(group.attrs, "names", f"{where} ({group.name})", kind=list)
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{where}: the names of {group.name} must be distinct strings.")
    if set(group.keys()) != {str(i) for i in range(len(names))}:
        raise ValueError(f"{where}: {group.name} lists {len(names)} names but holds "
                         f"{len(group.keys())} arrays; the file is damaged or was edited.")
    datasets = [checked_child(group, str(i), where) for i in range(len(names))]
    for dataset in datasets:
        try:
            checked_dataset(dataset, where, file_size)
        except ValueError as error:
            if "dtype" in str(error):
                raise ValueError(f"{error} A checkpoint holds only numeric arrays.") from None
            raise
    check_total_storage(datasets, where, file_size)
    return {name: dataset[()] for name, dataset in zip(names, datasets)}


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
