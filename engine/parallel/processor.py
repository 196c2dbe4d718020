"""ParallelBatchProcessor: data-parallel training passes run by persistent worker processes.

This module holds the public class: its contract, its options and public methods, and what it
keeps between calls (optimizer state, frozen set, closing the workers and shared memory). The
two stages of a call are mixins, each in its own module: ``processor_setup`` (the call's data
and state into shared memory, workers started) and ``processor_pass`` (a pass planned, run and
turned into results).
"""
import warnings

import numpy as np

from engine.core.optim import make_optimizer
from engine.core.sharding import match_frozen
from engine.core.state import NetworkState
from engine.core.validation import check_params, check_processor_options
from engine.parallel import memory, signals
from engine.parallel import workspace as ws
from engine.parallel.barrier import spin_seconds
from engine.parallel.pool import default_start_method
from engine.parallel.processor_pass import ProcessorPass
from engine.parallel.processor_setup import ProcessorSetup
from engine.parallel.system import usable_cores
from engine.parallel.timeline import Timeline

_warned_oversubscription = False


class ParallelBatchProcessor(ProcessorSetup, ProcessorPass):
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
            1 runs in this process with the same maths (the debugging mode and test oracle);
            this process then keeps freed memory for reuse as workers do (glibc ``mallopt``,
            ``engine.parallel.system.keep_freed_memory``).
        batch_size: global batch size (examples per step, all workers together).
        sync: "gradients" or "states". update_interval: steps between averages (states mode).
        optimizer: "sgd", "adam", "adamw", or an object such as ``engine.SGD(momentum=0.9)``.
            Its state persists across calls until :meth:`reset_optimizer`.
        seed: seeds batch shuffling and each worker's per-step random stream (dropout).
        start_method: "fork", "spawn" or "forkserver"; None picks fork on Linux (spawn once
            TensorFlow is imported, which is not fork-safe). A forked worker of one of the
            engine's own models drops its inherited copy of the arrays passed to the call, which
            it never reads (``engine.parallel.inherited``); for a model class of your own it
            keeps them, since its code could read them.
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
        self._spin_s = spin_seconds()  # read once: a bad ENGINE_BARRIER_SPIN_US fails here
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
        self._caller_arrays = []        # weak references to the call's examples and labels
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
        self._trainable_map_cache = None  # ((layout, frozen names), TrainableMap) of the last ask
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

    def _crosses_nodes(self):
        return self.cluster is not None and self.cluster.size > 1

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
            ``compute_s`` (the slowest worker's), ``sync_s``, ``wait_s``, ``wall_s``,
            ``grad_norm``, ``learning_rate``; ``worker_compute_s`` (steps x workers: each
            worker's own compute); per-worker ``peak_rss_bytes``; ``mean_loss``; ``restarts`` and
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


def _make_cluster(cluster, timeout_s):
    if cluster is None or hasattr(cluster, "mean_"):
        return cluster
    from engine.parallel.cluster import make_cluster  # imports mpi4py only when asked for
    return make_cluster(cluster, timeout_s=timeout_s)


def _warn_oversubscription(num_processes, cores):
    global _warned_oversubscription
    if not _warned_oversubscription:
        _warned_oversubscription = True
        warnings.warn(f"num_processes={num_processes} is more than the {cores} usable cores: "
                      "processes will share cores and each step waits for the slowest. Use "
                      "num_processes=None for one process per core.", RuntimeWarning, stacklevel=3)
