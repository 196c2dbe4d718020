"""What a worker does for each operation, and the loop of a worker process.

Message protocol (one pipe each way per worker, no pickling on the hot path)
---------------------------------------------------------------------------
* The owner writes everything an operation needs (learning rate, step, shard bounds, averaging
  coefficients) into the shared workspace, then sends a one-byte opcode on the worker's command
  pipe. Only the rare ``ATTACH_DATA`` carries a pickled payload (the new data block's spec).
* The worker runs the operation and answers with one byte: ``OK``, or ``FAILED`` followed by its
  traceback text. The pipe's write/read pair orders memory: what a side wrote before sending is
  visible to the other side after receiving.
* The owner never sends the next operation until every worker has answered the current one, so
  phases never overlap: all workers read ``params`` during ``COMPUTE`` before any of them writes it
  in ``UPDATE``.
A worker ignores SIGINT (the owner decides how to stop), and exits by itself when the owner dies.
"""
import faulthandler
import os
import pickle
import resource
import select
import signal
import sys
import time
import traceback

import numpy as np

from engine.parallel import workspace as ws
from engine.parallel.faults import strike
from engine.core.kernels import sum_squares, weighted_mean_into
from engine.core.state import NetworkState

(COMPUTE, REDUCE, UPDATE, REDUCE_UPDATE, LOCAL_STEP, AVERAGE, EVALUATE, ATTACH_DATA,
 STOP) = range(9)
OK, FAILED = 0, 1
_HAS_PAYLOAD = 0x80
_OWNER_CHECK_S = 1.0


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _LazyRandom:
    """A numpy Generator for (seed, worker, step), built only if the model draws from it.

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

    def __init__(self, worker_id, model, layout, optimizer, work, data=None, faults=()):
        self.worker_id, self.model, self.layout, self.optimizer = worker_id, model, layout, optimizer
        self.work, self.data, self.faults = work, data, list(faults)
        self.num_weights = layout.num_weights
        self._params_states = [NetworkState.from_buffer(layout, version)
                               for version in work.versions_of_params]
        self.local_state = NetworkState.from_buffer(layout, work.slots[worker_id])
        self.slot_weights, self.slot_theta = layout.views(work.slots[worker_id])
        start, stop = work.state_bounds[worker_id], work.state_bounds[worker_id + 1]
        self.state_slice = (int(start), int(stop))
        self.weight_slice = (int(start), int(min(stop, self.num_weights)))
        self.theta_slice = (int(max(start, self.num_weights)), int(stop))
        self._local_flat = None  # sync="states" only; allocated by its first local step

    @property
    def params_state(self):
        return self._params_states[int(self.work.control[ws.PARITY]) % len(self._params_states)]

    def run(self, op):
        handler = {COMPUTE: self.compute, REDUCE: self.reduce, UPDATE: self.update,
                   REDUCE_UPDATE: self.reduce_update, LOCAL_STEP: self.local_step,
                   AVERAGE: self.average, EVALUATE: self.evaluate}[op]
        handler()
        self.work.results[self.worker_id, ws.PEAK_RSS] = _peak_rss_bytes()

    # -- sync="gradients" ------------------------------------------------------------------------
    def compute(self):
        """Loss and gradients of this worker's shard at ``params``, written into its slot."""
        self._run_timed(self._compute)

    def _strike(self, op_name):
        if self.faults:  # test-only fault injection (engine.parallel.faults)
            strike(self.faults, op_name, int(self.work.control[ws.STEP]))

    def _compute(self):
        self._strike("compute")
        work, results = self.work, self.work.results[self.worker_id]
        slot = work.slots[self.worker_id]
        start, stop = self._shard()
        if stop == start:  # contributes with coefficient 0; zeros keep NaN of old data out
            slot.fill(0.0)
            results[ws.LOSS] = results[ws.COUNT] = results[ws.SUM_SQUARES] = 0.0
            return
        self._train_on_shard(self.params_state, self.slot_weights, self.slot_theta)
        # A float64 sum of squares is finite iff every gradient is: the owner checks it before any
        # worker updates the shared state.
        results[ws.SUM_SQUARES] = sum_squares(slot, 0, self.num_weights)

    def reduce(self):
        """Weighted mean of every slot over this worker's slice into ``reduced``."""
        self._strike("reduce")
        work = self.work
        if work.averaged is not work.reduced:
            return  # one worker: its slot is the average, and COMPUTE already summed its squares
        start, stop = self.weight_slice
        middle = (start + stop) // 2 if self.faults else stop  # split only to inject a fault
        sum_squares = weighted_mean_into(work.reduced, work.slots, work.coefficients, start, middle,
                                         True)
        self._strike("reduce_mid")
        sum_squares += weighted_mean_into(work.reduced, work.slots, work.coefficients, middle, stop,
                                          True)
        start, stop = self.theta_slice
        weighted_mean_into(work.reduced, work.slots, work.coefficients, start, stop, False)
        work.results[self.worker_id, ws.SUM_SQUARES] = sum_squares

    def update(self):
        """Optimizer step on this worker's slice of the weights, written into the next version of
        the state (the current one stays intact until the owner flips); averaged theta copied in."""
        self._strike("update")
        work, control = self.work, self.work.control
        start, stop = self.weight_slice
        middle = (start + stop) // 2 if self.faults else stop
        non_finite = 0
        for low, high in ((start, middle), (middle, stop)):
            if high > low:
                non_finite += self.optimizer.update_into(
                    work.next_params, work.next_optimizer[0], work.params, work.optimizer[0],
                    work.averaged, low, high, control[ws.LEARNING_RATE], control[ws.STEP] + 1,
                    control[ws.SCALE])
            if low == start:
                self._strike("update_mid")
        work.results[self.worker_id, ws.NON_FINITE] = non_finite
        start, stop = self.theta_slice
        work.next_params[start:stop] = work.averaged[start:stop]

    def reduce_update(self):
        self.reduce()
        self.update()

    # -- sync="states" ---------------------------------------------------------------------------
    def local_step(self):
        """One optimizer step of this worker's local state on its shard (local SGD)."""
        self._run_timed(self._local_step)

    def _local_step(self):
        self._strike("local_step")
        work, control, results = self.work, self.work.control, self.work.results[self.worker_id]
        state = self.local_state
        if control[ws.REFRESH]:
            state.buffer[:] = work.params
        start, stop = self._shard()
        if stop == start:
            results[ws.LOSS] = results[ws.COUNT] = results[ws.NON_FINITE] = 0.0
            return
        if self._local_flat is None:
            # Gradients and new theta gather here: in states mode the slot holds the local state.
            self._local_flat = np.empty(self.layout.size, np.float32)
            self._local_grads, self._local_theta = self.layout.views(self._local_flat)
        _, count = self._train_on_shard(state, self._local_grads, self._local_theta)
        own_optimizer = work.optimizer[self.worker_id]
        results[ws.NON_FINITE] = self.optimizer.update_into(
            state.buffer, own_optimizer, state.buffer, own_optimizer, self._local_flat, 0,
            self.num_weights, control[ws.LEARNING_RATE], control[ws.STEP] + 1, 1.0)
        state.buffer[self.num_weights:] = self._local_flat[self.num_weights:]
        results[ws.SINCE_SYNC] += count

    def restart_local_state(self):
        """A replacement worker in states mode: its predecessor may have died mid-update, so it
        restarts from the last average with fresh optimizer state (its local steps are lost)."""
        self.local_state.buffer[:] = self.work.params
        self.work.optimizer[self.worker_id].fill(0.0)
        self.work.results[self.worker_id, ws.SINCE_SYNC] = 0.0

    def average(self):
        """Weighted mean of every worker's local state over this worker's slice into ``params``."""
        self._strike("average")
        start, stop = self.state_slice
        weighted_mean_into(self.work.params, self.work.slots, self.work.coefficients, start, stop,
                           False)
        self.work.results[self.worker_id, ws.SINCE_SYNC] = 0.0

    # -- shared by both modes --------------------------------------------------------------------
    def evaluate(self):
        """Predictions and inference-mode loss of this worker's shard at ``params``."""
        self._run_timed(self._evaluate)

    def _evaluate(self):
        self._strike("evaluate")
        start, stop = self._shard()
        results = self.work.results[self.worker_id]
        results[ws.COUNT], results[ws.LOSS] = stop - start, 0.0
        if stop > start:
            x, y = self.data.examples[start:stop], self.data.labels[start:stop]
            self.data.predictions[start:stop], results[ws.LOSS] = _predict_and_loss(
                self.model, self.params_state, x, y)

    def _shard(self):
        bounds = self.work.shard_bounds
        return int(bounds[self.worker_id]), int(bounds[self.worker_id + 1])

    def _train_on_shard(self, state, grad_views, theta_views):
        """Loss of this worker's shard at ``state``; its gradient and new theta go into the views.

        A shard larger than the micro-batch (``control[MICRO_BATCH]``, 0 = whole shard) runs in
        chunks whose gradients, losses and theta are averaged weighted by chunk size: the same
        maths as one pass (to float32 rounding), with the memory of one chunk. Returns
        (mean loss, examples).
        """
        control, results = self.work.control, self.work.results[self.worker_id]
        start, stop = self._shard()
        total = stop - start
        micro = int(control[ws.MICRO_BATCH]) or max(total, 1)
        loss, returned_theta = 0.0, False
        for chunk, chunk_start in enumerate(range(start, stop, micro)):
            chunk_stop = min(stop, chunk_start + micro)
            weight = np.float32((chunk_stop - chunk_start) / total)
            rng = _LazyRandom(int(control[ws.SEED]), self.worker_id, int(control[ws.STEP]), chunk)
            chunk_loss, grads, *new_theta = self.model.loss_and_grads(
                state, self.data.examples[chunk_start:chunk_stop],
                self.data.labels[chunk_start:chunk_stop], rng=rng)
            loss += float(weight) * chunk_loss
            returned_theta = bool(new_theta)
            pairs = [(grad_views, grads)] + ([(theta_views, new_theta[0])] if new_theta else [])
            for views, values in pairs:
                for name, target in views.items():
                    if chunk == 0:
                        np.multiply(values[name], weight, out=target)
                    else:
                        target += weight * values[name]
        if not returned_theta:
            for name, target in theta_views.items():
                target[...] = state.theta[name]
        results[ws.LOSS], results[ws.COUNT] = loss, total
        return loss, total

    def _run_timed(self, body):
        results = self.work.results[self.worker_id]
        started = time.perf_counter()
        body()
        results[ws.COMPUTE_S] = time.perf_counter() - started


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
    from engine.parallel.system import keep_freed_memory, limit_threads
    thread_limit = limit_threads(spec["threads"])  # noqa: F841 - the limit lasts while it lives
    keep_freed_memory()
    command_fd, answer_fd = command_pipe.fileno(), answer_pipe.fileno()
    work = ws.Workspace(spec["workspace"], shared=True, create=False)
    data = None if spec["data"] is None else ws.DataArrays(spec["data"], shared=True, create=False)
    core = WorkerCore(worker_id, spec["model"], spec["layout"], spec["optimizer"], work, data,
                      spec["faults"])
    if spec["replacement"] and spec["sync"] == "states":
        core.restart_local_state()
    send_message(answer_fd, OK)
    try:
        while True:
            # Sleep in select (no spinning); wake once a second to notice an owner that died.
            if not select.select([command_fd], [], [], _OWNER_CHECK_S)[0]:
                if not _owner_alive(spec["owner_pid"]):
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


def _owner_alive(owner_pid):
    try:
        os.kill(owner_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the PID exists but belongs to someone else: treat as alive
        return True
    return True
