"""sync="gradients": a worker's pass of compute, weighted mean and slice update, step by step.

Without clipping (and on one node), with an optimizer that offers ``update_from_mean_into``
(Adam), the weighted mean is formed inside the update: with two workers it is never written, one
pass over the slice instead of two (the MLP's sync 1.8-2.2 ms -> 1.4-1.7 ms a step); with more,
the mean of all but the last slot is written first, as much traffic as before. Clipping needs the
global norm of the mean before any update, so it keeps the two passes and the REDUCED barrier
between. The timeline's "reduce" span is empty on the fused path: the "update" span holds both.

A mixin of ``engine.parallel.worker.WorkerCore`` (the protocol and recovery are described
there). It is apart from the states mode because the two passes share no step, only the core's
waits and shard helpers; its methods keep their names on the core class so that fault injection
(``engine.parallel.faults``) can override them. ``reduce`` (the ``REDUCE`` operation) is the
standalone weighted mean that the benchmarks time.
"""
import math
import time

from engine.core.kernels import clip_scale, sum_squares, weighted_mean_into
from engine.core.optim import fuses_slot_mean
from engine.parallel import workspace as ws


class GradientsPass:
    """WorkerCore's sync="gradients" methods: they use the slot views, slices, pieces and state
    versions that ``WorkerCore.__init__`` sets up, and its barriers, waits and shard helpers."""

    def _gradient_pass(self):
        barriers, i, control = self.barriers, self.worker_id, self.work.control
        num_steps, base, rows, batch_size = self._plan()
        clip_norm = control[ws.CLIP_NORM]
        clip_norm = None if math.isnan(clip_norm) else float(clip_norm)
        records, rates = self.data.records, self.data.step_learning_rates
        coefficients = self._coefficients
        # Across nodes the owner's thread joins every step between reduce and update
        # (engine.parallel.cross_node), and decides for all nodes whether a step is finite.
        cross_node = bool(control[ws.CROSS_NODE])
        barriers.always_ring = cross_node
        # Without clipping (and on one node) the slot mean is formed inside the optimizer step.
        fused = (clip_norm is None and not cross_node and self._averaged is self.work.reduced
                 and fuses_slot_mean(self.optimizer))
        k = barriers.count(ws.UPDATED, i)  # steps completed (by this worker or its predecessor)
        # The hot loop: per step a few dozen scalar reads and writes; the small per-step checks
        # run on Python floats (row.tolist()), which beats numpy reductions over a few workers.
        while k < num_steps:
            step, record, row = base + k, records[k, i], records[k]
            self._beat(step)
            if barriers.count(ws.COMPUTED, i) <= k:
                record[ws.R_STARTED] = time.perf_counter()
                self._compute(step, *self._shard(k, rows, batch_size), record)
                barriers.arrive(ws.COMPUTED, i, k + 1)
            self._wait(ws.COMPUTED, k + 1)
            record[ws.R_COMPUTED] = time.perf_counter()
            computed = row.tolist()
            total = 0.0
            for w, fields in enumerate(computed):
                if not cross_node and not math.isfinite(fields[ws.R_LOSS]):
                    return self._stop(k)
                total += fields[ws.R_COUNT]
            for w, fields in enumerate(computed):
                coefficients[w] = fields[ws.R_COUNT] / total
            self._beat(step)
            if fused:
                record[ws.R_REDUCED] = time.perf_counter()  # the update forms the mean itself
                record[ws.R_SUM_SQUARES], record[ws.R_NON_FINITE] = \
                    self._reduce_and_update_slice(step, rates[k], coefficients)
            else:
                if clip_norm is None and not cross_node:
                    record[ws.R_SUM_SQUARES] = self._reduce_slice(coefficients, record)
                    scale = 1.0
                else:
                    if barriers.count(ws.REDUCED, i) <= k:
                        record[ws.R_SUM_SQUARES] = self._reduce_slice(coefficients, record)
                        barriers.arrive(ws.REDUCED, i, k + 1)
                    scale = self._clip_or_hop_scale(k, row, clip_norm, cross_node)
                    if scale is None:
                        return self._stop(k)
                record[ws.R_REDUCED] = time.perf_counter()
                record[ws.R_NON_FINITE] = self._update_slice(step, rates[k], scale)
            record[ws.R_UPDATED] = time.perf_counter()
            barriers.arrive(ws.UPDATED, i, k + 1)
            self._wait(ws.UPDATED, k + 1)
            record[ws.R_ENDED] = time.perf_counter()
            # A non-finite gradient shows in the sum of squares of some slice of the mean (and in
            # the parameters it updated, which went into the next version only): stop before
            # that version becomes current.
            for fields in row.tolist():
                if fields[ws.R_NON_FINITE] != 0.0 or not math.isfinite(fields[ws.R_SUM_SQUARES]):
                    return self._stop(k)
            k += 1

    def _clip_or_hop_scale(self, k, row, clip_norm, cross_node):
        """The gradient scale of pass step ``k`` once every slice is reduced: the clipping factor
        of the global norm, or across nodes the one the owner's hop decided (None: it stopped
        the pass)."""
        if cross_node:
            self._wait_node(k + 1)
            if self.work.control[ws.HOP_STOP]:
                return None
            return float(self.work.control[ws.HOP_SCALE])
        self._wait(ws.REDUCED, k + 1)
        squares = sum(fields[ws.R_SUM_SQUARES] for fields in row.tolist())
        return clip_scale(math.sqrt(squares), clip_norm)

    def _compute(self, step, start, stop, record):
        """Loss and gradient of this worker's shard at the state current before ``step``, into
        its slot. (Their finiteness is checked on the mean: no extra pass over the slot.)"""
        started = time.perf_counter()
        if stop == start:  # contributes with coefficient 0; zeros keep NaN of old data out
            self.slot.fill(0.0)
            record[ws.R_LOSS] = record[ws.R_COUNT] = 0.0
        else:
            x, y = self._rows(start, stop)
            state = self._versions[step % len(self._versions)]
            loss, count = self._train_on_shard(state, x, y, step, self.slot_weights,
                                               self.slot_theta)
            record[ws.R_LOSS], record[ws.R_COUNT] = loss, count
        record[ws.R_COMPUTE_S] = time.perf_counter() - started
        self.examples_window.computed(record[ws.R_COMPUTE_S])

    def _reduce_slice(self, coefficients, record):
        """Weighted mean of every slot over this worker's slice into ``reduced``; returns the
        sum of squares of its weights part (float64: finite iff every gradient is)."""
        work = self.work
        if self._averaged is not work.reduced:  # one worker: its slot is the average
            return sum_squares(self.slot, 0, self.trainable.num_trainable)
        start, stop = self.weight_slice
        squares = weighted_mean_into(work.reduced, work.slots, coefficients, start, stop, True)
        start, stop = self.theta_slice
        weighted_mean_into(work.reduced, work.slots, coefficients, start, stop, False)
        return squares

    def _update_slice(self, step, learning_rate, scale):
        """Optimizer step on this worker's slice, from the version current before ``step`` into
        the next one; the averaged theta copied in. Returns 0.0, or NaN if a value is not finite."""
        params, optimizer = self._param_versions, self._optimizer_versions
        current, following = step % len(params), (step + 1) % len(params)
        averaged, non_finite = self._averaged, 0.0
        for start, stop, compact in self.weight_pieces:
            if compact == start:  # nothing frozen before it: buffer and compact numbering agree
                non_finite += self.optimizer.update_into(
                    params[following], optimizer[following], params[current], optimizer[current],
                    averaged, start, stop, learning_rate, step + 1, scale)
            else:  # past a frozen weight: the same update on views aligned to the piece
                non_finite += self.optimizer.update_into(
                    params[following][start:stop], optimizer[following][:, start:stop],
                    params[current][start:stop], optimizer[current][:, start:stop],
                    averaged[compact:compact + stop - start], 0, stop - start, learning_rate,
                    step + 1, scale)
        self._copy_theta_into(params[following], averaged)
        return non_finite

    def _copy_theta_into(self, params, averaged):
        """The averaged theta of this worker's slice into the next version ``params``."""
        for start, stop, compact in self.theta_pieces:
            params[start:stop] = averaged[compact:compact + stop - start]

    def _reduce_and_update_slice(self, step, learning_rate, coefficients):
        """The weighted mean of the slots over this worker's slice formed inside the optimizer step
        (no clipping: ``optimizer.update_from_mean_into``), from the version current before
        ``step`` into the next one, theta averaged and copied in. Returns (sum of squares of the
        mean's weights part, 0.0 or NaN if a new parameter is not finite)."""
        work = self.work
        slots, reduced = work.slots, work.reduced
        last = len(slots) - 1
        start, stop = self.weight_slice
        if last > 1:  # the mean of all but the last slot first, in the same order as ever
            weighted_mean_into(reduced, slots[:last], coefficients[:last], start, stop, False)
            first, first_coefficient = reduced, 1.0
        else:
            first, first_coefficient = slots[0], coefficients[0]
        start, stop = self.theta_slice
        weighted_mean_into(reduced, slots, coefficients, start, stop, False)
        params, optimizer = self._param_versions, self._optimizer_versions
        current, following = step % len(params), (step + 1) % len(params)
        squares, non_finite = 0.0, 0.0
        for start, stop, compact in self.weight_pieces:
            end = compact + stop - start  # slots and reduced hold the compact numbering
            piece_squares, piece_non_finite = self.optimizer.update_from_mean_into(
                params[following][start:stop], optimizer[following][:, start:stop],
                params[current][start:stop], optimizer[current][:, start:stop],
                first[compact:end], first_coefficient, slots[last][compact:end],
                coefficients[last], 0, stop - start, learning_rate, step + 1)
            squares += piece_squares
            non_finite += piece_non_finite
        self._copy_theta_into(params[following], reduced)
        return squares, non_finite

    def reduce(self):
        """Standalone weighted mean (``coefficients`` from the owner) over this worker's slice:
        what the benchmarks time against the memory-copy floor."""
        work = self.work
        if work.averaged is work.reduced:
            start, stop = self.weight_slice
            self.results[ws.SUM_SQUARES] = weighted_mean_into(
                work.reduced, work.slots, work.coefficients, start, stop, True)
