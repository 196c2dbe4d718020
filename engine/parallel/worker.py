"""What a worker does in a pass: the protocol, the pipe messages that carry it, and the core.

Protocol (one pipe each way per worker; nothing is pickled on the hot path)
--------------------------------------------------------------------------
* The owner writes a pass's whole plan into shared memory (``engine.parallel.workspace``: step
  count, the order of the rows, every step's learning rate, clipping, micro-batch), then sends
  one byte, ``RUN_PASS``, to every worker, and sleeps on the answer pipes and process sentinels.
* The workers run every step of the pass by themselves, meeting at shared-memory barriers
  (``engine.parallel.barrier``). ``sync="gradients"``, step k: compute the shard's gradient into
  the own slot -> barrier COMPUTED -> weighted mean of every slot over the own slice into
  ``reduced`` and the optimizer update of that slice into the *next* version of the state ->
  barrier UPDATED -> step k+1 (with clipping, a barrier REDUCED between the mean and the update,
  for the global norm). ``sync="states"``: local steps with no barrier; every ``update_interval``
  steps AVERAGE_IN -> mean of the local states over the own slice into ``params`` -> AVERAGE_OUT
  -> copy ``params`` into the own slot.
* Every worker decides from the same shared records, so all stop at the same step when a loss,
  a gradient or an updated parameter is not finite (``results[i, STOP_STEP]``).
* At the end of the pass each worker answers one byte, ``OK`` (or ``FAILED`` and its traceback).
  The pipe's write/read pair orders memory for the owner's reads.

Recovery: a worker's arrival counters are its progress record. A replacement for a dead or hung
worker (started by ``engine.parallel.pool``) gets the same ``RUN_PASS`` and resumes exactly after
the last phase its predecessor recorded: inputs of every phase are intact (slots are rewritten
only after the barrier that follows their use; updates write the next version of the state), so
in gradients mode the pass ends bitwise as without the fault. In states mode a predecessor that
died while writing its local state in place (``DIRTY``) is restarted from the last average with
fresh optimizer state; otherwise it too resumes exactly.

Where it lives: this module holds the pipe messages and ``WorkerCore`` (what every pass shares,
and evaluation); the two training passes are mixins of the core in ``worker_gradients`` and
``worker_states``, and the process around the core (entry, command loop, owner watch) is in
``worker_process``.
"""
import os
import resource
import time

import numpy as np

from engine.core import protocol
from engine.core.sharding import TrainableMap, split_batch
from engine.core.state import NetworkState
from engine.parallel import workspace as ws
from engine.parallel.barrier import Aborted, Barriers
from engine.parallel.resident import ExamplesWindow
from engine.parallel.worker_gradients import GradientsPass
from engine.parallel.worker_states import StatesPass

RUN_PASS, REDUCE, ATTACH_DATA, STOP = range(4)
OK, FAILED = 0, 1
_HAS_PAYLOAD = 0x80


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _LazyRandom:
    """A numpy Generator for (seed, worker, step, chunk), built only if the model draws from it.

    Philox is counter-based: the stream of a step does not depend on what earlier steps drew, so a
    step recomputed after a failure sees the same dropout masks.
    """

    def __init__(self, seed, worker_id, step, chunk=0):
        self._key, self._counter = (seed << 20) + worker_id, [0, 0, chunk, step]
        self._generator = None

    def __getattr__(self, name):
        if self._generator is None:
            bits = np.random.Philox(key=self._key, counter=self._counter)
            self._generator = np.random.Generator(bits)
        return getattr(self._generator, name)


class WorkerCore(GradientsPass, StatesPass):
    """The maths of one worker on shared (or, in-process, private) arrays.

    The passes of the two sync modes come from the mixins; ``engine.parallel.faults`` subclasses
    this class and overrides its steps (``_compute``, ``_update_slice``, ``_wait``, ...)."""

    def __init__(self, worker_id, model, layout, optimizer, work, data=None, *, sync="gradients",
                 owner_pid=None, spin_s=0.0):
        self.worker_id, self.model, self.layout, self.optimizer = worker_id, model, layout, optimizer
        self.work, self.data, self.sync = work, data, sync
        self.num_workers = len(work.slots)
        self.num_weights = layout.num_weights
        # Spin before sleeping (spin_s > 0) only on a core of its own: a spinning worker that
        # shares a core with the peer it waits for only delays that peer.
        self.barriers = Barriers(work.arrivals, work.doorbell, work.abort,
                                 spin_s=spin_s, owner_pid=owner_pid)
        self.results = work.results[worker_id]
        self._versions = [NetworkState.from_buffer(layout, version)
                          for version in work.versions_of_params]
        self.slot = work.slots[worker_id]
        # Frozen weights (engine.core.sharding): state_bounds split the compact numbering of the
        # trainable weights and theta; in gradients mode the slot holds just those values.
        self.trainable = TrainableMap(work.spec.get("weight_ranges", ((0, self.num_weights),)),
                                      self.num_weights, layout.size)
        trained = self.trainable.num_trainable
        if sync == "gradients":
            self.slot_weights, self.slot_theta = self.trainable.compact_views(layout, self.slot)
        else:
            self.local_state = NetworkState.from_buffer(layout, self.slot)
        start, stop = int(work.state_bounds[worker_id]), int(work.state_bounds[worker_id + 1])
        self.state_slice = (start, stop)                    # compact numbering from here on
        self.weight_slice = (start, min(stop, trained))
        self.theta_slice = (max(start, trained), stop)
        self.weight_pieces = self.trainable.pieces(*self.weight_slice)  # (buffer a, b, compact)
        self.theta_pieces = self.trainable.pieces(*self.theta_slice)
        self.state_pieces = self.trainable.pieces(start, stop)
        self._out_views = None
        self.takes_rng, self.takes_out = protocol.loss_and_grads_options(model)
        self._local_flat = None  # sync="states" only; allocated by its first local step
        self._rows_buffer = None
        self.examples_window = ExamplesWindow()
        self._splits = {}
        self._coefficients = np.zeros(self.num_workers)
        self._averaged = work.averaged
        self._param_versions = list(work.versions_of_params)
        self._optimizer_versions = [version[0] for version in work.versions_of_optimizer]

    def run(self, op):
        if op == RUN_PASS:
            self.run_pass()
        elif op == REDUCE:
            self.reduce()
        else:
            raise ValueError(f"unknown operation {op}")

    # -- a pass ----------------------------------------------------------------------------------
    def run_pass(self):
        """Run (or, for a replacement, resume) the pass planned in ``control``."""
        control = self.work.control
        self.barriers.always_ring = bool(control[ws.CROSS_NODE])
        try:
            if int(control[ws.PASS_KIND]) == ws.EVALUATE:
                self._evaluate_pass()
            elif self.sync == "gradients":
                self._gradient_pass()
            else:
                self._states_pass()
        except Aborted:
            pass  # the owner is tearing the pool down, or a peer stopped the pass
        finally:
            self.results[ws.WAITING] = 0.0
            self.results[ws.PEAK_RSS] = _peak_rss_bytes()

    def _plan(self):
        control = self.work.control
        return (int(control[ws.NUM_STEPS]), int(control[ws.STEP]), int(control[ws.ROWS]),
                int(control[ws.BATCH_SIZE]))

    def _shard(self, k, rows, batch_size):
        """Bounds of this worker's shard of pass step ``k`` (positions in the pass's order)."""
        first = k * batch_size
        size = min(batch_size, rows - first)
        nodes = int(self.work.control[ws.NODE_COUNT])
        if nodes > 1:  # this node's contiguous share of the global batch
            share = self._splits.get(("node", size))
            if share is None:
                share = self._splits[("node", size)] = split_batch(size, nodes)
            rank = int(self.work.control[ws.NODE_RANK])
            first, size = first + int(share[rank]), int(share[rank + 1] - share[rank])
        bounds = self._splits.get(size)
        if bounds is None:
            bounds = self._splits[size] = split_batch(size, self.num_workers)
        return first + int(bounds[self.worker_id]), first + int(bounds[self.worker_id + 1])

    def _rows(self, start, stop):
        """Examples and labels at positions [start, stop) of the pass: gathered through the pass's
        order into a private buffer (training), or a zero-copy slice (evaluation, process_batch)."""
        data = self.data
        self.examples_window.reading(data, stop - start)
        if not self.work.control[ws.ORDERED]:
            return data.examples[start:stop], data.labels[start:stop]
        count = stop - start
        if self._rows_buffer is None or len(self._rows_buffer[0]) < count:
            self._rows_buffer = (np.empty((count,) + data.examples.shape[1:], np.float32),
                                 np.empty(count, np.int64))
        x, y = self._rows_buffer[0][:count], self._rows_buffer[1][:count]
        index = data.order[start:stop]
        data.examples.take(index, axis=0, out=x)
        data.labels.take(index, out=y)
        return x, y

    def _beat(self, step):
        results = self.results
        results[ws.HEARTBEAT] += 1.0
        results[ws.CURRENT_STEP] = step

    def _sleeping(self):
        self.results[ws.WAITING] = 1.0

    def _awake(self):
        self.results[ws.WAITING] = 0.0
        self.results[ws.HEARTBEAT] += 1.0

    def _wait(self, kind, round_number, only=None):
        # What it waits for, so the owner can tell a worker stopped at an already passed barrier
        # (a hang) from one waiting for a slow peer.
        results = self.results
        results[ws.WAIT_KIND], results[ws.WAIT_ROUND] = kind, round_number
        results[ws.WAIT_ONLY] = -1 if only is None else only
        self.barriers.wait(kind, round_number, self._sleeping, self._awake, only=only)

    def _wait_node(self, round_number):
        """Wait for the owner's cross-node step number ``round_number`` (NODE_DONE)."""
        self._wait(ws.NODE_DONE, round_number, only=0)

    def _stop(self, k):
        self.results[ws.STOP_STEP] = k

    # -- evaluation ------------------------------------------------------------------------------
    def _evaluate_pass(self):
        num_steps, base, rows, batch_size = self._plan()
        barriers, i, records = self.barriers, self.worker_id, self.data.records
        k = barriers.count(ws.EVALUATED, i)
        state = self._versions[base % len(self._versions)]
        while k < num_steps:
            self._beat(k)
            self._evaluate_step(k, state, *self._shard(k, rows, batch_size), records[k, i])
            k += 1
            barriers.arrive(ws.EVALUATED, i, k, ring=False)

    def _evaluate_step(self, k, state, start, stop, record):
        started = time.perf_counter()
        record[ws.R_STARTED] = started
        record[ws.R_COUNT], record[ws.R_LOSS] = stop - start, 0.0
        if stop > start:
            x, y = self._rows(start, stop)
            self.data.predictions[start:stop], record[ws.R_LOSS] = _predict_and_loss(
                self.model, state, x, y)
        record[ws.R_COMPUTE_S] = time.perf_counter() - started
        self.examples_window.computed(record[ws.R_COMPUTE_S])

    # -- shared by both modes --------------------------------------------------------------------
    def _all_weight_views(self, grad_views):
        """``grad_views`` completed with private scratch views for frozen weights (a model taking
        ``out=`` writes every gradient; a frozen one goes nowhere)."""
        if len(grad_views) == len(self.layout.weight_shapes):
            return grad_views
        if self._out_views is None or self._out_views[0] is not grad_views:
            scratch, _ = self.layout.views(np.empty(self.layout.size, np.float32))
            self._out_views = (grad_views, {name: grad_views.get(name, view)
                                            for name, view in scratch.items()})
        return self._out_views[1]

    def _train_on_shard(self, state, x, y, step, grad_views, theta_views):
        """Loss of examples ``x`` at ``state``; their gradient and new theta go into the views.

        A shard larger than the micro-batch (``control[MICRO_BATCH]``, 0 = whole shard) runs in
        chunks whose gradients, losses and theta are averaged weighted by chunk size: the same
        maths as one pass (to float32 rounding), with the memory of one chunk. Returns
        (mean loss, examples).
        """
        control = self.work.control
        total = len(x)
        micro = int(control[ws.MICRO_BATCH]) or total
        single = micro >= total
        loss, returned_theta = 0.0, False
        for chunk, low in enumerate(range(0, total, micro)):
            high = min(total, low + micro)
            kwargs = {}
            if self.takes_rng:
                kwargs["rng"] = _LazyRandom(int(control[ws.SEED]), self.worker_id, step, chunk)
            if self.takes_out and single:
                kwargs["out"] = self._all_weight_views(grad_views)
            chunk_loss, grads, *new_theta = self.model.loss_and_grads(state, x[low:high],
                                                                      y[low:high], **kwargs)
            weight = np.float32((high - low) / total)
            loss += float(weight) * float(chunk_loss)
            returned_theta = bool(new_theta)
            pairs = [(grad_views, grads)] + ([(theta_views, new_theta[0])] if new_theta else [])
            for views, values in pairs:
                for name, target in views.items():
                    value = values[name]
                    if single:
                        if value is not target:
                            target[...] = value
                    elif chunk == 0:
                        np.multiply(value, weight, out=target)
                    else:
                        target += weight * value
        if not returned_theta:
            for name, target in theta_views.items():
                target[...] = state.theta[name]
        return loss, total


def _predict_and_loss(model, state, x, y):
    """Predictions and inference-mode loss, in one forward pass when the model offers it.

    ``loss`` is optional in the model protocol; without it the training-mode loss stands in."""
    if hasattr(model, "predict_and_loss"):
        predictions, loss = model.predict_and_loss(state, x, y)
        return predictions, float(loss)
    predictions = model.predict(state, x)
    if hasattr(model, "loss"):
        return predictions, float(model.loss(state, x, y))
    return predictions, float(model.loss_and_grads(state, x, y)[0])


def send_message(fd, status_or_op, payload=b""):
    """Write one message: a byte, then (only if there is a payload) its length and the payload."""
    if payload:
        message = bytes([status_or_op | _HAS_PAYLOAD]) + len(payload).to_bytes(4, "little") + payload
    else:
        message = bytes([status_or_op])
    view = memoryview(message)
    while view:
        view = view[os.write(fd, view):]


def receive_message(fd):
    """Read one message written by :func:`send_message`; returns (byte, payload)."""
    head = _read_exact(fd, 1)[0]
    if not head & _HAS_PAYLOAD:
        return head, b""
    length = int.from_bytes(_read_exact(fd, 4), "little")
    return head & ~_HAS_PAYLOAD, _read_exact(fd, length)


def _read_exact(fd, count):
    chunks = []
    while count:
        chunk = os.read(fd, count)
        if not chunk:
            raise EOFError("the other end of the pipe closed")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)
