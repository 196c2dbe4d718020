"""NetworkState: a network's trainable ``weights`` and non-trainable ``theta`` in one float32 buffer.

The whole state lives in one contiguous float32 vector: every weight first, in insertion order, then
every theta entry. ``weights`` and ``theta`` are dicts of *views* into that vector, so a model reads
them as ordinary arrays while the engine copies, averages and ships the state as one block of memory
(a single memcpy into shared memory, a single kernel call to average).
"""
import functools
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from engine.core.hdf5_checks import (DAMAGED_FILE_ERRORS, check_total_storage, checked_child,
                                     checked_dataset, json_attribute, write_checksummed)

FORMAT_NAME = "engine.NetworkState"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StateLayout:
    """Names, shapes and offsets of the arrays in a state's flat buffer (weights first, then theta)."""

    weight_shapes: tuple  # ((name, shape), ...) in buffer order
    theta_shapes: tuple

    @classmethod
    def from_arrays(cls, weights, theta):
        return cls(tuple((name, tuple(np.shape(a))) for name, a in weights.items()),
                   tuple((name, tuple(np.shape(a))) for name, a in theta.items()))

    # Counted once per layout (the fields are frozen): the owner asks on every call.
    @functools.cached_property
    def num_weights(self):
        """Number of trainable float32 values (the length of a gradient)."""
        return sum(math.prod(map(int, shape)) for _, shape in self.weight_shapes)

    @functools.cached_property
    def num_theta(self):
        return sum(math.prod(map(int, shape)) for _, shape in self.theta_shapes)

    @functools.cached_property
    def size(self):
        return self.num_weights + self.num_theta

    def views(self, buffer):
        """Return ``(weights, theta)`` dicts of views into ``buffer`` laid out by this layout."""
        weights, theta, offset = {}, {}, 0
        for entries, out in ((self.weight_shapes, weights), (self.theta_shapes, theta)):
            for name, shape in entries:
                count = math.prod(map(int, shape))
                out[name] = buffer[offset:offset + count].reshape(shape)
                offset += count
        return weights, theta

    def describe_mismatch(self, other):
        """A sentence naming the first difference between two layouts, or None if they are equal."""
        for kind, mine, theirs in (("weights", self.weight_shapes, other.weight_shapes),
                                   ("theta", self.theta_shapes, other.theta_shapes)):
            mine_d, theirs_d = dict(mine), dict(theirs)
            for name, shape in mine:
                if name not in theirs_d:
                    return f"{kind} key {name!r} (shape {shape}) is missing"
                if theirs_d[name] != shape:
                    return f"{kind} key {name!r}: expected shape {shape}, found {theirs_d[name]}"
            for name, shape in theirs:
                if name not in mine_d:
                    return f"unexpected {kind} key {name!r} (shape {shape})"
            if [n for n, _ in mine] != [n for n, _ in theirs]:
                return f"{kind} keys are in a different order"
        return None


def check_format(attrs, name, version, where):
    """Raise ValueError unless HDF5 ``attrs`` name format ``name`` at a version we can read."""
    if attrs.get("format") != name:
        raise ValueError(f"{where} is not a file of format {name!r} (its format attribute is "
                         f"{attrs.get('format')!r}).")
    found = int(attrs.get("format_version", -1))
    if found > version:
        raise ValueError(f"{where} has format_version {found}; this engine reads up to "
                         f"{version}. Upgrade the engine to load it.")


class NetworkState:
    """A network's trainable ``weights`` and non-trainable ``theta``, backed by one float32 buffer.

    Args:
        weights: dict of name -> array of trainable parameters (copied, cast to float32).
        theta: dict of name -> array of non-trainable values such as BatchNorm statistics.

    ``state.weights[name]`` and ``state.theta[name]`` are views into ``state.buffer``; writing to
    them changes the state. ``state.buffer[:layout.num_weights]`` is the trainable part.
    """

    def __init__(self, weights, theta=None):
        weights, theta = dict(weights), dict(theta or {})
        overlap = set(weights) & set(theta)
        if overlap:
            raise ValueError(f"a name cannot be both a weight and a theta entry. Received both for: "
                             f"{sorted(overlap)}. Rename one of them.")
        for kind, arrays in (("weights", weights), ("theta", theta)):
            for name, array in arrays.items():
                if not isinstance(name, str) or not name:
                    raise TypeError(f"{kind} keys must be non-empty strings. Received: {name!r}")
                if np.asarray(array).dtype == object:
                    raise TypeError(f"{kind}[{name!r}] must be a numeric array. Received dtype object.")
        self.layout = StateLayout.from_arrays(weights, theta)
        self.buffer = np.empty(self.layout.size, dtype=np.float32)
        self.weights, self.theta = self.layout.views(self.buffer)
        for source, target in ((weights, self.weights), (theta, self.theta)):
            for name, array in source.items():
                target[name][...] = array

    @classmethod
    def from_buffer(cls, layout, buffer):
        """Wrap an existing float32 vector (for example a shared-memory block) without copying it."""
        if buffer.dtype != np.float32 or buffer.ndim != 1 or buffer.size != layout.size:
            raise ValueError(f"buffer must be a 1-D float32 array of {layout.size} values. Received "
                             f"dtype={buffer.dtype}, shape={buffer.shape}.")
        state = cls.__new__(cls)
        state.layout, state.buffer = layout, buffer
        state.weights, state.theta = layout.views(buffer)
        return state

    @property
    def num_params(self):
        """Total number of values, trainable and non-trainable."""
        return self.layout.size

    @property
    def num_trainable(self):
        return self.layout.num_weights

    def copy(self):
        """A deep copy with its own buffer."""
        return NetworkState.from_buffer(self.layout, self.buffer.copy())

    def check_matches(self, other, what="state"):
        """Raise ValueError naming the key and both shapes if ``other`` is laid out differently."""
        problem = self.layout.describe_mismatch(other.layout)
        if problem:
            raise ValueError(f"{what} does not match the expected layout: {problem}. Build the state "
                             "with the same model (model.init_state) or load a checkpoint of it.")

    @staticmethod
    def average(states, weights=None):
        """Element-wise (optionally weighted) mean of states with the same layout, as a new state."""
        states = list(states)
        if not states:
            raise ValueError("average needs at least one state. Received an empty sequence.")
        for other in states[1:]:
            states[0].check_matches(other, "a state to average")
        coefficients = np.full(len(states), 1.0 / len(states)) if weights is None else (
            np.asarray(weights, dtype=np.float64) / np.sum(weights))
        total = np.zeros(states[0].layout.size, dtype=np.float64)
        for coefficient, state in zip(coefficients, states):
            total += coefficient * state.buffer
        return NetworkState.from_buffer(states[0].layout, total.astype(np.float32))

    def allclose(self, other, rtol=1e-5, atol=1e-6):
        self.check_matches(other)
        return bool(np.allclose(self.buffer, other.buffer, rtol=rtol, atol=atol))

    def __repr__(self):
        return (f"NetworkState({len(self.weights)} weight arrays, {len(self.theta)} theta arrays, "
                f"{self.num_params} values)")

    def save(self, path, metadata=None):
        """Write the state to an HDF5 file atomically (temporary file, fsync, rename).

        Args:
            path: destination file.
            metadata: optional JSON-serialisable dict stored beside the arrays.
        """
        import h5py
        path = os.fspath(path)
        temporary = f"{path}.tmp-{os.getpid()}"
        try:
            with h5py.File(temporary, "w") as f:
                f.attrs["format"] = FORMAT_NAME
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["metadata"] = json.dumps(metadata or {})
                for kind, arrays in (("weights", self.weights), ("theta", self.theta)):
                    group = f.create_group(kind)
                    group.attrs["names"] = json.dumps(list(arrays))
                    for index, (name, array) in enumerate(arrays.items()):
                        write_checksummed(group, str(index), array)
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    @classmethod
    def load(cls, path, return_metadata=False, layout=None):
        """Read a state written by :meth:`save`. Never executes code from the file.

        Every group, name list, dataset, shape and dtype is checked (against ``layout`` when
        given, and against the file's real size) before any array is read.
        Args:
            path: the HDF5 file. return_metadata: also return the metadata dict.
            layout: the StateLayout the state must have (e.g. ``model.init_state(0).layout``).
        Returns:
            the NetworkState, or ``(state, metadata)``.
        Raises:
            ValueError: one line naming the file and what is wrong with it.
        """
        import h5py
        path = os.fspath(path)
        try:
            f = h5py.File(path, "r")
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {path!r} as an HDF5 state file: {error}") from None
        where = repr(path)
        try:
            with f:
                check_format(f.attrs, FORMAT_NAME, FORMAT_VERSION, where)
                metadata = json_attribute(f.attrs, "metadata", where, default={})
                datasets = {kind: _named_datasets(f, kind, where, os.path.getsize(path))
                            for kind in ("weights", "theta")}
                found = StateLayout(*(tuple((name, tuple(d.shape)) for name, d in
                                            datasets[kind].items())
                                      for kind in ("weights", "theta")))
                problem = None if layout is None else layout.describe_mismatch(found)
                if problem:
                    raise ValueError(f"the state in {where} does not match the expected layout: "
                                     f"{problem}. Load a checkpoint of this model, or build the "
                                     "model that wrote it.")
                arrays = {kind: {name: d[()] for name, d in named.items()}
                          for kind, named in datasets.items()}
        except DAMAGED_FILE_ERRORS as error:  # a truncated or damaged file
            raise ValueError(f"cannot read {where}: it is damaged ({error})") from None
        state = cls(arrays["weights"], arrays["theta"])
        return (state, metadata) if return_metadata else state


def _named_datasets(f, kind, where, file_size):
    """``{name: dataset}`` of group ``kind``, checked; datasets are named by index (see save)."""
    group = checked_child(f, kind, where, "group")
    names = json_attribute(group.attrs, "names", f"{where} ({kind})", kind=list)
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{where}: the {kind} names must be distinct non-empty strings.")
    members = set(group.keys())
    if members != {str(i) for i in range(len(names))}:
        raise ValueError(f"{where}: the {kind} group lists {len(names)} names but holds "
                         f"{len(members)} arrays; the file is damaged or was edited.")
    named = {name: checked_child(group, str(i), where) for i, name in enumerate(names)}
    for dataset in named.values():
        checked_dataset(dataset, where, file_size)
    check_total_storage(named.values(), where, file_size)
    return named
