"""Persistent worker processes: start, send an operation to all, wait for all, replace the dead.

The owner waits on the answer pipes *and* the process sentinels together (one ``poll``), so a
worker that dies is noticed at once, and nothing spins while workers compute.

Recovery: a fresh worker that takes a dead one's place attaches the same shared memory and is
given the operation in flight; for a pass it resumes after the last phase its predecessor
recorded (``engine.parallel.worker``), and the other workers, waiting at a barrier for it, go on.
Hang detection: each worker bumps a heartbeat at every phase and marks the time it sleeps at a
barrier; a worker that neither beats nor waits for ``timeout_s`` is hung, and is killed and
replaced the same way. After
``max_restarts`` replacements within one call, the pool is torn down and WorkerCrashedError (or
WorkerTimeoutError) carries the worker id, exit code and the tail of its stderr. A worker that
*raises* is not replaced: the same input would raise again; WorkerError carries its traceback.

``InProcessExecutor`` answers the same calls for ``num_processes=1`` by running the worker core in
the owner's process, so the processor drives both the same way.
"""
import os
import pickle
import select
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager

import multiprocess

from engine.core.errors import WorkerCrashedError, WorkerError, WorkerTimeoutError
from engine.parallel import inherited
from engine.parallel.faults import parse_faults
from engine.parallel.shm import log_directory_prefix
from engine.parallel.system import keep_freed_memory
from engine.parallel.worker import ATTACH_DATA, FAILED, STOP, receive_message, send_message
from engine.parallel.worker_process import worker_main

_STARTUP_TIMEOUT_S = 300.0
_JOIN_TIMEOUT_S = 3.0
_STDERR_TAIL_LINES = 20


def default_start_method():
    """``fork`` on Linux unless TensorFlow is loaded here (it is not fork-safe); else ``spawn``.

    ``fork`` starts workers in milliseconds and, unlike ``spawn``/``forkserver``, does not re-run
    the caller's script in each worker, so a research script needs no ``__main__`` guard.
    """
    if sys.platform.startswith("linux") and "tensorflow" not in sys.modules:
        return "fork"
    return "spawn"


@contextmanager
def _thread_environment(num_threads, start_method):
    """Children started by ``spawn``/``forkserver`` read thread limits from the environment when
    they import numpy and numba. Forked children inherit those modules already imported (and numba
    refuses a NUMBA_NUM_THREADS that changes under it), so they limit threads at run time only."""
    if start_method == "fork":
        yield
        return
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: str(num_threads) for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Worker:
    """One worker process with its two pipe ends (owner side) and its stderr log."""

    def __init__(self, process, command, answer, log_path):
        self.process, self.command, self.answer, self.log_path = process, command, answer, log_path

    def stderr_tail(self):
        """The last lines of the worker's stderr; a crash report from faulthandler is kept from
        its first line ("Fatal Python error: ...") so the cause is not cut off."""
        try:
            with open(self.log_path, errors="replace") as f:
                lines = f.readlines()
        except OSError:
            return ""
        crash = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
        first = crash[-1] if crash else len(lines) - _STDERR_TAIL_LINES
        return "".join(lines[max(0, first):][:3 * _STDERR_TAIL_LINES]).rstrip()

    def close(self, force=False):
        if force and self.process.is_alive():
            self.process.kill()
        self.process.join(_JOIN_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.command.close()
        self.answer.close()


class WorkerPool:
    """``num_workers`` processes running :func:`engine.parallel.worker_process.worker_main` on a
    shared workspace.

    Args:
        spec: what every worker needs (model, layout, optimizer, workspace spec, threads, ...).
        start_method: multiprocess start method. timeout_s: longest one operation may take.
        max_restarts: dead or hung workers replaced per call of :meth:`run` sequence between two
            :meth:`reset_restart_budget` calls; past it the pool is torn down and the error raised.
    """

    def __init__(self, spec, num_workers, start_method, timeout_s=None, max_restarts=3, *,
                 progress=None, abort=None, tick=None, tick_interval_s=0.5, core_sets=None,
                 caller_arrays=None):
        self.spec, self.timeout_s, self.max_restarts = dict(spec), timeout_s, max_restarts
        # progress(worker_id) -> (heartbeat, waiting, current step); abort() wakes every worker
        # waiting at a barrier so that close() does not wait for them.
        self._progress, self._abort = progress, abort
        self._tick, self._tick_ms = tick, 1000 * tick_interval_s  # tick(): owner's periodic work
        self._core_sets = core_sets  # one set of cores per worker, or None: not bound
        # caller_arrays() -> the call's arrays (weak references): a forked worker drops its
        # inherited pages of them (engine.parallel.inherited).
        self._caller_arrays = caller_arrays
        self.context = multiprocess.get_context(start_method)
        self.start_method = start_method
        self.faults = parse_faults(os.environ.get("ENGINE_TEST_FAULTS", ""))  # before mkdtemp
        self.log_directory = tempfile.mkdtemp(prefix=log_directory_prefix())
        self.workers = [None] * num_workers
        self.restarts, self._budget_used = [], 0
        self._poller, self._owners = select.poll(), {}
        self._data_spec = None
        self._current = None  # (op, step, payload) of the operation in flight
        began = time.perf_counter()
        try:
            for worker_id in range(num_workers):
                self._launch(worker_id, first=True)
            for worker_id in range(num_workers):
                self._await_ready(worker_id)
            self.start_s = time.perf_counter() - began  # launch to every worker attached
        except BaseException:
            self.close()
            raise

    @property
    def pids(self):
        return [worker.process.pid for worker in self.workers if worker is not None]

    # -- starting and replacing workers ----------------------------------------------------------
    def _launch(self, worker_id, first):
        spec = dict(self.spec, data=self._data_spec, replacement=not first,
                    cores=None if self._core_sets is None else self._core_sets[worker_id],
                    faults=[f for f in self.faults if f.worker == worker_id] if first else [],
                    log_path=os.path.join(self.log_directory, f"worker-{worker_id}.log"))
        if self._caller_arrays is not None and self.start_method == "fork":
            spec["forget_pages"] = inherited.page_ranges(self._caller_arrays(), self.spec)
        command_read, command_write = self.context.Pipe(duplex=False)
        answer_read, answer_write = self.context.Pipe(duplex=False)
        process = self.context.Process(target=worker_main, name=f"engine-worker-{worker_id}",
                                       args=(worker_id, spec, command_read, answer_write),
                                       daemon=True)
        with _thread_environment(self.spec["threads"], self.start_method):
            process.start()
        # Drop our copies of the child's ends so a dead peer shows up as EOF.
        command_read.close()
        answer_write.close()
        self.workers[worker_id] = _Worker(process, command_write, answer_read, spec["log_path"])
        for fd, is_sentinel in ((answer_read.fileno(), False), (process.sentinel, True)):
            self._owners[fd] = (worker_id, is_sentinel)
            self._poller.register(fd, select.POLLIN)

    def _await_ready(self, worker_id):
        """Block until a freshly started worker has attached its shared memory."""
        worker = self.workers[worker_id]
        ready = multiprocess.connection.wait([worker.answer, worker.process.sentinel],
                                             timeout=max(_STARTUP_TIMEOUT_S, self.timeout_s or 0))
        if worker.answer in ready:
            try:
                status, payload = receive_message(worker.answer.fileno())
            except EOFError:  # died before it could answer
                status, payload = None, b""
            if status == FAILED:
                raise WorkerError(worker_id, payload.decode(errors="replace"))
            if status is not None:
                return
        elif not ready:
            worker.close(force=True)
            raise WorkerTimeoutError([worker_id], _STARTUP_TIMEOUT_S, "startup")
        worker.process.join(_JOIN_TIMEOUT_S)
        raise WorkerCrashedError(worker_id, worker.process.exitcode, worker.stderr_tail())

    def _retire(self, worker_id, force):
        worker = self.workers[worker_id]
        for fd in (worker.answer.fileno(), worker.process.sentinel):
            self._poller.unregister(fd)
            self._owners.pop(fd, None)
        worker.close(force=force)
        self.workers[worker_id] = None
        return worker

    def _step_of(self, worker_id, step):
        if self._progress is None:
            return step
        return self._progress(worker_id)[2]

    def _replace(self, worker_id, step, reason):
        """Replace a dead (or hung: killed first) worker and give it the operation in flight.

        A replacement that itself dies while starting is replaced again, within the budget.
        """
        while True:
            worker = self._retire(worker_id, force=True)
            exitcode, tail = worker.process.exitcode, worker.stderr_tail()
            self._budget_used += 1
            step = self._step_of(worker_id, step)
            self.restarts.append(dict(worker=worker_id, step=step, reason=reason,
                                      exitcode=exitcode, stderr_tail=tail))
            if self._budget_used > self.max_restarts:
                if reason == "timeout":
                    raise WorkerTimeoutError([worker_id], self.timeout_s, step)
                raise WorkerCrashedError(worker_id, exitcode, tail)
            self._launch(worker_id, first=False)
            try:
                self._await_ready(worker_id)
                break
            except WorkerCrashedError:
                reason = "died while starting"
        op, _, payload = self._current
        try:
            send_message(self.workers[worker_id].command.fileno(), op, payload)
        except BrokenPipeError:
            pass  # died again at once: its sentinel is ready and the wait loop replaces it

    def reset_restart_budget(self):
        self._budget_used = 0

    # -- running operations ----------------------------------------------------------------------
    def run(self, op, step=None, payload=b""):
        """Send ``op`` to every worker and wait until all have answered."""
        self._current = (op, step, payload)
        try:
            for worker in self.workers:
                try:
                    send_message(worker.command.fileno(), op, payload)
                except BrokenPipeError:
                    pass  # it died; its sentinel is ready and _wait_all replaces it
            self._wait_all(step)
        except BaseException:
            self.close()
            raise

    def attach_data(self, data):
        """Tell every worker to map a new data block (pickled spec: rare, never per step)."""
        self._data_spec = data.spec
        self.run(ATTACH_DATA, payload=pickle.dumps(data.spec))

    def _wait_all(self, step):
        pending = set(range(len(self.workers)))
        watch = _HangWatch(self.timeout_s, self._progress)
        while pending:
            timeout_ms = watch.poll_ms()
            if self._tick is not None:
                timeout_ms = self._tick_ms if timeout_ms is None else min(timeout_ms, self._tick_ms)
            events = self._poller.poll(timeout_ms)
            if not events:
                if self._tick is not None:
                    self._tick()
                for worker_id in watch.hung(pending):
                    self._replace(worker_id, step, "timeout")
                    watch.forget(worker_id)
                continue
            # Answers first: a worker may answer and exit in the same instant.
            for fd, _ in sorted(events, key=lambda event: self._owners.get(event[0], (0, 1))[1]):
                if fd not in self._owners:
                    continue  # belonged to a worker replaced earlier in this loop
                worker_id, is_sentinel = self._owners[fd]
                if is_sentinel:
                    self._replace(worker_id, step, "died")
                    watch.forget(worker_id)
                    pending.add(worker_id)
                    continue
                try:
                    status, payload = receive_message(fd)
                except EOFError:
                    continue  # it died mid-answer; the sentinel event follows
                pending.discard(worker_id)
                if status == FAILED:
                    raise WorkerError(worker_id, payload.decode(errors="replace"))

    def close(self):
        """Stop every worker (politely, then by force) and close the pipes. Safe to call twice."""
        if self._abort is not None and any(self.workers):
            self._abort()
        for worker in self.workers:
            if worker is not None:
                try:
                    send_message(worker.command.fileno(), STOP)
                except (OSError, ValueError):
                    pass
        for worker_id, worker in enumerate(self.workers):
            if worker is not None:
                self._retire(worker_id, force=False)
        shutil.rmtree(self.log_directory, ignore_errors=True)


class InProcessExecutor:
    """Runs the worker maths in this process (num_processes=1), answering the pool's calls.

    This process then keeps freed memory for reuse, as every worker does
    (``engine.parallel.system.keep_freed_memory``): otherwise glibc returns a step's large
    temporaries to the OS and the next step faults them in again (the MNIST-1D CNN's steps took
    twice as long).
    """

    def __init__(self, core):
        keep_freed_memory()
        self.core, self.restarts, self.pids, self.timeout_s = core, [], [], None

    def run(self, op, step=None):
        self.core.run(op)

    def attach_data(self, data):
        self.core.data = data
        self.core._rows_buffer = None

    def reset_restart_budget(self):
        pass

    def close(self):
        self.core = None


class _HangWatch:
    """Which pending workers made no progress (no heartbeat, not waiting at a barrier) for
    ``timeout_s``; without a progress source, all of them once ``timeout_s`` has passed."""

    def __init__(self, timeout_s, progress):
        self.timeout_s, self.progress = timeout_s, progress
        self._seen = {}  # worker -> (heartbeat, time it last changed or was seen waiting)
        self._started = time.monotonic()

    def poll_ms(self):
        if self.timeout_s is None:
            return None
        return 1000 * min(self.timeout_s / 4, 1.0) if self.progress else 1000 * max(
            0.0, self._started + self.timeout_s - time.monotonic())

    def forget(self, worker_id):
        self._seen.pop(worker_id, None)
        if self.progress is None:
            self._started = time.monotonic()

    def hung(self, pending):
        if self.timeout_s is None:
            return []
        now = time.monotonic()
        if self.progress is None:
            return sorted(pending) if now - self._started >= self.timeout_s else []
        hung = []
        for worker_id in sorted(pending):
            beat, waiting, _ = self.progress(worker_id)
            last_beat, since = self._seen.get(worker_id, (None, now))
            if waiting or beat != last_beat:
                since = now
            self._seen[worker_id] = (beat, since)
            if now - since >= self.timeout_s:
                hung.append(worker_id)
        return hung
