"""Shared-memory blocks that the processor owns and its workers map.

Ownership protocol
------------------
* Only the owner (the process that built the ParallelBatchProcessor) creates and unlinks blocks.
  Workers attach by name, map, and close their mapping; they never unlink.
* A block's name is ``engine_<owner pid>_<namespace>_<random>_<purpose>``. ``<namespace>`` hashes
  the boot id and the owner's PID namespace: a PID means something only within one namespace and
  one boot, so a start-up sweep removes a block only if it carries *our* namespace token, is owned
  by our uid, and its PID is not alive (a container sharing ``/dev/shm`` with the host, or another
  user, never has its blocks touched). Worker log folders (``log_directory_prefix``) follow the
  same rule.
* Blocks are created with mode 0600 (``O_EXCL``, so a name is never reused by accident), and their
  pages are reserved at creation (``posix_fallocate``): a full ``/dev/shm`` then fails there, with
  a message, instead of killing a process with SIGBUS at its first write to a missing page.
* With ``ENGINE_SHM_DIR`` set, blocks are ordinary files in that directory (file-backed, for a
  machine whose ``/dev/shm`` is small, e.g. Docker's 64 MB). Their name is then the file's full
  path, so a worker started by fork, spawn or forkserver attaches without reading the environment.
* The owner unlinks on ``close()``; ``weakref.finalize`` also unlinks at interpreter exit or when
  the owner is garbage collected, so an exception or Ctrl-C leaves nothing behind.
We use ``_posixshmem`` directly rather than ``multiprocessing.shared_memory`` because the latter's
resource tracker also registers blocks that workers merely attach to and unlinks them behind the
owner's back (CPython issue 82300, fixed only in 3.13 with ``track=False``).
"""
import errno
import hashlib
import mmap
import os
import re
import secrets
import shutil
import stat
import tempfile
import weakref

import numpy as np
import psutil

from engine.core.errors import EngineError

try:
    import _posixshmem
except ImportError:  # pragma: no cover - non-POSIX platforms
    _posixshmem = None

__all__ = ["SharedBlock", "SharedMemoryFullError", "check_shared_memory_space",
           "shared_memory_directory", "log_directory_prefix", "sweep_orphaned_blocks",
           "blocks_of"]

PREFIX = "engine_"
SHM_DIRECTORY = "/dev/shm"
SHM_DIR_VARIABLE = "ENGINE_SHM_DIR"
_BLOCK_NAME = re.compile(r"^engine_(\d+)_([0-9a-f]{8})_[0-9a-f]{8}_\w+$")
_LOG_NAME = re.compile(r"^engine_(\d+)_([0-9a-f]{8})_logs_\w+$")
_PAGE = mmap.PAGESIZE


class SharedMemoryFullError(EngineError, MemoryError):
    """The shared-memory file system cannot hold the run's blocks; nothing was left behind."""

    def __init__(self, needed_bytes, free_bytes, directory):
        self.needed_bytes, self.free_bytes, self.directory = needed_bytes, free_bytes, directory
        mib = 1 << 20
        where = directory or SHM_DIRECTORY
        super().__init__(
            f"shared memory is too small: this run needs {needed_bytes / mib:.1f} MiB in {where} "
            f"but only {free_bytes / mib:.1f} MiB is free. Enlarge it (Docker: docker run "
            f"--shm-size={_suggested_size(needed_bytes)} ...), or put the blocks in a directory "
            f"on a larger file system with {SHM_DIR_VARIABLE}=/path/to/dir (the CLI's --shm-dir), "
            "or use a smaller data set, model or num_processes.")


def _suggested_size(needed_bytes):
    return f"{max(1, -(-int(needed_bytes * 1.5) // (1 << 30)))}g"


def _require_posix():
    if _posixshmem is None:
        raise OSError("shared memory needs a POSIX system (Linux or macOS). Use num_processes=1 "
                      f"to train in-process, or set {SHM_DIR_VARIABLE} for file-backed blocks.")


def shared_memory_directory():
    """The directory named by ``ENGINE_SHM_DIR`` (file-backed blocks), or None for POSIX shm.

    Raises:
        ValueError: if the variable names something other than an existing, writable directory.
    """
    directory = os.environ.get(SHM_DIR_VARIABLE) or None
    if directory is None:
        return None
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{SHM_DIR_VARIABLE} must name an existing directory this user can "
                         f"write to. Received: {SHM_DIR_VARIABLE}={directory!r}. Create it, or "
                         "unset the variable to use /dev/shm.")
    return directory


def free_shared_memory_bytes(directory=None):
    """Bytes an unprivileged user may still place in ``directory`` (default: where blocks go)."""
    directory = directory or shared_memory_directory() or SHM_DIRECTORY
    info = os.statvfs(directory)
    return info.f_bavail * info.f_frsize


def check_shared_memory_space(*sizes):
    """Raise SharedMemoryFullError unless blocks of ``sizes`` bytes all fit where blocks go.

    Call it with every block a run will create before creating the first one. Each size is
    rounded up to whole pages, as the file system allocates them. Returns the free bytes.
    Raises:
        SharedMemoryFullError: with the bytes needed, the bytes free and the fixes.
    """
    directory = shared_memory_directory()
    if directory is None and not os.path.isdir(SHM_DIRECTORY):
        return None  # macOS: POSIX shm has no directory to measure; creation still reserves
    needed = sum(-(-max(int(size), 1) // _PAGE) * _PAGE for size in sizes)
    free = free_shared_memory_bytes(directory)
    if needed > free:
        raise SharedMemoryFullError(needed, free, directory)
    return free


def namespace_token():
    """8 hex digits naming this boot and this PID namespace (see the module docstring)."""
    parts = []
    for path, read in (("/proc/sys/kernel/random/boot_id", _read_text),
                       ("/proc/self/ns/pid", os.readlink)):
        try:
            parts.append(read(path))
        except OSError:
            parts.append("")
    if not any(parts):  # no /proc (macOS): the host name stands in for the namespace
        parts.append(os.uname().nodename)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


def _read_text(path):
    with open(path) as f:
        return f.read().strip()


def log_directory_prefix():
    """``tempfile.mkdtemp(prefix=...)`` of a worker log folder that the sweep can recognise."""
    return f"{PREFIX}{os.getpid()}_{namespace_token()}_logs_"


def _unlink_quietly(name):
    try:
        if os.sep in name:
            os.unlink(name)
        else:
            _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def _reserve(fd, size, directory):
    """Allocate every page now, so a full file system fails here and not with SIGBUS later."""
    if not hasattr(os, "posix_fallocate"):  # macOS: ftruncate is all there is
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            free = free_shared_memory_bytes(directory) if directory or os.path.isdir(
                SHM_DIRECTORY) else 0
            raise SharedMemoryFullError(size, free, directory) from None
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


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
        """Create a new zero-filled block of ``size`` bytes owned by this process.

        The block lives in POSIX shared memory, or in ``ENGINE_SHM_DIR`` when that is set.
        Raises:
            SharedMemoryFullError: if the file system cannot hold ``size`` more bytes.
        """
        size = max(int(size), 1)
        directory = shared_memory_directory()
        name = f"{PREFIX}{os.getpid()}_{namespace_token()}_{secrets.token_hex(4)}_{purpose}"
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR
        if directory is not None:
            name = os.path.join(directory, name)
            fd = os.open(name, flags | os.O_NOFOLLOW, 0o600)
        else:
            _require_posix()
            fd = _posixshmem.shm_open("/" + name, flags, mode=0o600)
        try:
            os.ftruncate(fd, size)
            _reserve(fd, size, directory)
        except BaseException:
            os.close(fd)
            _unlink_quietly(name)
            raise
        return cls(name, size, owner=True, fd=fd)

    @classmethod
    def attach(cls, name, size):
        """Map an existing block created by the owner (a name with a ``/`` is a file path)."""
        if os.sep in name:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW)
        else:
            _require_posix()
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        return cls(name, size, owner=False, fd=fd)

    def array(self, shape, dtype, offset=0):
        """A numpy view of ``shape``/``dtype`` starting ``offset`` bytes into the block."""
        return np.ndarray(shape, dtype=dtype, buffer=self._mmap, offset=offset)

    def unmap_pages(self, offset, size):
        """Drop this process's mappings of the pages of bytes [offset, offset + size).

        The contents stay in the shared memory (the block is a shared mapping): the next read of
        a dropped page maps it again, a minor fault with no copy. It only stops this process's
        resident size (RSS) from counting pages it no longer reads; where the system refuses,
        the pages simply stay mapped.
        """
        page = mmap.PAGESIZE
        start = offset // page * page
        stop = min(-(-(offset + size) // page) * page, self.size)
        if stop > start:
            try:
                self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)
            except OSError:
                pass

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


def _orphaned(folder, name, pattern, kind):
    """True only if ``folder/name`` is provably ours and its owner provably gone."""
    match = pattern.match(name)
    if match is None or match.group(2) != namespace_token():
        return False  # another naming, or another PID namespace or boot: its PID means nothing
    info = os.stat(os.path.join(folder, name), follow_symlinks=False)
    if info.st_uid != os.geteuid() or not kind(info.st_mode):
        return False
    pid = int(match.group(1))
    return pid != os.getpid() and not psutil.pid_exists(pid)


def _sweep(folder, pattern, kind, remove):
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        try:
            if _orphaned(folder, name, pattern, kind):
                remove(os.path.join(folder, name))
                removed.append(name)
        except OSError:
            continue  # vanished meanwhile, or not ours to touch: never a reason to fail a start
    return removed


def _remove_tree(path):
    shutil.rmtree(path)


def sweep_orphaned_blocks():
    """Remove our uid's engine blocks and worker log folders whose owner no longer exists.

    Only entries with this module's exact naming, this PID namespace's token, and our uid are
    considered; anything else, and any OSError, is skipped. Returns the names of blocks removed.
    """
    removed = _sweep(SHM_DIRECTORY, _BLOCK_NAME, stat.S_ISREG, os.unlink)
    try:
        directory = shared_memory_directory()
    except ValueError:
        directory = None
    if directory is not None and os.path.realpath(directory) != SHM_DIRECTORY:
        removed += [os.path.join(directory, name) for name in
                    _sweep(directory, _BLOCK_NAME, stat.S_ISREG, os.unlink)]
    _sweep(tempfile.gettempdir(), _LOG_NAME, stat.S_ISDIR, _remove_tree)
    return removed


def blocks_of(pid=None):
    """Names of the engine blocks owned by ``pid`` (any owner when None): those in /dev/shm, and
    those in ``ENGINE_SHM_DIR`` (as full paths) when it is set."""
    prefix = PREFIX if pid is None else f"{PREFIX}{pid}_"
    found = []
    if os.path.isdir(SHM_DIRECTORY):
        found += [name for name in os.listdir(SHM_DIRECTORY) if name.startswith(prefix)]
    directory = os.environ.get(SHM_DIR_VARIABLE)
    if directory and os.path.isdir(directory) and \
            os.path.realpath(directory) != SHM_DIRECTORY:
        directory = os.path.abspath(directory)
        found += [os.path.join(directory, name) for name in os.listdir(directory)
                  if name.startswith(prefix)]
    return sorted(found)
