"""Shared-memory blocks that the processor owns and its workers map.

Ownership protocol
------------------
* Only the owner (the process that built the ParallelBatchProcessor) creates and unlinks blocks.
  Workers attach by name, map, and close their mapping; they never unlink.
* A block's name is ``engine_<owner pid>_<token>_<purpose>``: the owner's PID lets a later start
  find blocks whose owner died without cleaning up (SIGKILL, power loss) and sweep them.
* Blocks are created with mode 0600 (``O_EXCL``, so a name is never reused by accident).
* The owner unlinks on ``close()``; ``weakref.finalize`` also unlinks at interpreter exit or when
  the owner is garbage collected, so an exception or Ctrl-C leaves nothing in ``/dev/shm``.
We use ``_posixshmem`` directly rather than ``multiprocessing.shared_memory`` because the latter's
resource tracker also registers blocks that workers merely attach to and unlinks them behind the
owner's back (CPython issue 82300, fixed only in 3.13 with ``track=False``).
"""
import mmap
import os
import secrets
import shutil
import tempfile
import weakref

import numpy as np
import psutil

try:
    import _posixshmem
except ImportError:  # pragma: no cover - non-POSIX platforms
    _posixshmem = None

PREFIX = "engine_"
SHM_DIRECTORY = "/dev/shm"


def _require_posix():
    if _posixshmem is None:
        raise OSError("shared memory needs a POSIX system (Linux or macOS). Use num_processes=1 "
                      "to train in-process on this platform.")


def _unlink_quietly(name):
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


class SharedBlock:
    """A named block of shared memory holding numpy arrays.

    Create with :meth:`create` (the owner) or :meth:`attach` (a worker). ``close()`` unmaps, and on
    the owner also unlinks; it is safe to call more than once.
    """

    def __init__(self, name, size, owner, fd):
        self.name, self.size, self.owner = name, size, owner
        try:
            self._mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._finalizer = weakref.finalize(self, SharedBlock._release, self._mmap, name, owner)

    @classmethod
    def create(cls, purpose, size):
        """Create a new zero-filled block of ``size`` bytes owned by this process."""
        _require_posix()
        size = max(int(size), 1)
        name = f"{PREFIX}{os.getpid()}_{secrets.token_hex(4)}_{purpose}"
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            _unlink_quietly(name)
            raise
        return cls(name, size, owner=True, fd=fd)

    @classmethod
    def attach(cls, name, size):
        """Map an existing block created by the owner."""
        _require_posix()
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        return cls(name, size, owner=False, fd=fd)

    def array(self, shape, dtype, offset=0):
        """A numpy view of ``shape``/``dtype`` starting ``offset`` bytes into the block."""
        return np.ndarray(shape, dtype=dtype, buffer=self._mmap, offset=offset)

    @staticmethod
    def _release(mapping, name, owner):
        try:
            mapping.close()
        except BufferError:
            # numpy views still point into the mapping; the OS unmaps it when they die. Unlinking
            # below is what matters: it removes the name, and the memory goes with the last map.
            pass
        if owner:
            _unlink_quietly(name)

    def close(self):
        self._finalizer()

    @property
    def closed(self):
        return not self._finalizer.alive


def _owner_is_dead(name):
    owner = name[len(PREFIX):].split("_", 1)[0]
    return owner.isdigit() and not psutil.pid_exists(int(owner))


def sweep_orphaned_blocks():
    """Unlink engine blocks (and worker log folders) whose owner process no longer exists.

    Returns the names of the blocks removed.
    """
    removed = []
    if os.path.isdir(SHM_DIRECTORY):
        for name in os.listdir(SHM_DIRECTORY):
            if name.startswith(PREFIX) and _owner_is_dead(name):
                _unlink_quietly(name)
                removed.append(name)
    temporary = tempfile.gettempdir()
    for name in os.listdir(temporary):
        if name.startswith(PREFIX) and "_logs_" in name and _owner_is_dead(name):
            shutil.rmtree(os.path.join(temporary, name), ignore_errors=True)
    return removed


def blocks_of(pid=None):
    """Names of the engine blocks in /dev/shm owned by ``pid`` (any owner when None)."""
    if not os.path.isdir(SHM_DIRECTORY):
        return []
    prefix = PREFIX if pid is None else f"{PREFIX}{pid}_"
    return sorted(name for name in os.listdir(SHM_DIRECTORY) if name.startswith(prefix))
