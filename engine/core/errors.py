"""The engine's exception family.

Argument validation raises the built-in ``ValueError``/``TypeError`` at the public boundary; failures
that happen while training (a worker that raises, dies or hangs, a loss that stops being finite)
raise an ``EngineError`` subclass that carries what the caller needs to act on it.
"""


class EngineError(RuntimeError):
    """Base class of every runtime failure raised by the engine."""


class WorkerError(EngineError):
    """A worker raised an exception; ``remote_traceback`` holds the worker's traceback text."""

    def __init__(self, worker_id, remote_traceback):
        self.worker_id = worker_id
        self.remote_traceback = remote_traceback
        super().__init__(f"worker {worker_id} raised an exception. Its traceback:\n{remote_traceback}")


class WorkerCrashedError(EngineError):
    """A worker process died (killed, out of memory, segfault) instead of answering."""

    def __init__(self, worker_id, exitcode, stderr_tail=""):
        self.worker_id = worker_id
        self.exitcode = exitcode
        self.stderr_tail = stderr_tail
        how = f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
        message = f"worker {worker_id} died ({how})."
        if stderr_tail:
            message += f" Last lines of its stderr:\n{stderr_tail}"
        super().__init__(message)


class WorkerTimeoutError(EngineError):
    """A worker did not finish a step within ``timeout_s``."""

    def __init__(self, worker_ids, timeout_s, step):
        self.worker_ids = tuple(worker_ids)
        self.timeout_s = timeout_s
        self.step = step
        super().__init__(f"worker(s) {list(self.worker_ids)} did not finish step {step} within "
                         f"timeout_s={timeout_s}. Raise timeout_s if steps are legitimately slow.")


class NonFiniteLossError(EngineError):
    """The loss became NaN or infinite; ``last_good_state`` is the state before that step."""

    def __init__(self, step, loss, last_good_state, what="the loss is"):
        self.step = step
        self.loss = loss
        self.last_good_state = last_good_state
        super().__init__(f"{what} not finite at step {step} (loss={loss}). The state before this "
                         "step is kept in this exception's last_good_state. Lower the learning rate, "
                         "clip gradients (params['clip_norm']) or check the data for extreme values.")


class ClusterError(EngineError):
    """A rank died, hung or ran other steps; ``ranks`` names the ranks at fault (may be empty)."""

    def __init__(self, ranks, message):
        self.ranks = tuple(ranks)
        super().__init__(message)


class InsufficientMemoryError(EngineError, MemoryError):
    """The run cannot fit in the available memory; nothing was started."""

    def __init__(self, needed_bytes, available_bytes, num_workers):
        self.needed_bytes, self.available_bytes = needed_bytes, available_bytes
        super().__init__(f"this run needs at least {needed_bytes / 2**30:.2f} GiB (shared state, "
                         f"data and {num_workers} workers) but only {available_bytes / 2**30:.2f} "
                         "GiB is available. Use fewer processes, a smaller model or data set, or "
                         "free memory.")
