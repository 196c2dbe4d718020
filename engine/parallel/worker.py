"""What a worker does in a pass, and the loop of a worker process.

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
A worker ignores SIGINT (the owner decides how to stop), and exits by itself when the owner dies.
"""
import faulthandler
import math
import os
import pickle
import resource
import select
import signal
import sys
import time
import traceback

import numpy as np

from engine.core import protocol
from engine.core.kernels import clip_scale, sum_squares, weighted_mean_into
from engine.core.sharding import TrainableMap, split_batch
from engine.core.state import NetworkState
from engine.parallel import workspace as ws
from engine.parallel.barrier import DEFAULT_SPIN_S, Aborted, Barriers, owner_pid_alive

RUN_PASS, REDUCE, ATTACH_DATA, STOP = range(4)
OK, FAILED = 0, 1
_HAS_PAYLOAD = 0x80
_OWNER_CHECK_S = 1.0
_STOPPED_BY_PEER = 2  # work.abort value: a peer found a non-finite value (states mode)


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


class WorkerCore:
    """The maths of one worker on shared (or, in-process, private) arrays."""

    def __init__(self, worker_id, model, layout, optimizer, work, data=None, *, sync="gradients",
                 owner_pid=None, spin=False):
        self.worker_id, self.model, self.layout, self.optimizer = worker_id, model, layout, optimizer
        self.work, self.data, self.sync = work, data, sync
        self.num_workers = len(work.slots)
        self.num_weights = layout.num_weights
        # Spin before sleeping only on a core of its own: a spinning worker that shares a core
        # with the peer it waits for only delays that peer.
        self.barriers = Barriers(work.arrivals, work.doorbell, work.abort,
                                 spin_s=DEFAULT_SPIN_S if spin else 0.0, owner_pid=owner_pid)
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

    # -- sync="gradients" ------------------------------------------------------------------------
    def _gradient_pass(self):
        barriers, i, control = self.barriers, self.worker_id, self.work.control
        num_steps, base, rows, batch_size = self._plan()
        clip_norm = control[ws.CLIP_NORM]
        clip_norm = None if math.isnan(clip_norm) else float(clip_norm)
        records, rates = self.data.records, self.data.step_learning_rates
        coefficients = self._coefficients
        # Across nodes the owner's thread joins every step between reduce and update
        # (engine.parallel.cross_node), and decides for all nodes whether a step is finite.
        cross_node = bool(control[ws.CROSS_NODE])
        barriers.always_ring = cross_node
        k = barriers.count(ws.UPDATED, i)  # steps completed (by this worker or its predecessor)
        # The hot loop: per step a few dozen scalar reads and writes; the small per-step checks
        # run on Python floats (row.tolist()), which beats numpy reductions over a few workers.
        while k < num_steps:
            step, record, row = base + k, records[k, i], records[k]
            self._beat(step)
            if barriers.count(ws.COMPUTED, i) <= k:
                record[ws.R_STARTED] = time.perf_counter()
                self._compute(step, *self._shard(k, rows, batch_size), record)
                barriers.arrive(ws.COMPUTED, i, k + 1)
            self._wait(ws.COMPUTED, k + 1)
            record[ws.R_COMPUTED] = time.perf_counter()
            computed = row.tolist()
            total = 0.0
            for w, fields in enumerate(computed):
                if not cross_node and not math.isfinite(fields[ws.R_LOSS]):
                    return self._stop(k)
                total += fields[ws.R_COUNT]
            for w, fields in enumerate(computed):
                coefficients[w] = fields[ws.R_COUNT] / total
            self._beat(step)
            if clip_norm is None and not cross_node:
                record[ws.R_SUM_SQUARES] = self._reduce_slice(coefficients, record)
                scale = 1.0
            else:
                if barriers.count(ws.REDUCED, i) <= k:
                    record[ws.R_SUM_SQUARES] = self._reduce_slice(coefficients, record)
                    barriers.arrive(ws.REDUCED, i, k + 1)
                if cross_node:
                    self._wait_node(k + 1)
                    if control[ws.HOP_STOP]:
                        return self._stop(k)
                    scale = float(control[ws.HOP_SCALE])
                else:
                    self._wait(ws.REDUCED, k + 1)
                    squares = sum(fields[ws.R_SUM_SQUARES] for fields in row.tolist())
                    scale = clip_scale(math.sqrt(squares), clip_norm)
            record[ws.R_REDUCED] = time.perf_counter()
            record[ws.R_NON_FINITE] = self._update_slice(step, rates[k], scale)
            record[ws.R_UPDATED] = time.perf_counter()
            barriers.arrive(ws.UPDATED, i, k + 1)
            self._wait(ws.UPDATED, k + 1)
            record[ws.R_ENDED] = time.perf_counter()
            # A non-finite gradient shows in the sum of squares of some slice of the mean (and in
            # the parameters it updated, which went into the next version only): stop before
            # that version becomes current.
            for fields in row.tolist():
                if fields[ws.R_NON_FINITE] != 0.0 or not math.isfinite(fields[ws.R_SUM_SQUARES]):
                    return self._stop(k)
            k += 1

    def _stop(self, k):
        self.results[ws.STOP_STEP] = k

    def _compute(self, step, start, stop, record):
        """Loss and gradient of this worker's shard at the state current before ``step``, into
        its slot. (Their finiteness is checked on the mean: no extra pass over the slot.)"""
        started = time.perf_counter()
        if stop == start:  # contributes with coefficient 0; zeros keep NaN of old data out
            self.slot.fill(0.0)
            record[ws.R_LOSS] = record[ws.R_COUNT] = 0.0
        else:
            x, y = self._rows(start, stop)
            state = self._versions[step % len(self._versions)]
            loss, count = self._train_on_shard(state, x, y, step, self.slot_weights,
                                               self.slot_theta)
            record[ws.R_LOSS], record[ws.R_COUNT] = loss, count
        record[ws.R_COMPUTE_S] = time.perf_counter() - started

    def _reduce_slice(self, coefficients, record):
        """Weighted mean of every slot over this worker's slice into ``reduced``; returns the
        sum of squares of its weights part (float64: finite iff every gradient is)."""
        work = self.work
        if self._averaged is not work.reduced:  # one worker: its slot is the average
            return sum_squares(self.slot, 0, self.trainable.num_trainable)
        start, stop = self.weight_slice
        squares = weighted_mean_into(work.reduced, work.slots, coefficients, start, stop, True)
        start, stop = self.theta_slice
        weighted_mean_into(work.reduced, work.slots, coefficients, start, stop, False)
        return squares

    def _update_slice(self, step, learning_rate, scale):
        """Optimizer step on this worker's slice, from the version current before ``step`` into
        the next one; the averaged theta copied in. Returns 0.0, or NaN if a value is not finite."""
        params, optimizer = self._param_versions, self._optimizer_versions
        current, following = step % len(params), (step + 1) % len(params)
        averaged, non_finite = self._averaged, 0.0
        for start, stop, compact in self.weight_pieces:
            if compact == start:  # nothing frozen before it: buffer and compact numbering agree
                non_finite += self.optimizer.update_into(
                    params[following], optimizer[following], params[current], optimizer[current],
                    averaged, start, stop, learning_rate, step + 1, scale)
            else:  # past a frozen weight: the same update on views aligned to the piece
                non_finite += self.optimizer.update_into(
                    params[following][start:stop], optimizer[following][:, start:stop],
                    params[current][start:stop], optimizer[current][:, start:stop],
                    averaged[compact:compact + stop - start], 0, stop - start, learning_rate,
                    step + 1, scale)
        for start, stop, compact in self.theta_pieces:
            params[following][start:stop] = averaged[compact:compact + stop - start]
        return non_finite

    def reduce(self):
        """Standalone weighted mean (``coefficients`` from the owner) over this worker's slice:
        what the benchmarks time against the memory-copy floor."""
        work = self.work
        if work.averaged is work.reduced:
            start, stop = self.weight_slice
            self.results[ws.SUM_SQUARES] = weighted_mean_into(
                work.reduced, work.slots, work.coefficients, start, stop, True)

    # -- sync="states" ---------------------------------------------------------------------------
    def _states_pass(self):
        barriers, i, work, control = self.barriers, self.worker_id, self.work, self.work.control
        num_steps, base, rows, batch_size = self._plan()
        interval, since = int(control[ws.UPDATE_INTERVAL]), int(control[ws.SINCE_AVERAGE])
        end = int(control[ws.END_AVERAGE])
        self._recover_slot()
        k, j = barriers.count(ws.LOCAL_DONE, i), barriers.count(ws.AVERAGE_OUT, i)
        if control[ws.REFRESH] and k == 0 and j == 0:
            self._refresh()
        ends_off_cycle = (since + num_steps) % interval != 0
        while True:
            due = (since + k) // interval - since // interval
            if k == num_steps and end == ws.END_AVERAGE_STATES and ends_off_cycle:
                due += 1
            if j < due:
                self._average(j, into_params=True)
                j += 1
                continue
            if k == num_steps:
                break
            if work.abort[0]:
                return
            step = base + k
            self._beat(step)
            record = self.data.records[k, i]
            if not self._local_step(step, *self._shard(k, rows, batch_size), record):
                self._stop(k)
                work.abort[0] = _STOPPED_BY_PEER
                barriers.doorbell.ring()
                return
            k += 1
            barriers.arrive(ws.LOCAL_DONE, i, k, ring=False)
            self.results[ws.DIRTY] = 0.0
        if end == ws.END_MEAN_INTO_REDUCED and ends_off_cycle:
            self._average(j, into_params=False)

    def _local_step(self, step, start, stop, record):
        """One optimizer step of the local state on this worker's shard; False if not finite."""
        started = time.perf_counter()
        record[ws.R_STARTED] = started
        if stop == start:
            record[ws.R_LOSS] = record[ws.R_COUNT] = record[ws.R_NON_FINITE] = 0.0
            return True
        if self._local_flat is None:
            # Gradients and new theta gather here: in states mode the slot holds the local state.
            self._local_flat = np.empty(self.layout.size, np.float32)
            grads, self._local_theta = self.layout.views(self._local_flat)
            trainable = self.trainable.compact_views(self.layout,
                                                     np.empty(self.trainable.size, np.float32))[0]
            self._local_grads = {name: grads[name] for name in grads if name in trainable}
        x, y = self._rows(start, stop)
        loss, count = self._train_on_shard(self.local_state, x, y, step, self._local_grads,
                                           self._local_theta)
        record[ws.R_LOSS], record[ws.R_COUNT] = loss, count
        if not np.isfinite(loss):
            return False
        own_optimizer = self.work.optimizer[self.worker_id]
        self.results[ws.DIRTY] = ws.DIRTY_UPDATE
        learning_rate = self.data.step_learning_rates[step - int(self.work.control[ws.STEP])]
        non_finite = 0.0
        for start, stop in self.trainable.weight_ranges:  # frozen weights are never stepped
            non_finite += self.optimizer.update_into(
                self.slot, own_optimizer, self.slot, own_optimizer, self._local_flat, start, stop,
                learning_rate, step + 1, 1.0)
        record[ws.R_NON_FINITE] = non_finite
        self.slot[self.num_weights:] = self._local_flat[self.num_weights:]
        self.results[ws.SINCE_SYNC] += count
        record[ws.R_COMPUTE_S] = time.perf_counter() - started
        record[ws.R_ENDED] = time.perf_counter()
        return record[ws.R_NON_FINITE] == 0.0

    def _average(self, j, into_params):
        """Average number j of this pass: the example-weighted mean of the local states over this
        worker's slice into ``params`` (then the local state restarts from it), or into
        ``reduced`` (process_batch between averages: local states go on)."""
        barriers, i, work = self.barriers, self.worker_id, self.work
        if barriers.count(ws.AVERAGE_IN, i) <= j:
            barriers.arrive(ws.AVERAGE_IN, i, j + 1)
        self._wait(ws.AVERAGE_IN, j + 1)
        self._beat(int(self.results[ws.CURRENT_STEP]))
        counts = work.results[:, ws.SINCE_SYNC]
        coefficients = counts / counts.sum()
        for start, stop, _ in self.state_pieces:  # frozen weights are equal in every local state
            self._average_slice(work.params if into_params else work.reduced, coefficients, start,
                                stop)
        barriers.arrive(ws.AVERAGE_OUT, i, j + 1)
        self._wait(ws.AVERAGE_OUT, j + 1)
        if work.control[ws.CROSS_NODE]:
            barriers.always_ring = True
            self._wait_node(j + 1)  # the owner averages across nodes (engine.parallel.cross_node)
        if into_params:
            self._refresh()

    def _average_slice(self, out, coefficients, start, stop):
        weighted_mean_into(out, self.work.slots, coefficients, start, stop, False)

    def _refresh(self):
        results = self.results
        results[ws.DIRTY] = ws.DIRTY_REFRESH
        self.slot[:] = self.work.params
        results[ws.SINCE_SYNC] = 0.0
        results[ws.DIRTY] = 0.0

    def _recover_slot(self):
        """A replacement whose predecessor died writing its slot: restart it from the last
        average (after an interrupted update also with fresh optimizer state: local steps since
        the average are lost)."""
        dirty = self.results[ws.DIRTY]
        if dirty == ws.DIRTY_UPDATE:
            self.work.optimizer[self.worker_id].fill(0.0)
        if dirty:
            self._refresh()

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


def worker_main(worker_id, spec, command_pipe, answer_pipe):
    """Entry point of a worker process: attach, then serve operations until STOP or owner death."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log = _log_stderr(spec["log_path"])  # noqa: F841 - stays open while the worker lives
    from engine.parallel.system import bind_to_cores, keep_freed_memory, limit_threads
    bound = spec.get("cores") is not None and bind_to_cores(spec["cores"])
    thread_limit = limit_threads(spec["threads"])  # noqa: F841 - the limit lasts while it lives
    keep_freed_memory()
    command_fd, answer_fd = command_pipe.fileno(), answer_pipe.fileno()
    work = ws.Workspace(spec["workspace"], shared=True, create=False)
    data = None if spec["data"] is None else ws.DataArrays(spec["data"], shared=True, create=False)
    core_class = WorkerCore
    if spec["faults"]:  # test-only: a subclass that strikes at planned points (engine.parallel.faults)
        from engine.parallel.faults import fault_injecting
        core_class = fault_injecting(WorkerCore, spec["faults"])
    core = core_class(worker_id, spec["model"], spec["layout"], spec["optimizer"], work, data,
                      sync=spec["sync"], owner_pid=spec["owner_pid"], spin=bound)
    send_message(answer_fd, OK)
    try:
        while True:
            # Sleep in select (no spinning); wake once a second to notice an owner that died.
            if not select.select([command_fd], [], [], _OWNER_CHECK_S)[0]:
                if not owner_pid_alive(spec["owner_pid"]):
                    return
                continue
            try:
                op, payload = receive_message(command_fd)
            except (EOFError, OSError):
                return
            if op == STOP:
                return
            try:
                if op == ATTACH_DATA:
                    if data is not None:
                        core.data = None
                        data.close()
                    data = ws.DataArrays(pickle.loads(payload), shared=True, create=False)
                    core.data = data
                    core._rows_buffer = None
                else:
                    core.run(op)
                send_message(answer_fd, OK)
            except Exception:  # any failure goes back to the owner with its traceback
                send_message(answer_fd, FAILED, traceback.format_exc().encode())
    finally:
        core = None
        if data is not None:
            data.close()
        work.close()


class _Tee:
    """Writes to the worker's inherited stderr and to its log, whose tail the owner reports if
    the worker dies."""

    def __init__(self, *streams):
        self.streams = [stream for stream in streams if stream is not None]

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def _log_stderr(path):
    log = open(path, "a", buffering=1)
    sys.stderr = _Tee(sys.__stderr__, log)
    faulthandler.enable(file=log)  # a segfault's Python traceback lands in the log too
    return log
