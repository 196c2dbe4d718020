"""Barriers in shared memory: a short bounded spin, then a sleep in the kernel (Linux futex).

Protocol
--------
Every worker owns one *arrival counter* per barrier kind (``arrivals[kind, worker]``, int64) that
only it writes: arriving is one store ``arrivals[kind, i] = n`` (the n-th time worker i reached
that kind of barrier in this pass). The barrier of round n is passed when every worker's counter
is at least n. Because a counter has a single writer, no atomic read-modify-write is needed, and
the counter doubles as the worker's progress record: a replacement worker reads its dead
predecessor's counters and knows exactly which phases it completed (see ``engine.parallel.worker``).

Sleeping: waiters sleep on one shared 32-bit *doorbell* word with ``FUTEX_WAIT``; an arriving
worker, after its store, rings it with ``FUTEX_WAKE_OP`` (the kernel adds 1 to the word atomically
and wakes every sleeper). A waiter reads the doorbell *before* checking the counters and sleeps
only while the doorbell still holds that value, so an arrival between its check and its sleep
makes the sleep return at once: no lost wake-up. (This relies on loads not being reordered with
older loads, true on x86-64; the kernel's atomic op is a full fence on the writer's side.)

Spinning: a waiter first polls for ``spin_s`` (default 300 us), which catches the common case of
workers arriving within a fraction of a step of each other without a system call; past it, it
sleeps, so a waiting worker never holds a core for long. Workers spin only on a core of their own
(``engine.parallel.worker``). Why not the 50 us of before: on the VMs measured here a vCPU that
sleeps is descheduled by the host, and the worker's next compute after the wake-up ran a few
percent slower (probably cold caches on whatever physical core it got back). Alternated round by
round (``benchmarks/barrier_spin.py``), 300 us trained the scaling MLP and CNN1D 1-9% faster
than 50 us in most runs (never more than 4% slower), and no spin at all 10-22% slower on the
CNN1D; 1 ms gained no more. A worker that waits longer for a slow peer spends at most its spin of
a core that would otherwise idle. ``ENGINE_BARRIER_SPIN_US`` sets it (microseconds; 0: sleep at
once), for a host whose cores other work needs. A spin that calls ``sched_yield`` was tried and
dropped: with a busy process on the same core the yield handed it whole time slices and halved
the engine's rate.
"""
import ctypes
import os
import platform
import time

import numpy as np

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine())
_FUTEX_WAIT, _FUTEX_WAKE, _FUTEX_WAKE_OP = 0, 1, 5
_FUTEX_OP_ADD, _FUTEX_OP_CMP_EQ = 1, 0
# FUTEX_OP(ADD, 1, CMP_EQ, 0): *word += 1, and a second wake if the old value was 0 (same word,
# already woken by the first: harmless).
_ADD_ONE = (_FUTEX_OP_ADD << 28) | (_FUTEX_OP_CMP_EQ << 24) | (1 << 12) | 0
_WAKE_ALL = 0x7FFFFFFF
DEFAULT_SPIN_S = 300e-6
SPIN_VARIABLE = "ENGINE_BARRIER_SPIN_US"

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _syscall = _libc.syscall
    _syscall.restype = ctypes.c_long
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _syscall = None


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def spin_seconds(environ=os.environ):
    """How long a worker on a core of its own polls before it sleeps: ``ENGINE_BARRIER_SPIN_US``
    (microseconds, 0 to 1e6) or 300 us. Read by the processor when it is made, which passes it
    to its workers."""
    text = environ.get(SPIN_VARIABLE, "").strip()
    if not text:
        return DEFAULT_SPIN_S
    try:
        microseconds = float(text)
    except ValueError:
        microseconds = float("nan")
    if not 0.0 <= microseconds <= 1e6:  # also false for NaN
        raise ValueError(f"{SPIN_VARIABLE} must be a number of microseconds from 0 to 1000000 "
                         f"(how long a waiting worker polls before it sleeps). Received: "
                         f"{SPIN_VARIABLE}={text!r}. Unset it for the default, 300.")
    return microseconds * 1e-6


def futex_available():
    return _syscall is not None and _SYS_FUTEX is not None


class Aborted(Exception):
    """Raised inside a worker when the owner aborted the pass while the worker waited."""


class Doorbell:
    """A 32-bit word in shared memory that waiters sleep on and arrivals ring."""

    def __init__(self, word):
        assert word.dtype == np.int32 and word.shape == (1,)
        self.word = word
        self._address = ctypes.c_void_p(word.ctypes.data)
        if not futex_available():  # pragma: no cover - not Linux
            raise OSError("shared-memory barriers need Linux futexes (x86-64 or aarch64). Use "
                          "num_processes=1 on this platform.")

    def value(self):
        return int(self.word[0])

    def ring(self):
        """Add one to the word (atomically, in the kernel) and wake every sleeper."""
        _syscall(_SYS_FUTEX, self._address, _FUTEX_WAKE_OP, _WAKE_ALL, _WAKE_ALL,
                 self._address, _ADD_ONE)

    def sleep(self, seen, timeout_s):
        """Sleep while the word still equals ``seen`` (returns at once otherwise), at most
        ``timeout_s``; spurious returns are fine, callers re-check their condition."""
        seconds = int(timeout_s)
        span = _Timespec(seconds, int((timeout_s - seconds) * 1e9))
        _syscall(_SYS_FUTEX, self._address, _FUTEX_WAIT, ctypes.c_int(seen), ctypes.byref(span),
                 None, 0)


class Barriers:
    """Arrival counters of every worker for every barrier kind, and the doorbell they share.

    Args:
        arrivals: int64 array (kinds, workers, 8): only ``[kind, worker, 0]`` is used; the padding
            keeps two workers' counters off one cache line.
        doorbell: int32 array of shape (1,). abort: int32 array of shape (1,): non-zero stops
            every waiter (it raises :class:`Aborted`).
    """

    def __init__(self, arrivals, doorbell, abort, spin_s=DEFAULT_SPIN_S, owner_pid=None):
        self.arrivals, self.abort, self.spin_s = arrivals, abort, spin_s
        self.owner_pid = owner_pid
        self.doorbell = Doorbell(doorbell)
        self.num_workers = arrivals.shape[1]
        self._counters = [arrivals[kind, :, 0] for kind in range(arrivals.shape[0])]
        self.always_ring = False  # set when another thread (the cross-node hop) may be waiting

    def count(self, kind, worker):
        return int(self.arrivals[kind, worker, 0])

    def arrive(self, kind, worker, round_number, ring=True):
        """Record that ``worker`` reached round ``round_number`` (1-based) of ``kind``; ``ring``
        wakes sleepers (False for progress records nobody waits on)."""
        self.arrivals[kind, worker, 0] = round_number
        if ring and (self.num_workers > 1 or self.always_ring):
            self.doorbell.ring()

    def passed(self, kind, round_number):
        counters = self._counters[kind]
        for worker in range(self.num_workers):  # a few scalar reads beat a numpy reduction
            if counters[worker] < round_number:
                return False
        return True

    def wait(self, kind, round_number, on_sleep=None, on_wake=None, only=None):
        """Return once every worker reached ``round_number`` of ``kind``; raise Aborted if the
        pass is aborted meanwhile. ``on_sleep``/``on_wake`` mark the worker as waiting (so the
        owner's hang detection does not blame a worker that waits for a slow peer). ``only``:
        wait for that one counter (the owner's NODE_DONE) instead of every worker's."""
        passed = self.passed if only is None else (
            lambda kind, number: self._counters[kind][only] >= number)
        if passed(kind, round_number):
            return
        deadline = time.perf_counter() + self.spin_s
        while time.perf_counter() < deadline:
            if passed(kind, round_number):
                return
        if on_sleep is not None:
            on_sleep()
        try:
            while True:
                seen = self.doorbell.value()
                if passed(kind, round_number):
                    return
                if self.abort[0]:
                    raise Aborted()
                self.doorbell.sleep(seen, 0.5)
                if self.owner_pid is not None and self.doorbell.value() == seen and \
                        not owner_pid_alive(self.owner_pid):
                    raise Aborted()  # nobody will replace a dead peer: leave the pass
        finally:
            if on_wake is not None:
                on_wake()

    def reset(self):
        """Zero every counter (the owner, between passes, while no worker runs)."""
        self.arrivals[...] = 0
        self.abort[0] = 0

    def abort_all(self):
        """Make every waiter raise Aborted (the owner, when it tears the pool down)."""
        self.abort[0] = 1
        self.doorbell.ring()


def owner_pid_alive(pid):
    """Whether process ``pid`` still runs. A zombie counts as gone: an owner that exited but whose
    own parent has not reaped it yet (a test waiting for the owner's output pipes, which its
    workers inherited) must not keep its workers alive, or both wait for each other forever."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): the signal test above is all there is
    return state not in (b"Z", b"X")
