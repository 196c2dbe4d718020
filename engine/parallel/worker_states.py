"""sync="states": a worker's local optimizer steps and the periodic average of the local states.

A mixin of ``engine.parallel.worker.WorkerCore`` (the protocol and recovery are described
there). It is apart from the gradients mode because the two passes share no step, only the
core's waits and shard helpers; its methods keep their names on the core class so that fault
injection (``engine.parallel.faults``) can override them.
"""
import time

import numpy as np

from engine.core.kernels import weighted_mean_into
from engine.parallel import workspace as ws

_STOPPED_BY_PEER = 2  # work.abort value: a peer found a non-finite value (states mode)


class StatesPass:
    """WorkerCore's sync="states" methods: they use the local state in the slot, the slices and
    pieces that ``WorkerCore.__init__`` sets up, and its barriers, waits and shard helpers."""

    def _states_pass(self):
        barriers, i, work, control = self.barriers, self.worker_id, self.work, self.work.control
        num_steps, base, rows, batch_size = self._plan()
        interval, since = int(control[ws.UPDATE_INTERVAL]), int(control[ws.SINCE_AVERAGE])
        end = int(control[ws.END_AVERAGE])
        self._recover_slot()
        k, j = barriers.count(ws.LOCAL_DONE, i), barriers.count(ws.AVERAGE_OUT, i)
        if control[ws.REFRESH] and k == 0 and j == 0:
            self._refresh()
        ends_off_cycle = (since + num_steps) % interval != 0
        while True:
            due = (since + k) // interval - since // interval
            if k == num_steps and end == ws.END_AVERAGE_STATES and ends_off_cycle:
                due += 1
            if j < due:
                self._average(j, into_params=True)
                j += 1
                continue
            if k == num_steps:
                break
            if work.abort[0]:
                return
            step = base + k
            self._beat(step)
            record = self.data.records[k, i]
            if not self._local_step(step, *self._shard(k, rows, batch_size), record):
                self._stop(k)
                work.abort[0] = _STOPPED_BY_PEER
                barriers.doorbell.ring()
                return
            k += 1
            barriers.arrive(ws.LOCAL_DONE, i, k, ring=False)
            self.results[ws.DIRTY] = 0.0
        if end == ws.END_MEAN_INTO_REDUCED and ends_off_cycle:
            self._average(j, into_params=False)

    def _local_step(self, step, start, stop, record):
        """One optimizer step of the local state on this worker's shard; False if not finite."""
        started = time.perf_counter()
        record[ws.R_STARTED] = started
        if stop == start:
            record[ws.R_LOSS] = record[ws.R_COUNT] = record[ws.R_NON_FINITE] = 0.0
            return True
        if self._local_flat is None:
            # Gradients and new theta gather here: in states mode the slot holds the local state.
            self._local_flat = np.empty(self.layout.size, np.float32)
            grads, self._local_theta = self.layout.views(self._local_flat)
            trainable = self.trainable.compact_views(self.layout,
                                                     np.empty(self.trainable.size, np.float32))[0]
            self._local_grads = {name: grads[name] for name in grads if name in trainable}
        x, y = self._rows(start, stop)
        loss, count = self._train_on_shard(self.local_state, x, y, step, self._local_grads,
                                           self._local_theta)
        record[ws.R_LOSS], record[ws.R_COUNT] = loss, count
        if not np.isfinite(loss):
            return False
        own_optimizer = self.work.optimizer[self.worker_id]
        self.results[ws.DIRTY] = ws.DIRTY_UPDATE
        learning_rate = self.data.step_learning_rates[step - int(self.work.control[ws.STEP])]
        non_finite = 0.0
        for start, stop in self.trainable.weight_ranges:  # frozen weights are never stepped
            non_finite += self.optimizer.update_into(
                self.slot, own_optimizer, self.slot, own_optimizer, self._local_flat, start, stop,
                learning_rate, step + 1, 1.0)
        record[ws.R_NON_FINITE] = non_finite
        self.slot[self.num_weights:] = self._local_flat[self.num_weights:]
        self.results[ws.SINCE_SYNC] += count
        record[ws.R_COMPUTE_S] = time.perf_counter() - started
        record[ws.R_ENDED] = time.perf_counter()
        self.examples_window.computed(record[ws.R_COMPUTE_S])
        return record[ws.R_NON_FINITE] == 0.0

    def _average(self, j, into_params):
        """Average number j of this pass: the example-weighted mean of the local states over this
        worker's slice into ``params`` (then the local state restarts from it), or into
        ``reduced`` (process_batch between averages: local states go on)."""
        barriers, i, work = self.barriers, self.worker_id, self.work
        if barriers.count(ws.AVERAGE_IN, i) <= j:
            barriers.arrive(ws.AVERAGE_IN, i, j + 1)
        self._wait(ws.AVERAGE_IN, j + 1)
        self._beat(int(self.results[ws.CURRENT_STEP]))
        counts = work.results[:, ws.SINCE_SYNC]
        coefficients = counts / counts.sum()
        for start, stop, _ in self.state_pieces:  # frozen weights are equal in every local state
            self._average_slice(work.params if into_params else work.reduced, coefficients, start,
                                stop)
        barriers.arrive(ws.AVERAGE_OUT, i, j + 1)
        self._wait(ws.AVERAGE_OUT, j + 1)
        if work.control[ws.CROSS_NODE]:
            barriers.always_ring = True
            self._wait_node(j + 1)  # the owner averages across nodes (engine.parallel.cross_node)
        if into_params:
            self._refresh()

    def _average_slice(self, out, coefficients, start, stop):
        weighted_mean_into(out, self.work.slots, coefficients, start, stop, False)

    def _refresh(self):
        results = self.results
        results[ws.DIRTY] = ws.DIRTY_REFRESH
        self.slot[:] = self.work.params
        results[ws.SINCE_SYNC] = 0.0
        results[ws.DIRTY] = 0.0

    def _recover_slot(self):
        """A replacement whose predecessor died writing its slot: restart it from the last
        average (after an interrupted update also with fresh optimizer state: local steps since
        the average are lost)."""
        dirty = self.results[ws.DIRTY]
        if dirty == ws.DIRTY_UPDATE:
            self.work.optimizer[self.worker_id].fill(0.0)
        if dirty:
            self._refresh()
