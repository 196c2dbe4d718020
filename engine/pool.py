"""Persistent worker processes: start, send an operation to all, wait for all, tear down.

The owner waits on the answer pipes *and* the process sentinels together (``connection.wait``, a
blocking poll), so a worker that dies is noticed at once, and nothing spins while workers compute.
Any failure tears the whole pool down before the exception reaches the caller: no half-alive pool,
no orphan process.
"""
import os
import pickle
import select
import sys
import time
from contextlib import contextmanager

import multiprocess

from engine.errors import WorkerCrashedError, WorkerError, WorkerTimeoutError
from engine.worker import ATTACH_DATA, FAILED, STOP, receive_message, send_message, worker_main

_STARTUP_TIMEOUT_S = 300.0
_JOIN_TIMEOUT_S = 3.0


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


class WorkerPool:
    """``num_workers`` processes running :func:`engine.worker.worker_main` on a shared workspace."""

    def __init__(self, spec, num_workers, start_method, timeout_s=None):
        self.timeout_s = timeout_s
        self.processes, self.commands, self.answers = [], [], []
        self._poller, self._owners = None, {}
        context = multiprocess.get_context(start_method)
        try:
            with _thread_environment(spec["threads"], start_method):
                for worker_id in range(num_workers):
                    command_read, command_write = context.Pipe(duplex=False)
                    answer_read, answer_write = context.Pipe(duplex=False)
                    process = context.Process(target=worker_main, name=f"engine-worker-{worker_id}",
                                              args=(worker_id, spec, command_read, answer_write),
                                              daemon=True)
                    process.start()
                    # Drop our copies of the child's ends so a dead peer shows up as EOF.
                    command_read.close()
                    answer_write.close()
                    self.processes.append(process)
                    self.commands.append(command_write)
                    self.answers.append(answer_read)
            self._wait_all(step="startup", timeout_s=max(_STARTUP_TIMEOUT_S, timeout_s or 0))
        except BaseException:
            self.close()
            raise

    @property
    def pids(self):
        return [process.pid for process in self.processes]

    def run(self, op, step=None, payload=b""):
        """Send ``op`` to every worker and wait until all have answered."""
        for command in self.commands:
            send_message(command.fileno(), op, payload)
        self._wait_all(step=step, timeout_s=self.timeout_s)

    def attach_data(self, data):
        """Tell every worker to map a new data block (pickled spec: rare, never per step)."""
        self.run(ATTACH_DATA, payload=pickle.dumps(data.spec))

    def _wait_all(self, step, timeout_s):
        if self._poller is None:
            self._poller = select.poll()
            for worker_id, (answer, process) in enumerate(zip(self.answers, self.processes)):
                self._owners[answer.fileno()] = (worker_id, False)
                self._owners[process.sentinel] = (worker_id, True)
                self._poller.register(answer.fileno(), select.POLLIN)
                self._poller.register(process.sentinel, select.POLLIN)
        pending = set(range(len(self.processes)))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while pending:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                events = self._poller.poll(None if remaining is None else remaining * 1000)
                if not events:
                    raise WorkerTimeoutError(sorted(pending), timeout_s, step)
                # Answers first: a worker may answer and exit in the same instant.
                for fd, _ in sorted(events, key=lambda event: self._owners[event[0]][1]):
                    worker_id, is_sentinel = self._owners[fd]
                    if is_sentinel:
                        if worker_id in pending:
                            self.processes[worker_id].join(_JOIN_TIMEOUT_S)
                            raise WorkerCrashedError(worker_id, self.processes[worker_id].exitcode)
                        continue
                    status, payload = receive_message(fd)
                    pending.discard(worker_id)
                    if status == FAILED:
                        raise WorkerError(worker_id, payload.decode(errors="replace"))
        except BaseException:
            self.close()
            raise

    def close(self):
        """Stop every worker (politely, then by force) and close the pipes. Safe to call twice."""
        for command in self.commands:
            try:
                send_message(command.fileno(), STOP)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(_JOIN_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self.commands + self.answers:
            connection.close()
        self.processes, self.commands, self.answers = [], [], []
        self._poller, self._owners = None, {}
