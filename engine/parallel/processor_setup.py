"""A call's inputs into shared memory: validated once, sized against /dev/shm, workers started.

A mixin of ``ParallelBatchProcessor`` (its methods use the attributes the processor sets up),
apart from the pass because it is the first stage of a call: check the data and state (once
each, see ``engine.parallel.data_identity``), start the workers for the state's layout and the
frozen set, and copy the data and state into shared memory. ``close()`` (in the processor)
releases what this creates.
"""
import os
import weakref

import numpy as np

from engine.core import kernels
from engine.core.protocol import check_model_contract
from engine.core.sharding import TrainableMap, partition
from engine.core.state import NetworkState
from engine.core.validation import check_data, check_model, check_state
from engine.parallel import memory, signals
from engine.parallel import worker as ops
from engine.parallel import workspace as ws
from engine.parallel.barrier import Barriers
from engine.parallel.data_identity import data_key
from engine.parallel.pool import InProcessExecutor, WorkerPool
from engine.parallel.shm import check_shared_memory_space, sweep_orphaned_blocks
from engine.parallel.system import worker_core_sets
from engine.parallel.workspace import DataArrays, Workspace


class ProcessorSetup:
    """ParallelBatchProcessor's methods that prepare a call (see the module docstring)."""

    def _trainable_map(self, layout):
        """The map for ``layout`` and the frozen set, built once per pair (asked on every call)."""
        key = (layout, self._frozen_names)
        cached = self._trainable_map_cache
        if cached is None or cached[0] != key:
            cached = self._trainable_map_cache = (key, TrainableMap.of(layout, self._frozen_names))
        return cached[1]

    def _prepare(self, examples, labels, state, reuse):
        """Validate what the call received (data and state once each), start the workers for this
        state's layout, and put the data in shared memory. Returns the number of rows."""
        check_model(self.model)
        # Weakly: a worker forked during this call drops its inherited copy of them (inherited).
        self._caller_arrays = [weakref.ref(a) for a in (examples, labels)
                               if isinstance(a, np.ndarray)]
        layout = self._layout or self.model.init_state(self.seed).layout
        if state is not self._returned_state or state is None:
            check_state(state, layout)
        key = data_key(examples, labels) if reuse else None
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
                     owner_pid=os.getpid(), spin_s=self._spin_s),
                self.num_processes, self.start_method, self._timeout_s, self.max_restarts,
                progress=self._worker_progress,
                abort=self._barriers.abort_all, tick=self._tick,
                caller_arrays=lambda: self._caller_arrays,
                core_sets=worker_core_sets(self.num_processes, self.threads_per_process,
                                           *self._local_ranks) if self.bind_cores else None)
        else:
            self._executor = InProcessExecutor(ops.WorkerCore(0, self.model, layout,
                                                              self.optimizer, work,
                                                              sync=self.sync))
        self._layout, self._running_map = layout, trainable

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
