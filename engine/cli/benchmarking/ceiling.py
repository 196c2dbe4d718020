"""The host's own ceiling for a data-parallel split: N processes that never exchange anything.

Each of N forked processes (one BLAS thread each) runs, for every batch of an epoch, the model's
forward and backward pass on its shard of the batch (the engine's split, the same seeded row
order), and the engine's Adam kernel on its 1/N of the values, out of place as the engine does.
Nothing is averaged, nobody waits for anybody: what is left is what N busy cores of this host
compute against one (a shared L3, memory bandwidth, clock speed under load) and the fixed cost of
a smaller step. A data-parallel engine with free synchronization would reach this rate; the
engine's rate over it is how much of the host's ceiling it keeps. ``engine bench scaling`` and
the repository's ``benchmarks/scaling.py`` and ``benchmarks/vs_peers.py`` run it.
"""
import time
import traceback

import multiprocess
import numpy as np

from engine.core.optim import Adam
from engine.core.protocol import loss_and_grads_options
from engine.core.sharding import split_batch


def _child(connection, *args):
    """Run epochs until told to stop; a failure goes back to the parent as its traceback."""
    try:
        _epochs(connection, *args)
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        connection.send(("failed", traceback.format_exc()))


def _epochs(connection, index, count, model, batch_size, examples, labels, learning_rate):
    from threadpoolctl import threadpool_limits

    from engine.parallel.system import keep_freed_memory
    threadpool_limits(limits=1)
    keep_freed_memory()  # as an engine worker does
    state, adam = model.init_state(seed=0), Adam()  # the engine's optimizer, as in scaling.py
    layout, size = state.layout, state.buffer.size
    versions = [state.buffer.copy(), state.buffer.copy()]
    states = [type(state).from_buffer(layout, version) for version in versions]  # views, once
    moments = [np.zeros((adam.num_buffers, size), np.float32) for _ in versions]
    flat_grads = np.zeros(size, np.float32)
    grads, _ = layout.views(flat_grads)
    takes_out = loss_and_grads_options(model)[1]
    bounds = split_batch(layout.num_weights, count)
    start, stop = int(bounds[index]), int(bounds[index + 1])
    x = np.empty((batch_size,) + examples.shape[1:], np.float32)
    y = np.empty(batch_size, np.int64)
    splits, step = {}, 0
    while True:
        order = connection.recv()
        if order is None:
            return
        times = []
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            shard = splits.get(len(rows))
            if shard is None:
                shard = splits[len(rows)] = split_batch(len(rows), count)
            mine = rows[shard[index]:shard[index + 1]]
            began = time.perf_counter()
            if len(mine):
                examples.take(mine, axis=0, out=x[:len(mine)])
                labels.take(mine, out=y[:len(mine)])
                if takes_out:
                    model.loss_and_grads(states[step % 2], x[:len(mine)], y[:len(mine)],
                                         out=grads)
                else:  # copied as the engine's worker copies them into its slot
                    returned = model.loss_and_grads(states[step % 2], x[:len(mine)],
                                                    y[:len(mine)])[1]
                    for name, target in grads.items():
                        np.copyto(target, returned[name])
                following = (step + 1) % 2
                adam.update_into(versions[following], moments[following], versions[step % 2],
                                 moments[step % 2], flat_grads, start, stop, learning_rate,
                                 step + 1, 1.0)
            step += 1
            times.append(time.perf_counter() - began)
        connection.send(("done", times))


class IndependentRunner:
    """The ceiling as one more configuration of the scaling run (``Runner``'s interface)."""

    ceiling = True

    def __init__(self, label, num_processes, model, batch_size, learning_rate, seed=0):
        self.label, self.num_processes, self.blas_limit = label, num_processes, 1
        self.model, self.batch_size, self.learning_rate = model, batch_size, learning_rate
        self.blas_threads, self.epochs = 1, []
        self._rng = np.random.default_rng(seed)
        self._children = None

    def _start(self, examples, labels):
        context = multiprocess.get_context("fork")  # the children inherit the data set
        self._children = []
        for index in range(self.num_processes):
            ours, theirs = context.Pipe()
            process = context.Process(target=_child, daemon=True, args=(
                theirs, index, self.num_processes, self.model, self.batch_size, examples, labels,
                self.learning_rate))
            process.start()
            theirs.close()
            self._children.append((process, ours))

    def epoch(self, examples, labels):
        if self._children is None:
            self._start(examples, labels)
        order = self._rng.permutation(len(examples))
        began = time.perf_counter()
        for _, connection in self._children:
            connection.send(order)
        times = np.array([self._answer(index, process, connection)
                          for index, (process, connection) in enumerate(self._children)])
        seconds = time.perf_counter() - began
        compute = times.mean(axis=0)  # per step (the processes do not wait for each other)
        zeros = np.zeros_like(compute).tolist()
        return dict(seconds=seconds, samples_per_s=len(examples) / seconds, steps=len(compute),
                    compute_s=compute.tolist(), sync_s=zeros, wait_s=zeros,
                    wall_s=compute.tolist(), outside_steps_s=seconds - float(compute.sum()),
                    mean_loss=float("nan"))

    def _answer(self, index, process, connection):
        """One process's step times for the epoch, or an error saying why it has none."""
        try:
            status, payload = connection.recv()
        except (EOFError, OSError):
            process.join(timeout=5)
            status, payload = "failed", f"it exited with code {process.exitcode} (killed, or " \
                                        "out of memory?) before answering"
        if status != "done":
            self.close()
            raise RuntimeError(f"host-ceiling process {index} of {self.num_processes} failed, so "
                               f"the ceiling of {self.label!r} cannot be measured: {payload}")
        return payload

    def pids(self):
        """The processes' ids (none before the first epoch starts them)."""
        return [process.pid for process, _ in self._children or ()]

    def close(self):
        for process, connection in self._children or ():
            try:
                connection.send(None)
            except OSError:
                pass
        for process, connection in self._children or ():
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
            connection.close()
        self._children = None
