"""SIGTERM as a clean exit while a processor runs.

By default SIGTERM ends a Python process on the spot: no ``finally``, no ``with`` exit, no
finalizer, so worker processes linger until they notice and shared memory waits for the next
start's sweep. While at least one processor holds workers, SIGTERM instead raises
``SystemExit(143)`` in the main thread, which unwinds through the caller's ``with`` blocks (a
trainer writes its checkpoint there) and the processor's cleanup. A handler the application set
itself is left alone.
"""
import signal
import threading

_EXIT_CODE = 128 + signal.SIGTERM
_holders = 0
_previous = None


def _raise_system_exit(signum, frame):
    raise SystemExit(_EXIT_CODE)


def hold():
    """Install the SIGTERM handler (if SIGTERM still has its default action); counted."""
    global _holders, _previous
    if threading.current_thread() is not threading.main_thread():
        return False
    if _holders == 0:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return False
        _previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    _holders += 1
    return True


def release():
    """Undo one :func:`hold`; the default action comes back with the last one."""
    global _holders
    if _holders == 0:
        return
    _holders -= 1
    if _holders == 0 and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _previous)
