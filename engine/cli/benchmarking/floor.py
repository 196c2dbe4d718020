"""The memory-copy floor of averaging: N forked processes each copying their share of the bytes.

Averaging P float32 values over N workers reads N*P and writes P values; a copy of (N+1)/2*P
values moves the same bytes. ``CopyFloor`` splits such a copy across N processes, started and
awaited with one byte each way through pipes (as the engine signals its workers), so the ratio of
the engine's time to the floor's isolates the averaging itself.

Protocol: the buffers are one anonymous shared mapping made before the fork (nothing in
/dev/shm, nothing to clean up). Each worker reads one byte from its command pipe: ``c`` copies its
share and answers ``k``; ``q`` (sent by ``close``) or end of file (the owner died) ends it.
"""
import mmap
import os

import numpy as np

from engine.core.sharding import partition

__all__ = ["CopyFloor"]


class CopyFloor:
    """``num_workers`` forked processes that copy 1/N each of ``num_values`` float32 on a signal.

    Args:
        num_values: float32 values copied in total per :meth:`run`.
        num_workers: processes (at least 1).
    Raises:
        OSError: where ``os.fork`` is not available.
    """

    def __init__(self, num_values, num_workers):
        self.num_values, self.num_workers = int(num_values), int(num_workers)
        self._mapping = mmap.mmap(-1, 2 * 4 * self.num_values)  # MAP_SHARED | MAP_ANONYMOUS
        buffers = np.frombuffer(self._mapping, np.float32).reshape(2, self.num_values)
        buffers[0] = 1.0  # touch every page before the fork: no page fault inside a timing
        buffers[1] = 0.0
        self._pids, self._commands, self._answers = [], [], []
        bounds = partition(self.num_values, self.num_workers)
        try:
            for worker in range(self.num_workers):
                command_read, command_write = os.pipe()
                answer_read, answer_write = os.pipe()
                pid = os.fork()
                if pid == 0:  # the child: copy on each signal until the owner closes the pipe
                    code = 0
                    try:
                        for fd in self._commands + self._answers + [command_write, answer_read]:
                            os.close(fd)
                        start, stop = int(bounds[worker]), int(bounds[worker + 1])
                        while os.read(command_read, 1) == b"c":
                            np.copyto(buffers[1, start:stop], buffers[0, start:stop])
                            os.write(answer_write, b"k")
                    except BaseException:
                        code = 1
                    finally:
                        os._exit(code)
                os.close(command_read)
                os.close(answer_write)
                self._pids.append(pid)
                self._commands.append(command_write)
                self._answers.append(answer_read)
        except BaseException:
            self.close()
            raise
        self._buffers = buffers

    def run(self):
        """Signal every worker and wait for all; returns the seconds it took."""
        import time
        began = time.perf_counter()
        for fd in self._commands:
            os.write(fd, b"c")
        for fd in self._answers:
            if os.read(fd, 1) != b"k":
                raise RuntimeError("a memory-copy floor process died; see its error above.")
        return time.perf_counter() - began

    def close(self):
        """Stop and reap the workers, release the mapping. Safe to call twice."""
        for fd in self._commands:  # an explicit stop: a process forked later may hold the pipes
            try:
                os.write(fd, b"q")
            except OSError:
                pass
        for fd in self._commands + self._answers:
            os.close(fd)
        self._commands, self._answers = [], []
        for pid in self._pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self._pids = []
        self._buffers = None
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:  # a view is still alive somewhere: the GC releases it later
                pass
            self._mapping = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
