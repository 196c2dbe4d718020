"""ParallelBatchProcessor: data-parallel training passes run by persistent worker processes."""
import math
import os
import time
import warnings
import weakref

import numpy as np

from engine.core import kernels
from engine.core.errors import NonFiniteLossError
from engine.core.optim import make_optimizer
from engine.core.protocol import check_model_contract
from engine.core.sharding import TrainableMap, match_frozen, partition
from engine.core.state import NetworkState
from engine.core.validation import (check_data, check_learning_rate, check_model, check_params,
                                    check_processor_options, check_state)
from engine.parallel import memory, signals
from engine.parallel import worker as ops
from engine.parallel import workspace as ws
from engine.parallel.barrier import Barriers
from engine.parallel.pool import WorkerPool, default_start_method
from engine.parallel.shm import check_shared_memory_space, sweep_orphaned_blocks
from engine.parallel.system import usable_cores, worker_core_sets
from engine.parallel.cross_node import NodeHop
from engine.parallel.timeline import Timeline
from engine.parallel.workspace import DataArrays, Workspace

_warned_oversubscription = False
_FINGERPRINT_ROWS = 64


class ParallelBatchProcessor:
    """Splits every global batch across worker processes that share the model state in memory.

    Each step, the global batch of ``batch_size`` examples is cut into ``num_processes`` contiguous
    shards (sizes differ by at most one). The workers run a whole pass by themselves, meeting at
    shared-memory barriers; the owner writes the pass's plan once and sleeps. Nothing is pickled.

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
        model: an object following the model protocol (see ``models``); checked by a dry run on
            two examples before any worker starts.
        num_processes: worker processes; None means one per usable core (affinity and cgroups).
            1 runs in this process with the same maths (the debugging mode and test oracle).
        batch_size: global batch size (examples per step, all workers together).
        sync: "gradients" or "states". update_interval: steps between averages (states mode).
        optimizer: "sgd", "adam", "adamw", or an object such as ``engine.SGD(momentum=0.9)``.
            Its state persists across calls until :meth:`reset_optimizer`.
        seed: seeds batch shuffling and each worker's per-step random stream (dropout).
        start_method: "fork", "spawn" or "forkserver"; None picks fork on Linux (spawn once
            TensorFlow is imported, which is not fork-safe).
        timeout_s: longest a worker may go without progress (one phase of a step); a worker past
            it is killed and replaced. None (the default here; ``fit`` and the CLI set one)
            waits forever. The attribute may be changed between calls.
        max_restarts: dead or hung workers replaced per call (the step is recomputed; in gradients
            mode the result is identical); one more raises WorkerCrashedError/WorkerTimeoutError.
        micro_batch_size: most examples a worker runs through the model at once; a larger shard
            is processed in chunks whose gradients are accumulated (same maths, less memory).
        bind_cores: bind each worker to its own cores (its share of this process's affinity)
            when they fit, as Horovod and DeepSpeed do; False leaves placement to the kernel.
        cluster: None (one machine), "mpi" (one engine process per node under ``mpirun``/
            ``srun``: ``batch_size`` is the global batch, each node takes its contiguous share of
            every step, and the owner averages the node-reduced gradient across nodes between the
            reduce and the update; see docs/cluster.md), or an ``engine.parallel.cluster.Cluster``.
        timeline: a path: write a Chrome trace (Perfetto, chrome://tracing) of every step's
            compute, wait, reduce and update per worker and of the owner's work, at close()
            (``engine.parallel.timeline``: every step of the first 2,000, then one in 50).
        freeze: fnmatch patterns of weight names (e.g. ``["conv1d_1/*"]``) to keep fixed; see
            :meth:`set_frozen`. Frozen weights take no gradient slot, no averaging and no
            optimizer update, and stay bitwise unchanged in both sync modes.
    """

    def __init__(self, model=None, *, num_processes=None, batch_size=50, sync="gradients",
                 update_interval=1, optimizer="adam", seed=0, start_method=None, timeout_s=None,
                 micro_batch_size=None, max_restarts=3, timeline=None, bind_cores=True,
                 cluster=None,
                 freeze=None):
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
        self.seed, self._timeout_s = int(seed), timeout_s
        self.start_method = start_method or default_start_method()
        self.threads_per_process = max(1, cores // self.num_processes)
        if self.num_processes > cores:
            _warn_oversubscription(self.num_processes, cores)
        self.micro_batch_size, self.max_restarts = micro_batch_size, max_restarts
        self.bind_cores = bool(bind_cores)
        self._layout = self._work = self._data = self._executor = None
        self._pending_training_state = self._kept_optimizer = None
        self._governor, self._micro_batch_changes = memory.MicroBatchGovernor(), []
        self._steps_since_average = 0
        self._returned_state = None
        self._contract_checked = None   # the layout whose model passed the dry run
        self._data_key = None           # what the data block holds (see _load_data)
        self._rng = np.random.default_rng(self.seed)
        self.timeline = None if timeline is None else Timeline(timeline)
        self.cluster = _make_cluster(cluster, timeout_s)
        # Ranks sharing a host (a test, or several ranks per node) share its cores.
        self._local_ranks = (0, 1) if self.cluster is None else (
            getattr(self.cluster, "local_rank", 0), getattr(self.cluster, "local_size", 1))
        if self._local_ranks[1] > 1:
            cores = max(1, cores // self._local_ranks[1])
            self.threads_per_process = max(1, cores // self.num_processes)
        self._frozen_names, self._running_map = (), None
        if freeze:
            self.set_frozen(freeze)

    @property
    def timeout_s(self):
        return self._timeout_s

    @timeout_s.setter
    def timeout_s(self, value):
        check_processor_options(self.num_processes, self.batch_size, self.sync,
                                self.update_interval, value, None, self.seed)
        self._timeout_s = value
        if self._executor is not None:
            self._executor.timeout_s = value

    # -- public API ------------------------------------------------------------------------------
    def run_parallel(self, examples, labels, initial_state, params=None):
        """One pass over ``examples`` in shuffled batches of ``batch_size``.

        The data set is copied into shared memory and validated (finite values, labels, shapes)
        once: a later call with the *same array objects* (same shape, dtype and memory, and the
        same values in a fingerprint of 64 rows spread over the array) reuses it. An array changed
        in place outside those rows is not noticed: pass a new array, or call
        :meth:`forget_data`. Likewise ``initial_state`` is checked once: the state this processor
        returned is taken as it is.

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
        rows = self._prepare(examples, labels, initial_state, reuse=True)
        if update_weights:
            self._data.order[:rows] = self._rng.permutation(rows)
        self._load_state(initial_state)
        kind = ws.TRAIN if update_weights else ws.EVALUATE
        results = self._run_pass(kind, rows, learning_rate, clip_norm, ordered=update_weights,
                                 end=ws.END_AVERAGE_STATES)
        return self._current_state(), results

    def process_batch(self, examples, labels, state, params=None):
        """One step on one global batch (all of ``examples``), split across the workers.

        Returns ``(state, batch_results)`` with scalar ``loss``, ``examples``, timings and
        ``predictions`` when evaluating. In ``sync="states"`` mode, passing back the state this
        method returned (or an equal one) continues the workers' local states; any other state
        restarts them all from it. The returned state is the (example-weighted) average of the
        local states.
        """
        learning_rate, update_weights, clip_norm = check_params(params)
        rows = self._prepare(examples, labels, state, reuse=False)
        self._load_state(state)
        kind = ws.TRAIN if update_weights else ws.EVALUATE
        averaging_due = (self._steps_since_average + 1) % self.update_interval == 0
        results = self._run_pass(kind, rows, learning_rate, clip_norm, ordered=False,
                                 end=ws.END_MEAN_INTO_REDUCED, one_step=True)
        results = {key: (value[0] if isinstance(value, np.ndarray) and key not in (
            "peak_rss_bytes", "predictions") else value) for key, value in results.items()
            if key != "mean_loss"}
        results["peak_rss_bytes"] = results["peak_rss_bytes"].tolist()
        if update_weights and self.sync == "states" and not averaging_due:
            self._returned_state = NetworkState.from_buffer(self._layout, self._work.reduced.copy())
            return self._returned_state, results
        return self._current_state(), results

    def set_frozen(self, patterns):
        """Keep the weights whose names match ``patterns`` fixed from the next call on.

        The reduce-scatter and the optimizer update then run over the trainable weights and
        theta only (split evenly among the workers); frozen weights stay bitwise as they are and
        their optimizer entries (momentum, Adam moments) are neither read nor written. Theta is
        never frozen. Changing the set restarts the workers at the next call (their gradient
        slots are sized for the trainable values); the optimizer state and step count carry over.

        Args:
            patterns: fnmatch patterns (a string or a list of strings); None or [] unfreezes all.
        Returns:
            the tuple of frozen weight names.
        Raises:
            TypeError/ValueError: a pattern is not a string or matches no weight (the message
                lists the weight names).
        """
        if patterns and self.model is None:
            raise ValueError("freeze needs a model whose weight names the patterns match. Pass "
                             "model=... to ParallelBatchProcessor.")
        if not patterns:
            self._frozen_names = ()
            return ()
        layout = self._layout or self.model.init_state(self.seed).layout
        names = match_frozen([n for n, _ in layout.weight_shapes], patterns,
                             [n for n, _ in layout.theta_shapes])
        self._frozen_names = names
        return names

    @property
    def frozen(self):
        """The frozen weight names (see :meth:`set_frozen`)."""
        return self._frozen_names

    def _trainable_map(self, layout):
        return TrainableMap.of(layout, self._frozen_names)

    def forget_data(self):
        """Make the next call copy and validate its data again (after changing it in place)."""
        self._data_key = None

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
        optimizer, needed = saved["optimizer"], self._work.optimizer.shape
        if self.sync == "states" and optimizer.ndim == 3 and optimizer.shape[1:] == needed[1:] \
                and optimizer.shape[0] != needed[0]:
            # Another number of workers (or of nodes) than the saved run: each worker's local
            # optimizer state starts from the mean of the saved ones.
            optimizer = np.broadcast_to(optimizer.mean(axis=0, dtype=np.float64).astype(
                np.float32), needed)
            saved = dict(saved, optimizer=optimizer)
        if saved["optimizer"].shape != self._work.optimizer.shape:
            raise ValueError(f"saved optimizer state has shape {saved['optimizer'].shape}, this "
                             f"processor needs {self._work.optimizer.shape}: the model, optimizer, "
                             "sync mode or process count differ from the saved run.")
        self._set_step(saved["step"], saved["optimizer"])

    def _set_step(self, step, optimizer):
        """Make ``step`` the current global step with ``optimizer`` as its optimizer state (the
        state's version follows the step's parity, so the parameters move along)."""
        work = self._work
        params = work.params.copy()
        work.control[ws.STEP] = step
        # Every version: entries of frozen weights are never written by an update, so each
        # version must already hold them (a checkpoint reads whichever version is current).
        work.versions_of_optimizer[...] = optimizer
        work.params[...] = params

    def reset_optimizer(self):
        """Forget optimizer state (momentum, Adam moments and step count)."""
        self._kept_optimizer = None
        self._pending_training_state = None  # a resumed run's optimizer too (not its shuffling)
        if self._work is not None:
            self._work.versions_of_optimizer.fill(0.0)
            self._set_step(0, 0.0)

    @property
    def worker_pids(self):
        """PIDs of the worker processes (empty in-process or before the first call)."""
        return [] if self._executor is None else self._executor.pids

    @property
    def worker_start_s(self):
        """Seconds the last start of the worker pool took, from launching the first worker to every
        worker attached to shared memory and ready (None in-process or before the first call)."""
        return getattr(self._executor, "start_s", None)

    def close(self):
        """Stop the workers and release all shared memory (and write the timeline, if asked
        for). Safe to call more than once."""
        if getattr(self, "timeline", None) is not None and self.timeline.events:
            self.timeline.write()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.close()
        if getattr(self, "_holds_sigterm", False):
            self._holds_sigterm = False
            signals.release()
        if self._work is not None:
            # The optimizer state outlives the pool (a PyTorch optimizer outlives its process
            # group): a call after close(), or after a failure tore the pool down, goes on with the
            # same moments and step count (a failed call rolled them back to its start).
            self._kept_optimizer = (self._layout, self._work.optimizer.copy(),
                                    int(self._work.control[ws.STEP]))
        for arrays in (self._data, self._work):
            if arrays is not None:
                arrays.close()
        self._data = self._work = self._layout = None
        self._returned_state = self._data_key = None

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
    def _prepare(self, examples, labels, state, reuse):
        """Validate what the call received (data and state once each), start the workers for this
        state's layout, and put the data in shared memory. Returns the number of rows."""
        check_model(self.model)
        layout = self._layout or self.model.init_state(self.seed).layout
        if state is not self._returned_state or state is None:
            check_state(state, layout)
        key = _data_key(examples, labels) if reuse else None
        if key is not None and key == self._data_key and self._running(state.layout):
            return self._data_rows
        examples, labels, num_outputs = self._check_model_and_data(state, examples, labels)
        self._check_shared_space(state.layout, examples, num_outputs)
        self._start(state.layout, num_outputs)
        self._load_data(examples, labels)
        self._data_key, self._data_rows = key, len(examples)
        return len(examples)

    def _check_model_and_data(self, state, examples, labels):
        """Feature shape and outputs from the model's attributes (or a one-example prediction),
        the data checked against them, and the model contract dry-run once per layout."""
        shape, outputs = getattr(self.model, "input_shape", None), getattr(self.model, "num_outputs",
                                                                            None)
        if shape is None or outputs is None:
            sample = np.asarray(examples)[:1]
            try:
                sample = sample.astype(np.float32)
                outputs = np.asarray(self.model.predict(state, sample)).shape[-1]
            except Exception as error:
                raise ValueError(f"the model cannot take examples of feature shape "
                                 f"{sample.shape[1:]}: a one-example dry run raised "
                                 f"{type(error).__name__}: {error}") from None
            shape = sample.shape[1:]
        examples, labels = check_data(examples, labels, tuple(shape), int(outputs))
        if self._contract_checked != state.layout and getattr(self.model, "dry_run_in_owner", True):
            check_model_contract(self.model, state, examples[:2].astype(np.float32, copy=False),
                                 labels[:2], int(outputs))
            self._contract_checked = state.layout
        return examples, labels, int(outputs)

    def _workspace_spec(self, layout):
        gradients = self.sync == "gradients"
        trainable = self._trainable_map(layout)
        return Workspace.make_spec(layout.size, layout.num_weights, self.num_processes,
                                   versions=2 if gradients else 1,
                                   optimizer_copies=1 if gradients else self.num_processes,
                                   optimizer_buffers=self.optimizer.num_buffers,
                                   slot_values=trainable.size if gradients else layout.size,
                                   weight_ranges=trainable.weight_ranges)

    def _running(self, layout):
        """Whether the workers run for this layout and the current frozen set."""
        return self._layout == layout and self._executor is not None and \
            self._running_map == self._trainable_map(layout)

    def _data_spec(self, rows, feature_shape, num_outputs):
        return DataArrays.make_spec(rows, feature_shape, num_outputs, self.batch_size,
                                    self.num_processes)

    def _check_shared_space(self, layout, examples, num_outputs):
        """Refuse, before creating anything, a run whose blocks do not fit in /dev/shm (a page
        fault past a full tmpfs is a SIGBUS, not an error)."""
        if self.num_processes == 1:
            return
        sizes = []
        if not self._running(layout):
            sizes.append(Workspace.nbytes(self._workspace_spec(layout)))
        data = self._data
        if sizes or data is None or data.spec["capacity"] < len(examples) or \
                data.spec["feature_shape"] != tuple(examples.shape[1:]):
            sizes.append(DataArrays.nbytes(self._data_spec(len(examples), examples.shape[1:],
                                                           num_outputs)))
        if sizes:
            check_shared_memory_space(*sizes)

    def _start(self, layout, num_outputs):
        if self._running(layout):
            return
        self.close()
        try:
            self._start_workers(layout, num_outputs)
        except BaseException:
            self.close()  # a start that failed half way leaves nothing behind: the next call starts
            raise

    def _start_workers(self, layout, num_outputs):
        sweep_orphaned_blocks()
        spec = self._workspace_spec(layout)
        shared = self.num_processes > 1
        memory.check_fits(Workspace.nbytes(spec), self.num_processes if shared else 0,
                          layout.size * 4)
        self._work = work = Workspace(spec, shared=shared, create=True)
        trainable = self._trainable_map(layout)
        work.state_bounds[:] = partition(trainable.size, self.num_processes)  # compact numbering
        work.control[ws.SEED] = self.seed
        work.control[ws.MICRO_BATCH] = self.micro_batch_size or 0
        work.control[ws.UPDATE_INTERVAL] = self.update_interval
        work.control[ws.NODE_COUNT] = 1 if self.cluster is None else self.cluster.size
        work.control[ws.NODE_RANK] = 0 if self.cluster is None else self.cluster.rank
        kept, self._kept_optimizer = self._kept_optimizer, None
        if self._pending_training_state is not None:
            self._apply_training_state()
        elif kept is not None and kept[0] == layout and kept[1].shape == work.optimizer.shape:
            self._set_step(kept[2], kept[1])
        self._num_outputs = num_outputs
        # The owner never spins: its waits (the cross-node thread) must leave the cores to workers.
        self._barriers = Barriers(work.arrivals, work.doorbell, work.abort, spin_s=0.0)
        if shared:
            kernels.warm_up()  # forked workers inherit compiled kernels
            self._holds_sigterm = signals.hold()
            self._executor = WorkerPool(
                dict(model=self.model, layout=layout, optimizer=self.optimizer, sync=self.sync,
                     workspace=work.spec, threads=self.threads_per_process,
                     owner_pid=os.getpid()),
                self.num_processes, self.start_method, self._timeout_s, self.max_restarts,
                progress=self._worker_progress,
                abort=self._barriers.abort_all, tick=self._tick,
                core_sets=worker_core_sets(self.num_processes, self.threads_per_process,
                                           *self._local_ranks) if self.bind_cores else None)
        else:
            self._executor = InProcessExecutor(ops.WorkerCore(0, self.model, layout,
                                                              self.optimizer, work,
                                                              sync=self.sync))
        self._layout, self._running_map = layout, trainable

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

    def _load_data(self, examples, labels):
        """Copy examples and labels into the data block (grown when too small); workers read
        their shards through each pass's order."""
        rows, feature_shape = len(examples), tuple(examples.shape[1:])
        data = self._data
        if data is None or data.spec["capacity"] < rows or \
                data.spec["feature_shape"] != feature_shape:
            if data is not None:
                data.close()  # workers still map it until they attach the new block; that is fine
            spec = self._data_spec(rows, feature_shape, self._num_outputs)
            memory.check_fits(DataArrays.nbytes(spec), 0, 0)
            self._data = data = DataArrays(spec, shared=self.num_processes > 1, create=True)
            try:
                self._executor.attach_data(data)
            except BaseException:
                self.close()
                raise
        chunk = max(1, (64 << 20) // max(1, examples[:1].nbytes))  # bound the temporary to ~64 MiB
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            data.examples[start:stop] = examples[start:stop]
            data.labels[start:stop] = labels[start:stop]

    def _load_state(self, state):
        """Put ``state`` in shared memory, unless it is (a copy of) the state this processor
        returned last: then the shared state, and in states mode the workers' local states, go on
        from where they are."""
        returned = self._returned_state
        if returned is not None and (state is returned or np.array_equal(
                state.buffer.view(np.uint32), returned.buffer.view(np.uint32))):
            return
        work = self._work
        work.params[:] = state.buffer
        if self._crosses_nodes():
            self.cluster.bcast_(work.params)  # every node starts from rank 0's state
        for start, stop in self._running_map.frozen_ranges:  # updates never write them
            work.versions_of_params[:, start:stop] = work.params[start:stop]
        work.control[ws.REFRESH] = 1.0
        work.results[:, ws.SINCE_SYNC] = 0.0
        self._steps_since_average = 0

    def _current_state(self):
        self._returned_state = NetworkState.from_buffer(self._layout, self._work.params.copy())
        return self._returned_state

    # -- a pass ----------------------------------------------------------------------------------
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
            data.step_learning_rates[:num_steps] = _learning_rates(learning_rate, base, num_steps)
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
        results = _collect(data.records[:num_steps], data.step_learning_rates[:num_steps],
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

    def _crosses_nodes(self):
        return self.cluster is not None and self.cluster.size > 1

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


class InProcessExecutor:
    """Runs the worker maths in this process (num_processes=1), answering the pool's calls."""

    def __init__(self, core):
        self.core, self.restarts, self.pids, self.timeout_s = core, [], [], None

    def run(self, op, step=None):
        self.core.run(op)

    def attach_data(self, data):
        self.core.data = data
        self.core._rows_buffer = None

    def reset_restart_budget(self):
        pass

    def close(self):
        self.core = None


def _make_cluster(cluster, timeout_s):
    if cluster is None or hasattr(cluster, "mean_"):
        return cluster
    from engine.parallel.cluster import make_cluster  # imports mpi4py only when asked for
    return make_cluster(cluster, timeout_s=timeout_s)


def _data_key(examples, labels):
    """What identifies a data set between calls: the array objects themselves (weakly), their
    memory, shape and dtype, and the bytes of a fingerprint of rows spread over them."""
    if not (isinstance(examples, np.ndarray) and isinstance(labels, np.ndarray)) or \
            examples.ndim == 0 or labels.ndim != 1 or len(examples) == 0 or \
            len(labels) != len(examples):
        return None  # not reusable: check_data says what is wrong
    rows = np.unique(np.linspace(0, len(examples) - 1, _FINGERPRINT_ROWS).astype(np.int64))
    fingerprint = hash(np.ascontiguousarray(examples[rows]).tobytes() +
                       np.ascontiguousarray(labels[rows % len(labels)]).tobytes())
    return (_Same(examples), _Same(labels), examples.shape, examples.dtype.str,
            examples.__array_interface__["data"][0], labels.shape, labels.dtype.str,
            labels.__array_interface__["data"][0], fingerprint)


class _Same:
    """Equal only to a key of the very same (still living) object."""

    def __init__(self, obj):
        self._ref = weakref.ref(obj)

    def __eq__(self, other):
        return isinstance(other, _Same) and self._ref() is not None and self._ref() is other._ref()

    def __hash__(self):
        return id(self._ref())


def _learning_rates(learning_rate, base, num_steps):
    if not callable(learning_rate):
        return learning_rate
    return [check_learning_rate(learning_rate(base + k), base + k) for k in range(num_steps)]


def _collect(records, learning_rates, kind, sync, began, ended):
    """Per-step results from the workers' records (steps x workers x fields)."""
    counts = records[:, :, ws.R_COUNT]
    examples = counts.sum(axis=1)
    loss = (counts * records[:, :, ws.R_LOSS]).sum(axis=1) / np.maximum(examples, 1)
    compute_s = records[:, :, ws.R_COMPUTE_S].max(axis=1)
    started = records[:, 0, ws.R_STARTED]
    if kind == ws.TRAIN and sync == "gradients":
        computed, finished = records[:, 0, ws.R_COMPUTED], records[:, 0, ws.R_ENDED]
        # A step lasts from its start to the next one's (the work between steps counts too).
        wall_s = np.diff(np.append(started, finished[-1:]))
        sync_s = finished - computed
        wait_s = np.maximum(0.0, (computed - started) - compute_s)
        grad_norm = np.sqrt(records[:, :, ws.R_SUM_SQUARES].sum(axis=1))
    else:  # no barrier per step: a step lasts until the next one starts
        wall_s = np.diff(np.append(started, ended))
        sync_s = np.maximum(0.0, wall_s - compute_s)
        wait_s = np.zeros(len(records))
        grad_norm = np.full(len(records), np.nan)
    results = dict(loss=loss, examples=examples.astype(np.int64), compute_s=compute_s,
                   sync_s=sync_s, wait_s=wait_s, wall_s=wall_s, grad_norm=grad_norm,
                   learning_rate=np.array(learning_rates, dtype=np.float64).copy()
                   if kind == ws.TRAIN else np.full(len(records), np.nan))
    results["mean_loss"] = float(np.dot(loss, examples) / max(1, examples.sum()))
    return results


def _warn_oversubscription(num_processes, cores):
    global _warned_oversubscription
    if not _warned_oversubscription:
        _warned_oversubscription = True
        warnings.warn(f"num_processes={num_processes} is more than the {cores} usable cores: "
                      "processes will share cores and each step waits for the slowest. Use "
                      "num_processes=None for one process per core.", RuntimeWarning, stacklevel=3)
