"""One pass from the owner's side: plan it in shared memory, let the workers run it, finish it.

A mixin of ``ParallelBatchProcessor`` (its methods use the attributes the processor sets up),
apart from the setup because it is the other stage of a call: once the data and state are in
shared memory, this writes the pass's plan, runs the cross-node hop beside the workers when
there are nodes, rolls the optimizer back on failure, and turns the records into results
(``engine.parallel.pass_results``). The pool calls ``_tick`` and ``_worker_progress`` while a
pass runs.
"""
import math
import time

import numpy as np

from engine.core.errors import NonFiniteLossError
from engine.core.state import NetworkState
from engine.parallel import worker as ops
from engine.parallel import workspace as ws
from engine.parallel.cross_node import NodeHop
from engine.parallel.pass_results import collect_results, step_learning_rates


class ProcessorPass:
    """ParallelBatchProcessor's methods that run a pass (see the module docstring)."""

    def _run_pass(self, kind, rows, learning_rate, clip_norm, ordered, end, one_step=False):
        """Plan a pass in shared memory, let the workers run it, and collect its results."""
        began = time.perf_counter()
        work, data, control = self._work, self._data, self._work.control
        base = int(control[ws.STEP])
        num_steps = 1 if one_step else -(-rows // self.batch_size)
        control[ws.PASS_KIND], control[ws.NUM_STEPS], control[ws.ROWS] = kind, num_steps, rows
        control[ws.BATCH_SIZE] = rows if one_step else self.batch_size
        control[ws.ORDERED] = 1.0 if ordered else 0.0
        control[ws.CLIP_NORM] = math.nan if clip_norm is None else clip_norm
        control[ws.SINCE_AVERAGE], control[ws.END_AVERAGE] = self._steps_since_average, end
        if kind == ws.TRAIN:
            data.step_learning_rates[:num_steps] = step_learning_rates(learning_rate, base,
                                                                       num_steps)
            self._adjust_micro_batch(base, rows)
        data.records[:num_steps] = 0.0
        work.results[:, ws.STOP_STEP] = ws.NOT_STOPPED
        self._barriers.reset()
        self._executor.reset_restart_budget()
        # A failed call leaves the optimizer as it was at its start (the state is the caller's).
        saved_optimizer = work.optimizer.copy() if kind == ws.TRAIN else None
        hop = self._start_hop(kind, num_steps, clip_norm, end)
        ran = time.perf_counter()
        try:
            self._executor.run(ops.RUN_PASS, base)
            if hop is not None:
                hop.join()
        except BaseException:
            if hop is not None:  # make a collective the hop waits in give up, then let it go
                if hasattr(self.cluster, "interrupt"):
                    self.cluster.interrupt()
                hop.error = None
                try:
                    hop.join()
                except BaseException:  # noqa: BLE001 - the first error is the one raised
                    pass
            if self._work is not None and saved_optimizer is not None:
                self._set_step(base, saved_optimizer)
            self.close()
            raise
        ended = time.perf_counter()
        if self.timeline is not None:
            self.timeline.add_pass(data.records[:num_steps], kind, self.sync, base, began, ran,
                                   ended)
        restarts, self._executor.restarts = self._executor.restarts, []
        if kind == ws.TRAIN:
            self._finish_training_pass(base, num_steps, end)
        results = collect_results(data.records[:num_steps], data.step_learning_rates[:num_steps],
                                  kind, self.sync, ran, ended)
        if hop is not None and self.sync == "states":  # the nodes' losses, one exchange a pass
            counts = results["examples"].astype(np.float64)
            exchanged = np.concatenate([counts * results["loss"], counts]).astype(np.float32)
            self.cluster.mean_(exchanged, 1.0)  # every node weighs 1: the mean over nodes
            sums, totals = np.split(exchanged.astype(np.float64) * self.cluster.size, 2)
            results["loss"] = sums / np.maximum(totals, 1.0)
        if hop is not None:  # the global figures, same on every node
            done = len(hop.losses)
            results["loss"][:done], results["grad_norm"][:done] = hop.losses, hop.norms
            results["examples"][:] = [min(self.batch_size, rows - k * self.batch_size)
                                      for k in range(num_steps)]
            results["mean_loss"] = float(np.dot(results["loss"], results["examples"]) /
                                         results["examples"].sum())
        results["peak_rss_bytes"] = work.results[:, ws.PEAK_RSS].astype(np.int64)
        results["restarts"] = restarts
        results["micro_batch_changes"], self._micro_batch_changes = self._micro_batch_changes, []
        if kind == ws.EVALUATE:
            results["predictions"] = data.predictions[:rows].copy()
        return results

    def _start_hop(self, kind, num_steps, clip_norm, end):
        """The owner's cross-node thread for a training pass across nodes, or None."""
        control = self._work.control
        crossing = kind == ws.TRAIN and self._crosses_nodes()
        control[ws.CROSS_NODE] = 1.0 if crossing else 0.0
        # Evaluation runs the whole data on every node (nothing to exchange).
        control[ws.NODE_COUNT] = self.cluster.size if crossing else 1
        if not crossing:
            return None
        since, interval = self._steps_since_average, self.update_interval
        averages = (since + num_steps) // interval - since // interval
        if end != ws.END_NONE and (since + num_steps) % interval:
            averages += 1
        self._barriers.always_ring = True  # the owner's thread and the workers wait on each other
        hop = NodeHop(self.cluster, self._work, self._data, self._barriers)
        hop.start(num_steps, clip_norm, self.sync, averages,
                  into_reduced=end == ws.END_MEAN_INTO_REDUCED and (since + num_steps) % interval)
        return hop

    def _finish_training_pass(self, base, num_steps, end):
        work, records = self._work, self._data.records
        stops = work.results[:, ws.STOP_STEP]
        if np.any(stops >= 0):
            k = int(stops[stops >= 0].min())
            row = records[k]
            loss = float(np.dot(row[:, ws.R_COUNT], row[:, ws.R_LOSS]) / max(1, row[:, ws.R_COUNT].sum()))
            if not np.isfinite(loss):
                what = "the loss is"
            elif not np.all(np.isfinite(row[:, ws.R_SUM_SQUARES])):
                what = "the gradients are"
            else:
                what = "the updated parameters are"
            # Gradients mode: step k's update went into the next version, the current one is the
            # last good state. States mode: ``params`` holds the last average.
            work.control[ws.STEP] = base + k
            if self.sync == "states":
                work.control[ws.REFRESH] = 1.0
                self._steps_since_average = 0
            last_good = NetworkState.from_buffer(self._layout, work.params.copy())
            self._returned_state = None
            raise NonFiniteLossError(base + k, loss, last_good, what=what)
        work.control[ws.STEP] = base + num_steps
        if self.sync == "states":
            work.control[ws.REFRESH] = 0.0
            since = self._steps_since_average + num_steps
            self._steps_since_average = 0 if end == ws.END_AVERAGE_STATES else \
                since % self.update_interval

    def _adjust_micro_batch(self, step, rows):
        """Under memory pressure, halve the workers' micro-batch (the maths stays the same);
        checked at the start of each pass and, through the pool's tick, every half second of it
        (workers read the micro-batch at every step)."""
        self._pass_rows = rows
        control = self._work.control
        current = int(control[ws.MICRO_BATCH])
        chosen = self._governor.adjust(time.monotonic(), current,
                                       -(-min(rows, self.batch_size) // self.num_processes))
        if chosen != current:
            control[ws.MICRO_BATCH] = chosen
            self._micro_batch_changes.append({"step": step, "micro_batch_size": chosen})

    def _tick(self):
        """The owner's periodic work while workers run a pass."""
        work = self._work
        if work is not None and int(work.control[ws.PASS_KIND]) == ws.TRAIN:
            step = int(work.results[:, ws.CURRENT_STEP].max())
            self._adjust_micro_batch(step, getattr(self, "_pass_rows", self.batch_size))

    def _worker_progress(self, i):
        """(heartbeat, waiting for a peer, current step) of worker i, for hang detection. A
        worker marked waiting at a barrier that has already passed (stopped while asleep) is
        not waiting for anyone."""
        results = self._work.results[i]
        waiting = bool(results[ws.WAITING])
        if waiting:
            kind, number = int(results[ws.WAIT_KIND]), int(results[ws.WAIT_ROUND])
            only = int(results[ws.WAIT_ONLY])
            counters = self._work.arrivals[kind, :, 0]
            passed = counters[only] >= number if only >= 0 else counters.min() >= number
            waiting = not passed
        return results[ws.HEARTBEAT], waiting, int(results[ws.CURRENT_STEP])
