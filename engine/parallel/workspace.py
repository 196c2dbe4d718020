"""The arrays the processor and its workers share, and where each one sits in shared memory.

Two kinds of block, each described by a small picklable ``spec`` dict so that the owner and every
worker compute the same offsets:

* the **workspace** (one per processor and state layout): the canonical state ``params`` (two
  copies in ``sync="gradients"`` mode, with the optimizer state likewise: an update reads the
  current copy and writes the other, so an update cut short by a dying worker can be run again
  from intact inputs; the owner flips ``control[PARITY]`` once every worker has finished), one
  ``slots[i]`` per worker (gradients and new theta in ``gradients`` mode, the worker's local state
  in ``states`` mode), the averaged vector ``reduced``, optimizer buffers, and control arrays;
* the **data** block (re-created only when a larger dataset arrives): examples, labels and
  predictions, so that a worker's shard is a zero-copy slice.

With ``shared=False`` the same arrays are ordinary numpy memory (the in-process mode).
"""
import numpy as np

from engine.parallel.shm import SharedBlock

# Global control fields (float64 array ``control``), written by the owner before it signals an op.
LEARNING_RATE, STEP, SCALE, SEED, REFRESH, MICRO_BATCH, PARITY = range(7)
NUM_CONTROL = 8
# Per-worker result fields (float64 array ``results[i]``), written by worker i.
LOSS, COUNT, COMPUTE_S, SUM_SQUARES, PEAK_RSS, SINCE_SYNC, NON_FINITE = range(7)
NUM_RESULTS = 8


def _plan(fields):
    """Byte offsets for ``[(name, shape, dtype)]``, each aligned to 64 bytes; returns (offsets, size)."""
    offsets, cursor = {}, 0
    for name, shape, dtype in fields:
        cursor = -(-cursor // 64) * 64
        offsets[name] = (cursor, shape, dtype)
        cursor += int(np.prod(shape)) * np.dtype(dtype).itemsize
    return offsets, cursor


class _Arrays:
    """Arrays laid out by a spec in one block (shared) or in private memory."""

    def __init__(self, spec, purpose, shared, create):
        self.spec = dict(spec)
        offsets, size = _plan(self._fields(spec))
        self.block = None
        if shared:
            if create:
                self.block = SharedBlock.create(purpose, size)
                self.spec["block_name"] = self.block.name
            else:
                self.block = SharedBlock.attach(spec["block_name"], size)
        for name, (offset, shape, dtype) in offsets.items():
            if self.block is not None:
                array = self.block.array(shape, dtype, offset)
            else:
                array = np.zeros(shape, dtype)
            setattr(self, name, array)
        self._names = list(offsets)

    @classmethod
    def nbytes(cls, spec):
        """Bytes a block with this spec takes."""
        return _plan(cls._fields(spec))[1]

    def close(self):
        for name in self._names:
            setattr(self, name, None)
        if self.block is not None:
            self.block.close()


class Workspace(_Arrays):
    """State, per-worker slots, reduction target, optimizer buffers and control data."""

    def __init__(self, spec, shared=True, create=True):
        super().__init__(spec, "workspace", shared, create)

    @staticmethod
    def make_spec(num_values, num_weights, num_workers, versions, optimizer_copies,
                  optimizer_buffers):
        return dict(num_values=num_values, num_weights=num_weights, num_workers=num_workers,
                    versions=versions, optimizer_copies=optimizer_copies,
                    optimizer_buffers=optimizer_buffers)

    @staticmethod
    def _fields(spec):
        p, w, n, versions = (spec["num_values"], spec["num_weights"], spec["num_workers"],
                             spec["versions"])
        return [("versions_of_params", (versions, p), np.float32),
                ("slots", (n, p), np.float32),
                ("reduced", (p,), np.float32),
                ("versions_of_optimizer", (versions, spec["optimizer_copies"],
                                           spec["optimizer_buffers"], w), np.float32),
                ("control", (NUM_CONTROL,), np.float64),
                ("results", (n, NUM_RESULTS), np.float64),
                ("coefficients", (n,), np.float64),
                ("shard_bounds", (n + 1,), np.int64),
                ("state_bounds", (n + 1,), np.int64)]


    def _version(self, ahead):
        """Index of the current version (ahead=0) or of the next one (ahead=1)."""
        versions = self.spec["versions"]
        return (int(self.control[PARITY]) + ahead) % versions

    @property
    def params(self):
        """The current state (all weights, then theta)."""
        return self.versions_of_params[self._version(0)]

    @property
    def next_params(self):
        """Where an update writes (the current state itself when there is one version)."""
        return self.versions_of_params[self._version(1)]

    @property
    def optimizer(self):
        """Current optimizer state: (copies, buffers, num_weights)."""
        return self.versions_of_optimizer[self._version(0)]

    @property
    def next_optimizer(self):
        return self.versions_of_optimizer[self._version(1)]

    @property
    def averaged(self):
        """Where the weighted mean of the slots is: ``reduced``, or with a single worker its slot
        itself (averaging one slot would only copy it)."""
        return self.slots[0] if len(self.slots) == 1 else self.reduced

    def flip(self):
        """Make the freshly written version current (after every worker finished its update)."""
        self.control[PARITY] = self._version(1)


class DataArrays(_Arrays):
    """Examples, labels and predictions for up to ``capacity`` rows."""

    def __init__(self, spec, shared=True, create=True):
        super().__init__(spec, "data", shared, create)

    @staticmethod
    def make_spec(capacity, feature_shape, num_outputs):
        return dict(capacity=int(capacity), feature_shape=tuple(feature_shape),
                    num_outputs=int(num_outputs))

    @staticmethod
    def _fields(spec):
        rows = spec["capacity"]
        return [("examples", (rows, *spec["feature_shape"]), np.float32),
                ("labels", (rows,), np.int64),
                ("predictions", (rows, spec["num_outputs"]), np.float32)]
