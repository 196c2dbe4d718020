"""What keeps an MPI job from hanging or leaking when a rank fails (used by ``cluster``).

* ``Watchdog``: MPI calls cannot be interrupted, so a thread holds a deadline over each blocking
  one. Past it, or on a SIGTERM/SIGINT while the main thread is blocked inside MPI (where no
  Python handler can run), it unlinks this process's shared memory and worker log folders, kills
  its workers and ``os._exit``s; the launcher then ends the job. While armed, Python's signal
  wakeup fd points at a pipe this thread watches (the C-level handler writes the signal number
  there from whichever thread received it).
* ``register_abort``: after a failure, or an uncaught exception (as ``python -m mpi4py`` does),
  the process calls ``MPI_Abort`` at exit instead of ``MPI_Finalize``, which would wait forever
  for the dead peer or make the others wait for their timeout.
"""
import atexit
import gc
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref

import psutil

from engine.parallel.shm import PREFIX, _unlink_quietly, blocks_of


def _abort_at_exit(comm, code):
    # Finalizers still pending (a processor never closed) release their shared memory first:
    # MPI_Abort ends this process before the interpreter would run them.
    gc.collect()
    exit_finalizers = getattr(weakref.finalize, "_exitfunc", None)
    if exit_finalizers is not None:
        exit_finalizers()
    sys.stdout.flush()
    sys.stderr.flush()
    comm.Abort(code)


_hooked = _abort_registered = False


def register_abort(comm):
    global _abort_registered
    if not _abort_registered:
        _abort_registered = True
        atexit.register(_abort_at_exit, comm, 1)


def abort_on_uncaught_exception(comm):
    """An exception that ends this rank's script aborts the job (as ``python -m mpi4py`` does):
    MPI_Finalize would otherwise wait for peers that wait for this rank until their timeout."""
    global _hooked
    if _hooked:
        return
    _hooked, previous = True, sys.excepthook

    def hook(kind, value, traceback):
        previous(kind, value, traceback)
        register_abort(comm)

    sys.excepthook = hook


class Watchdog:
    """Ends this process when a blocking MPI call outlives its deadline or a SIGTERM/SIGINT comes
    while the main thread is blocked inside MPI (where no Python signal handler can run).

    While armed, Python's signal wakeup fd points at a pipe that this thread watches: the C-level
    signal handler writes the signal number there from whichever thread received it.
    """

    def __init__(self, cluster):
        self._cluster = cluster
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        os.set_blocking(self._read, False)
        self._condition = threading.Condition()
        self._deadline = self._what = None
        self._stopped = False
        self._thread = threading.Thread(target=self._watch, name="engine-cluster-watchdog",
                                        daemon=True)
        self._thread.start()

    def guard(self, deadline, what):
        return _Guard(self, deadline, what)

    def _arm(self, deadline, what):
        try:
            os.read(self._read, 4096)  # a signal byte left from an earlier call is stale
        except BlockingIOError:
            pass
        with self._condition:
            self._deadline, self._what = deadline, what
            self._condition.notify()

    def shorten(self, deadline):
        """Bring an armed deadline forward to ``deadline`` (no effect when nothing is armed)."""
        with self._condition:
            if self._deadline is not None and deadline < self._deadline:
                self._deadline = deadline
                self._condition.notify()

    def _disarm(self):
        with self._condition:
            self._deadline = self._what = None

    def _watch(self):
        while True:
            with self._condition:
                while self._deadline is None and not self._stopped:
                    self._condition.wait()
                if self._stopped:
                    return
                deadline, what = self._deadline, self._what
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._read], [], [], max(0.0, min(remaining, 0.05)))
            if ready:
                try:
                    numbers = os.read(self._read, 64)
                except BlockingIOError:
                    numbers = b""
                for number in numbers:
                    if number in (signal.SIGTERM, signal.SIGINT) and self._still(deadline):
                        _stop_now(128 + number, f"rank {self._cluster.rank}: "
                                  f"{signal.Signals(number).name} during {what}; stopping.")
            elif time.monotonic() > deadline and self._still(deadline):
                _stop_now(1, f"rank {self._cluster.rank} on {self._cluster.host}: {what} did "
                          f"not finish within timeout_s={self._cluster.timeout_s} although every "
                          "rank had arrived: a peer died or the network failed during the "
                          "transfer. The launcher's output names a rank that died.")

    def _still(self, deadline):
        with self._condition:
            return self._deadline == deadline

    def stop(self):
        with self._condition:
            self._stopped = True
            self._condition.notify()


class _Guard:
    """Arms the watchdog (and the signal pipe) around one blocking MPI call."""

    def __init__(self, watchdog, deadline, what):
        self.watchdog, self.deadline, self.what = watchdog, deadline, what
        self.previous_fd = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous_fd = signal.set_wakeup_fd(self.watchdog._write,
                                                    warn_on_full_buffer=False)
        self.watchdog._arm(self.deadline, self.what)

    def __exit__(self, *exc_info):
        self.watchdog._disarm()
        if self.previous_fd is not None:
            signal.set_wakeup_fd(self.previous_fd)


def _stop_now(code, message):
    """Leave nothing behind, from a thread, while the main thread is stuck inside MPI: unlink
    this process's shared memory and worker log folders, kill its workers, exit at once."""
    pid = os.getpid()
    for name in blocks_of(pid):
        _unlink_quietly(name)
    temporary = tempfile.gettempdir()
    for name in os.listdir(temporary):
        if name.startswith(f"{PREFIX}{pid}_") and "_logs_" in name:
            shutil.rmtree(os.path.join(temporary, name), ignore_errors=True)
    children = psutil.Process(pid).children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=2)
    try:
        os.write(2, f"ClusterError: {message}\n".encode())
    finally:
        os._exit(code)
