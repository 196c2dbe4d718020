"""The worker process: its entry point, the command loop, the owner watch and the stderr log.

Apart from ``engine.parallel.worker`` (the core and its pass maths) because only a worker process
needs it: with ``num_processes=1`` the in-process executor drives the same core without it.
A worker ignores SIGINT (the owner decides how to stop), and exits by itself when the owner dies.
"""
import faulthandler
import pickle
import select
import signal
import sys
import traceback

from engine.parallel import inherited
from engine.parallel import workspace as ws
from engine.parallel.barrier import owner_pid_alive
from engine.parallel.worker import (ATTACH_DATA, FAILED, OK, STOP, WorkerCore, receive_message,
                                    send_message)

_OWNER_CHECK_S = 1.0


def worker_main(worker_id, spec, command_pipe, answer_pipe):
    """Entry point of a worker process: attach, then serve operations until STOP or owner death."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log = _log_stderr(spec["log_path"])  # stays open while the worker lives (del at the end)
    inherited.forget(spec.get("forget_pages"))  # the caller's arrays: never read here
    from engine.parallel.system import (batch_scheduling, bind_to_cores, keep_freed_memory,
                                        limit_threads)
    bound = spec.get("cores") is not None and bind_to_cores(spec["cores"])
    thread_limit = limit_threads(spec["threads"])  # the limit lasts while it lives (del at the end)
    batch_scheduling()  # after the BLAS pool exists: its threads too
    keep_freed_memory()
    command_fd, answer_fd = command_pipe.fileno(), answer_pipe.fileno()
    work = ws.Workspace(spec["workspace"], shared=True, create=False)
    data = None if spec["data"] is None else ws.DataArrays(spec["data"], shared=True, create=False)
    core_class = WorkerCore
    if spec["faults"]:  # test-only: a subclass that strikes at planned points (engine.parallel.faults)
        from engine.parallel.faults import fault_injecting
        core_class = fault_injecting(WorkerCore, spec["faults"])
    core = core_class(worker_id, spec["model"], spec["layout"], spec["optimizer"], work, data,
                      sync=spec["sync"], owner_pid=spec["owner_pid"],
                      spin_s=spec["spin_s"] if bound else 0.0)
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
        del log, thread_limit  # dropped only now: held for the whole life of the worker


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
