"""The arrays the processor and its workers share, and where each one sits in shared memory.

Two kinds of block, each described by a small picklable ``spec`` dict so that the owner and every
worker compute the same offsets:

* the **workspace** (one per processor and state layout): the canonical state ``params`` (two
  copies in ``sync="gradients"`` mode, with the optimizer state likewise: the update of global
  step t reads copy ``t % 2`` and writes copy ``(t + 1) % 2``, so an update cut short by a dying
  worker can be run again from intact inputs), one ``slots[i]`` per worker (gradients and new
  theta in ``gradients`` mode, the worker's local state in ``states`` mode), the averaged vector
  ``reduced`` (with frozen weights, slots and ``reduced`` of gradients mode hold only the compact
  trainable values: ``engine.core.sharding.TrainableMap``; frozen values are equal in every
  version of the state, and their optimizer entries are never touched), optimizer buffers, the pass plan's scalar fields (``control``), per-worker fields
  (``results``), and the barriers' arrival counters, doorbell and abort word;
* the **data** block (re-created only when a larger data set arrives): examples, labels,
  predictions, and the pass plan's arrays: the order in which a training pass visits the rows,
  the learning rate of every step, and per step and worker the records workers write (loss,
  examples, timings, sums of squares) and the owner reads once, at the end of the pass.

With ``shared=False`` the same arrays are ordinary numpy memory (the in-process mode).
"""
import numpy as np

from engine.parallel.shm import SharedBlock

# Pass plan fields (float64 array ``control``), written by the owner before it starts a pass.
(LEARNING_RATE, STEP, CLIP_NORM, SEED, NUM_STEPS, MICRO_BATCH, ROWS, PASS_KIND, BATCH_SIZE,
 SINCE_AVERAGE, END_AVERAGE, UPDATE_INTERVAL, REFRESH, ORDERED, CROSS_NODE, HOP_STOP, HOP_SCALE,
 NODE_RANK, NODE_COUNT) = range(19)
NUM_CONTROL = 24
TRAIN, EVALUATE = 0, 1                       # PASS_KIND
END_NONE, END_AVERAGE_STATES, END_MEAN_INTO_REDUCED = 0, 1, 2   # END_AVERAGE (states mode)
# Per-worker fields (float64 array ``results[i]``), written by worker i.
LOSS, COUNT, COMPUTE_S, SUM_SQUARES, PEAK_RSS, SINCE_SYNC, NON_FINITE, HEARTBEAT, WAITING, \
    DIRTY, CURRENT_STEP, STOP_STEP, WAIT_KIND, WAIT_ROUND, WAIT_ONLY = range(15)
NUM_RESULTS = 16
NOT_STOPPED = -1.0   # STOP_STEP: the pass ran to its end
DIRTY_UPDATE, DIRTY_REFRESH = 1.0, 2.0      # DIRTY: what a worker was writing into its slot
# Per step and worker records (float64 array ``records[step, i]``) in the data block.
# R_STARTED .. R_ENDED are perf_counter() stamps (CLOCK_MONOTONIC: one clock for every process):
# started, computed (barrier COMPUTED passed), reduced (own slice averaged), updated (own slice
# stepped), ended (barrier UPDATED passed).
(R_LOSS, R_COUNT, R_COMPUTE_S, R_SUM_SQUARES, R_NON_FINITE, R_STARTED, R_COMPUTED, R_REDUCED,
 R_UPDATED, R_ENDED) = range(10)
NUM_RECORDS = 12
# Barrier kinds (rows of ``arrivals``): see engine.parallel.barrier.
# NODE_DONE is written by the owner's cross-node thread (engine.parallel.cross_node) in slot 0.
COMPUTED, REDUCED, UPDATED, LOCAL_DONE, AVERAGE_IN, AVERAGE_OUT, EVALUATED, NODE_DONE = range(8)
NUM_BARRIERS = 8


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
        self._offsets = offsets
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

    def unmap(self, name):
        """Stop counting array ``name``'s pages in this process's RSS (shared blocks only; the
        values stay; see ``SharedBlock.unmap_pages``)."""
        if self.block is not None:
            offset, shape, dtype = self._offsets[name]
            self.block.unmap_pages(offset, int(np.prod(shape)) * np.dtype(dtype).itemsize)

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
                  optimizer_buffers, slot_values=None, weight_ranges=None):
        """``slot_values``: length of a worker's slot (default ``num_values``; the compact
        trainable values in gradients mode with frozen weights). ``weight_ranges``: buffer ranges
        of the trainable weights (default: all; see ``engine.core.sharding.TrainableMap``)."""
        return dict(num_values=num_values, num_weights=num_weights, num_workers=num_workers,
                    versions=versions, optimizer_copies=optimizer_copies,
                    optimizer_buffers=optimizer_buffers,
                    slot_values=num_values if slot_values is None else int(slot_values),
                    weight_ranges=((0, num_weights),) if weight_ranges is None else
                    tuple(tuple(r) for r in weight_ranges))

    @staticmethod
    def _fields(spec):
        p, w, n, versions = (spec["num_values"], spec["num_weights"], spec["num_workers"],
                             spec["versions"])
        return [("versions_of_params", (versions, p), np.float32),
                ("slots", (n, spec.get("slot_values", p)), np.float32),
                ("reduced", (spec.get("slot_values", p),), np.float32),
                ("versions_of_optimizer", (versions, spec["optimizer_copies"],
                                           spec["optimizer_buffers"], w), np.float32),
                ("control", (NUM_CONTROL,), np.float64),
                ("results", (n, NUM_RESULTS), np.float64),
                ("coefficients", (n,), np.float64),
                ("shard_bounds", (n + 1,), np.int64),
                ("state_bounds", (n + 1,), np.int64),
                ("arrivals", (NUM_BARRIERS, n, 8), np.int64),
                ("doorbell", (1,), np.int32),
                ("abort", (1,), np.int32)]


    def _version(self, ahead, step=None):
        """Index of the version current at global ``step`` (ahead=0) or of the next (ahead=1)."""
        step = int(self.control[STEP]) if step is None else step
        return (step + ahead) % self.spec["versions"]

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

    def params_at(self, step):
        """The state as it is before global step ``step``'s update."""
        return self.versions_of_params[self._version(0, step)]

    def optimizer_at(self, step):
        return self.versions_of_optimizer[self._version(0, step)]


class DataArrays(_Arrays):
    """Examples, labels and predictions for up to ``capacity`` rows."""

    def __init__(self, spec, shared=True, create=True):
        super().__init__(spec, "data", shared, create)

    @staticmethod
    def make_spec(capacity, feature_shape, num_outputs, batch_size, num_workers):
        return dict(capacity=int(capacity), feature_shape=tuple(feature_shape),
                    num_outputs=int(num_outputs), batch_size=int(batch_size),
                    num_workers=int(num_workers))

    @staticmethod
    def max_steps(spec):
        return -(-spec["capacity"] // spec["batch_size"])

    @classmethod
    def _fields(cls, spec):
        rows, steps = spec["capacity"], cls.max_steps(spec)
        return [("examples", (rows, *spec["feature_shape"]), np.float32),
                ("labels", (rows,), np.int64),
                ("predictions", (rows, spec["num_outputs"]), np.float32),
                ("order", (rows,), np.int64),
                ("step_learning_rates", (steps,), np.float64),
                ("records", (steps, spec["num_workers"], NUM_RECORDS), np.float64)]
