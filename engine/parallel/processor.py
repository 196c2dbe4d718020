"""ParallelBatchProcessor: data-parallel training steps across persistent worker processes."""
import os
import time
import warnings

import numpy as np

from engine.core import kernels
from engine.parallel import memory, signals
from engine.parallel import workspace as ws
from engine.parallel import worker as ops
from engine.core.errors import NonFiniteLossError
from engine.core.kernels import clip_scale
from engine.core.optim import make_optimizer
from engine.parallel.pool import WorkerPool, default_start_method
from engine.parallel.shm import sweep_orphaned_blocks
from engine.core.state import NetworkState
from engine.core.sharding import partition, shard_coefficients, split_batch
from engine.parallel.system import usable_cores
from engine.core.validation import (check_data, check_learning_rate, check_model, check_params,
                               check_processor_options, check_state)
from engine.parallel.workspace import DataArrays, Workspace

_warned_oversubscription = False


class ParallelBatchProcessor:
    """Splits every global batch across worker processes that share the model state in memory.

    Each step, the global batch of ``batch_size`` examples is cut into ``num_processes`` contiguous
    shards (sizes differ by at most one). Workers read the shared state, compute their shard's mean
    loss and gradients, and exchange them through shared memory; no array is pickled per step.

    * ``sync="gradients"``: gradients are averaged weighted by shard size (so the average is the
      gradient of the mean loss over the whole batch) as a reduce-scatter, and one optimizer update
      follows, each worker updating only its slice. **Contract:** the new state equals one step of
      ``num_processes=1`` on the whole batch to float32 rounding (tested with rtol=1e-4), for any
      split, as long as the model treats examples independently (BatchNorm in training mode uses
      per-shard statistics, as in PyTorch DDP without SyncBatchNorm).
    * ``sync="states"``: each worker takes local optimizer steps on its shards with its own
      optimizer state; every ``update_interval`` steps, and at the end of ``run_parallel``, the
      workers' states are averaged weighted by the examples each processed since the last average.
    * ``theta`` (non-trainable values such as BatchNorm statistics) is averaged the same way at
      every synchronisation in both modes.

    Args:
        model: an object following the model protocol (see ``models``).
        num_processes: worker processes; None means one per usable core (affinity and cgroups).
            1 runs in this process with the same maths (the debugging mode and test oracle).
        batch_size: global batch size (examples per step, all workers together).
        sync: "gradients" or "states". update_interval: steps between averages (states mode).
        optimizer: "sgd", "adam", "adamw", or an object such as ``engine.SGD(momentum=0.9)``.
            Its state persists across calls until :meth:`reset_optimizer`.
        seed: seeds batch shuffling and each worker's per-step random stream (dropout).
        start_method: "fork", "spawn" or "forkserver"; None picks forkserver on Linux.
        timeout_s: longest one phase of a step may take; a worker past it is killed and replaced.
        max_restarts: dead or hung workers replaced per call (the step is recomputed; in gradients
            mode the result is identical); one more raises WorkerCrashedError/WorkerTimeoutError.
        micro_batch_size: most examples a worker runs through the model at once; a larger shard
            is processed in chunks whose gradients are accumulated (same maths, less memory).
    """

    def __init__(self, model=None, *, num_processes=None, batch_size=50, sync="gradients",
                 update_interval=1, optimizer="adam", seed=0, start_method=None, timeout_s=None,
                 micro_batch_size=None, max_restarts=3):
        check_processor_options(num_processes, batch_size, sync, update_interval, timeout_s,
                                start_method, seed, micro_batch_size, max_restarts)
        self.model = model
        cores = usable_cores()
        self.num_processes = cores if num_processes is None else int(num_processes)
        if self.num_processes > batch_size:
            raise ValueError(f"batch_size must be at least num_processes so that every process gets "
                             f"an example. Received: batch_size={batch_size} with "
                             f"{self.num_processes} processes.")
        self.batch_size, self.sync, self.update_interval = batch_size, sync, update_interval
        self.optimizer = make_optimizer(optimizer)
        self.seed, self.timeout_s = int(seed), timeout_s
        self.start_method = start_method or default_start_method()
        self.threads_per_process = max(1, cores // self.num_processes)
        if self.num_processes > cores:
            _warn_oversubscription(self.num_processes, cores)
        self.micro_batch_size, self.max_restarts = micro_batch_size, max_restarts
        self._layout = self._work = self._data = self._executor = None
        self._pending_training_state = self._kept_optimizer = None
        self._governor, self._micro_batch_changes = memory.MicroBatchGovernor(), []
        self._steps_since_average = 0
        self._returned_state = None
        self._rng = np.random.default_rng(self.seed)

    # -- public API ------------------------------------------------------------------------------
    def run_parallel(self, examples, labels, initial_state, params=None):
        """One pass over ``examples`` in shuffled batches of ``batch_size``.

        Args:
            examples: array (n, *feature_shape). labels: integer class indices (n,).
            initial_state: the NetworkState to start from (not modified).
            params: dict with ``learning_rate`` (a number, or a function of the 0-based optimizer
                step returning one), ``update_weights`` (False: evaluate only, in input order,
                nothing changes) and optional ``clip_norm`` (global gradient norm).
        Returns:
            ``(final_state, results)``; results holds per-step arrays ``loss``, ``examples``,
            ``compute_s``, ``sync_s``, ``wait_s``, ``wall_s``, ``grad_norm``, ``learning_rate``;
            per-worker ``peak_rss_bytes``; ``mean_loss``; ``restarts`` and
            ``micro_batch_changes`` (reliability events); ``predictions`` when evaluating.
        Raises:
            ValueError/TypeError for bad input (before any worker starts); NonFiniteLossError;
            WorkerError, WorkerCrashedError, WorkerTimeoutError (the pool is torn down first).
        """
        learning_rate, update_weights, clip_norm = check_params(params)
        examples, labels = self._prepare(examples, labels, initial_state)
        self._begin_call()
        order = self._rng.permutation(len(examples)) if update_weights else None
        self._load_data(examples, labels, order)
        self._load_state(initial_state)
        records = []
        for start in range(0, len(examples), self.batch_size):
            rows = min(self.batch_size, len(examples) - start)
            if update_weights:
                records.append(self._train_step(start, rows, learning_rate, clip_norm))
            else:
                records.append(self._evaluate_step(start, rows))
        if update_weights and self.sync == "states" and self._steps_since_average:
            self._average_states()
        results = _collect(records, self._work.results[:, ws.PEAK_RSS])
        results["restarts"] = self._take_restarts()
        results["micro_batch_changes"], self._micro_batch_changes = self._micro_batch_changes, []
        if not update_weights:
            results["predictions"] = self._data.predictions[:len(examples)].copy()
        return self._current_state(), results

    def process_batch(self, examples, labels, state, params=None):
        """One step on one global batch (all of ``examples``), split across the workers.

        Returns ``(state, batch_results)`` with scalar ``loss``, ``examples``, timings and
        ``predictions`` when evaluating. In ``sync="states"`` mode, passing back the state object
        this method returned continues the workers' local states; any other state restarts them
        all from it. The returned state is the (example-weighted) average of the local states.
        """
        learning_rate, update_weights, clip_norm = check_params(params)
        examples, labels = self._prepare(examples, labels, state)
        self._begin_call()
        self._load_data(examples, labels, None)
        if state is not self._returned_state or self.sync == "gradients":
            self._load_state(state)
        rows = len(examples)
        if update_weights:
            record = self._train_step(0, rows, learning_rate, clip_norm)
        else:
            record = self._evaluate_step(0, rows)
        results = {key: value[0] for key, value in _collect([record], []).items()
                   if key not in ("peak_rss_bytes", "mean_loss")}
        results["peak_rss_bytes"] = self._work.results[:, ws.PEAK_RSS].astype(np.int64).tolist()
        results["restarts"] = self._take_restarts()
        results["micro_batch_changes"], self._micro_batch_changes = self._micro_batch_changes, []
        if not update_weights:
            results["predictions"] = self._data.predictions[:rows].copy()
        if update_weights and self.sync == "states" and self._steps_since_average:
            # Average of the local states into ``reduced``, leaving the local states as they are.
            self._work.coefficients[:] = shard_coefficients(self._work.results[:, ws.SINCE_SYNC])
            self._run(ops.REDUCE)
            self._returned_state = NetworkState.from_buffer(self._layout,
                                                            self._work.averaged.copy())
            return self._returned_state, results
        return self._current_state(), results

    def training_state(self):
        """What resuming needs beyond the NetworkState: optimizer buffers and step count, and the
        shuffling random stream. A dict of numpy arrays and plain values (see load_training_state)."""
        if self._work is None:
            raise RuntimeError("the processor has not run a step yet, so it has no training state.")
        return {"optimizer": self._work.optimizer.copy(), "step": int(self._work.control[ws.STEP]),
                "shuffle_rng": self._rng.bit_generator.state}

    def load_training_state(self, training_state):
        """Restore what :meth:`training_state` returned; applied at the next (or current) start."""
        self._rng.bit_generator.state = training_state["shuffle_rng"]
        self._pending_training_state = training_state
        if self._work is not None:
            self._apply_training_state()

    def _apply_training_state(self):
        saved, self._pending_training_state = self._pending_training_state, None
        if saved["optimizer"].shape != self._work.optimizer.shape:
            raise ValueError(f"saved optimizer state has shape {saved['optimizer'].shape}, this "
                             f"processor needs {self._work.optimizer.shape}: the model, optimizer, "
                             "sync mode or process count differ from the saved run.")
        self._work.optimizer[...] = saved["optimizer"]
        self._work.control[ws.STEP] = saved["step"]

    def _begin_call(self):
        """Each call gets max_restarts replacements and reports its own restarts."""
        if isinstance(self._executor, WorkerPool):
            self._executor.reset_restart_budget()
            self._executor.restarts.clear()

    def _take_restarts(self):
        if isinstance(self._executor, WorkerPool):
            restarts, self._executor.restarts = self._executor.restarts, []
            return restarts
        return []

    def reset_optimizer(self):
        """Forget optimizer state (momentum, Adam moments and step count)."""
        self._kept_optimizer = None
        if self._work is not None:
            self._work.versions_of_optimizer.fill(0.0)
            self._work.control[ws.STEP] = 0

    @property
    def worker_pids(self):
        """PIDs of the worker processes (empty in-process or before the first call)."""
        return self._executor.pids if isinstance(self._executor, WorkerPool) else []

    def close(self):
        """Stop the workers and release all shared memory. Safe to call more than once."""
        executor, self._executor = self._executor, None
        if isinstance(executor, WorkerPool):
            executor.close()
        if getattr(self, "_holds_sigterm", False):
            self._holds_sigterm = False
            signals.release()
        if self._work is not None:
            # The optimizer state outlives the pool (a PyTorch optimizer outlives its process
            # group): a call after close(), or after a failure tore the pool down, goes on with the
            # same moments and step count. In gradients mode the current version is intact even
            # when a worker died mid-update.
            self._kept_optimizer = (self._layout, self._work.optimizer.copy(),
                                    int(self._work.control[ws.STEP]))
        for arrays in (self._data, self._work):
            if arrays is not None:
                arrays.close()
        self._data = self._work = self._layout = None
        self._returned_state = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- setup -----------------------------------------------------------------------------------
    def _prepare(self, examples, labels, state):
        """Validate everything the call received; start the workers for this state's layout."""
        check_model(self.model)
        layout = self._layout or self.model.init_state(self.seed).layout
        check_state(state, layout)
        feature_shape, num_outputs = self._model_shapes(state, examples)
        examples, labels = check_data(examples, labels, feature_shape, num_outputs)
        self._start(state.layout, num_outputs)
        return examples, labels

    def _model_shapes(self, state, examples):
        """Feature shape and number of outputs: from the model's attributes, or a dry run."""
        shape, outputs = getattr(self.model, "input_shape", None), getattr(self.model, "num_outputs",
                                                                            None)
        if shape is not None and outputs is not None:
            return tuple(shape), int(outputs)
        sample = np.asarray(examples)[:1].astype(np.float32)
        try:
            predictions = np.asarray(self.model.predict(state, sample))
        except Exception as error:
            raise ValueError(f"the model cannot take examples of feature shape {sample.shape[1:]}: "
                             f"a one-example dry run raised {type(error).__name__}: {error}") from None
        return tuple(sample.shape[1:]), int(predictions.shape[-1])

    def _start(self, layout, num_outputs):
        if self._layout == layout:
            return
        self.close()
        sweep_orphaned_blocks()
        gradients = self.sync == "gradients"
        spec = Workspace.make_spec(layout.size, layout.num_weights, self.num_processes,
                                   versions=2 if gradients else 1,
                                   optimizer_copies=1 if gradients else self.num_processes,
                                   optimizer_buffers=self.optimizer.num_buffers)
        shared = self.num_processes > 1
        memory.check_fits(Workspace.nbytes(spec), self.num_processes if shared else 0,
                          layout.size * 4)
        self._work = Workspace(spec, shared=shared, create=True)
        self._work.state_bounds[:] = partition(layout.size, self.num_processes)
        self._work.control[ws.SEED] = self.seed
        self._work.control[ws.MICRO_BATCH] = self.micro_batch_size or 0
        kept, self._kept_optimizer = self._kept_optimizer, None
        if self._pending_training_state is not None:
            self._apply_training_state()
        elif kept is not None and kept[0] == layout and kept[1].shape == self._work.optimizer.shape:
            self._work.optimizer[...] = kept[1]
            self._work.control[ws.STEP] = kept[2]
        self._layout, self._num_outputs = layout, num_outputs
        if shared:
            kernels.warm_up()  # forked workers inherit compiled kernels
            self._holds_sigterm = signals.hold()
            self._executor = WorkerPool(
                dict(model=self.model, layout=layout, optimizer=self.optimizer, sync=self.sync,
                     workspace=self._work.spec, threads=self.threads_per_process,
                     owner_pid=os.getpid()),
                self.num_processes, self.start_method, self.timeout_s, self.max_restarts)
        else:
            self._executor = _InProcess(ops.WorkerCore(0, self.model, layout, self.optimizer,
                                                       self._work))

    def _load_data(self, examples, labels, order):
        """Copy (shuffled) examples into the data block; workers then slice their shards from it."""
        rows, feature_shape = len(examples), tuple(examples.shape[1:])
        data = self._data
        if data is None or data.spec["capacity"] < rows or \
                data.spec["feature_shape"] != feature_shape:
            if data is not None:
                data.close()  # workers still map it until they attach the new block; that is fine
            spec = DataArrays.make_spec(rows, feature_shape, self._num_outputs)
            memory.check_fits(DataArrays.nbytes(spec), 0, 0)
            self._data = data = DataArrays(spec, shared=self.num_processes > 1, create=True)
            try:
                self._executor.attach_data(data)
            except BaseException:
                self.close()
                raise
        if order is not None and examples.dtype == np.float32 and examples.flags.c_contiguous:
            # One gather straight into shared memory (fancy indexing would copy twice).
            np.take(examples, order, axis=0, out=data.examples[:rows])
            np.take(labels, order, out=data.labels[:rows])
            return
        chunk = max(1, (64 << 20) // max(1, examples[:1].nbytes))  # bound the temporary to ~64 MiB
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            index = slice(start, stop) if order is None else order[start:stop]
            data.examples[start:stop] = examples[index]
            data.labels[start:stop] = labels[index]

    def _load_state(self, state):
        self._work.params[:] = state.buffer
        self._work.control[ws.REFRESH] = 1.0
        self._work.results[:, ws.SINCE_SYNC] = 0.0
        self._steps_since_average = 0

    def _current_state(self):
        self._returned_state = NetworkState.from_buffer(self._layout, self._work.params.copy())
        return self._returned_state

    # -- steps -----------------------------------------------------------------------------------
    def _set_shards(self, start, rows):
        self._work.shard_bounds[:] = split_batch(rows, self.num_processes) + start

    def _train_step(self, start, rows, learning_rate, clip_norm):
        work = self._work
        step = int(work.control[ws.STEP])
        self._set_shards(start, rows)
        self._adjust_micro_batch(step, rows)
        if callable(learning_rate):
            learning_rate = check_learning_rate(learning_rate(step), step)
        work.control[ws.LEARNING_RATE] = learning_rate
        began = time.perf_counter()
        if self.sync == "gradients":
            self._run(ops.COMPUTE, step)
            computed = time.perf_counter()
            loss = self._checked_loss(step, rows, check_gradients=True)
            work.coefficients[:] = shard_coefficients(work.results[:, ws.COUNT])
            if clip_norm is None:
                work.control[ws.SCALE] = 1.0
                self._run(ops.REDUCE_UPDATE, step)
                grad_norm = float(np.sqrt(work.results[:, ws.SUM_SQUARES].sum()))
            else:
                self._run(ops.REDUCE, step)
                grad_norm = float(np.sqrt(work.results[:, ws.SUM_SQUARES].sum()))
                work.control[ws.SCALE] = clip_scale(grad_norm, clip_norm)
                self._run(ops.UPDATE, step)
            self._check_new_parameters(step, loss)
            work.flip()
        else:
            self._run(ops.LOCAL_STEP, step)
            work.control[ws.REFRESH] = 0.0
            computed = time.perf_counter()
            loss = self._checked_loss(step, rows, check_gradients=False)
            self._check_new_parameters(step, loss)
            grad_norm = float("nan")
            self._steps_since_average += 1
            if self._steps_since_average >= self.update_interval:
                self._average_states()
        work.control[ws.STEP] = step + 1
        record = _record(loss, rows, work.results[:, ws.COMPUTE_S].max(), began, computed,
                         time.perf_counter(), grad_norm)
        record["learning_rate"] = learning_rate
        return record

    def _adjust_micro_batch(self, step, rows):
        """Under memory pressure, halve the workers' micro-batch (the maths stays the same)."""
        control = self._work.control
        current = int(control[ws.MICRO_BATCH])
        chosen = self._governor.adjust(time.monotonic(), current, -(-rows // self.num_processes))
        if chosen != current:
            control[ws.MICRO_BATCH] = chosen
            self._micro_batch_changes.append({"step": step, "micro_batch_size": chosen})

    def _run(self, op, step=None):
        """Run one operation on every worker; any failure releases the pool and shared memory
        (the next call starts a fresh pool)."""
        try:
            self._executor.run(op, step)
        except BaseException:
            self.close()
            raise

    def _average_states(self):
        work = self._work
        work.coefficients[:] = shard_coefficients(work.results[:, ws.SINCE_SYNC])
        self._run(ops.AVERAGE)
        work.control[ws.REFRESH] = 1.0
        self._steps_since_average = 0

    def _evaluate_step(self, start, rows):
        self._set_shards(start, rows)
        began = time.perf_counter()
        self._run(ops.EVALUATE)
        ended = time.perf_counter()
        results = self._work.results
        loss = float(np.dot(results[:, ws.COUNT], results[:, ws.LOSS]) / rows)
        record = _record(loss, rows, results[:, ws.COMPUTE_S].max(), began, ended, ended,
                         float("nan"))
        record["learning_rate"] = float("nan")
        return record

    def _check_new_parameters(self, step, loss):
        """Refuse an update that made parameters non-finite (a learning rate far too large).

        In gradients mode the update went into the next version of the state, so the current one
        is still the last good state; in states mode ``params`` holds the last average.
        """
        if not np.all(self._work.results[:, ws.NON_FINITE] == 0.0):
            last_good = NetworkState.from_buffer(self._layout, self._work.params.copy())
            raise NonFiniteLossError(step, loss, last_good, what="the updated parameters are")

    def _checked_loss(self, step, rows, check_gradients):
        results = self._work.results
        loss = float(np.dot(results[:, ws.COUNT], results[:, ws.LOSS]) / rows)
        gradients_finite = not check_gradients or np.all(np.isfinite(results[:, ws.SUM_SQUARES]))
        if not (np.isfinite(loss) and gradients_finite):
            # The shared params are untouched by this step (states mode: the last average).
            last_good = NetworkState.from_buffer(self._layout, self._work.params.copy())
            raise NonFiniteLossError(step, loss, last_good,
                                     what="the gradients are" if np.isfinite(loss) else "the loss is")
        return loss


class _InProcess:
    """Runs the worker maths directly in this process (num_processes=1)."""

    def __init__(self, core):
        self.core = core

    def run(self, op, step=None):
        self.core.run(op)

    def attach_data(self, data):
        self.core.data = data


def _record(loss, rows, compute_s, began, computed, ended, grad_norm):
    return dict(loss=loss, examples=rows, compute_s=float(compute_s), sync_s=ended - computed,
                wait_s=max(0.0, (computed - began) - compute_s), wall_s=ended - began,
                grad_norm=grad_norm)


def _collect(records, peak_rss):
    results = {key: np.array([record[key] for record in records]) for key in records[0]}
    results["examples"] = results["examples"].astype(np.int64)
    results["peak_rss_bytes"] = np.asarray(peak_rss, dtype=np.int64)
    results["mean_loss"] = float(np.dot(results["loss"], results["examples"]) /
                                 results["examples"].sum())
    return results


def _warn_oversubscription(num_processes, cores):
    global _warned_oversubscription
    if not _warned_oversubscription:
        _warned_oversubscription = True
        warnings.warn(f"num_processes={num_processes} is more than the {cores} usable cores: "
                      "processes will share cores and each step waits for the slowest. Use "
                      "num_processes=None for one process per core.", RuntimeWarning, stacklevel=3)
