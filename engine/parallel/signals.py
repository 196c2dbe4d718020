"""SIGTERM and SIGHUP as a clean exit while a processor runs.

By default SIGTERM (``kill``, a container stop, a batch scheduler) and SIGHUP (the terminal or the
SSH session closing) end a Python process on the spot: no ``finally``, no ``with`` exit, no
finalizer, so worker processes linger until they notice and shared memory waits for the next
start's sweep. While at least one processor holds workers, each of these signals instead raises
``SystemExit(128 + signal number)`` (143, 129) in the main thread, which unwinds through the
caller's ``with`` blocks (a trainer writes its checkpoint there) and the processor's cleanup. A
handler the application set itself, or an ignored signal (``nohup``), is left alone.
"""
import signal
import threading

HANDLED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_holders = 0
_previous = {}


def _raise_system_exit(signum, frame):
    raise SystemExit(128 + signum)


def hold():
    """Install the handlers (for the signals that still have their default action); counted.

    Returns True if this call counts as a hold (then call :func:`release` once), else False.
    """
    global _holders
    if threading.current_thread() is not threading.main_thread():
        return False
    if _holders == 0:
        defaults = [signum for signum in HANDLED if signal.getsignal(signum) is signal.SIG_DFL]
        if not defaults:
            return False
        _previous.clear()
        for signum in defaults:
            _previous[signum] = signal.signal(signum, _raise_system_exit)
    _holders += 1
    return True


def release():
    """Undo one :func:`hold`; the default actions come back with the last one."""
    global _holders
    if _holders == 0:
        return
    _holders -= 1
    if _holders == 0 and threading.current_thread() is threading.main_thread():
        for signum, previous in _previous.items():
            if signal.getsignal(signum) is _raise_system_exit:
                signal.signal(signum, previous)
        _previous.clear()
