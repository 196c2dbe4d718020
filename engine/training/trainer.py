"""Trainer: epochs of ``ParallelBatchProcessor.run_parallel`` with validation, learning-rate
schedules, callbacks, checkpoints and exact resume; ``fit`` and ``evaluate`` are its functional
forms.

One epoch is one ``run_parallel`` pass over the training set (shuffled by the processor's seeded
stream) at the schedule's rate for that epoch; validation is ``run_parallel`` with
``update_weights=False``. The trainer adds no maths of its own: a loss other than cross-entropy is
carried by the model (``Sequential.with_loss``), gradient accumulation is the processor's
``micro_batch_size``, clipping its ``params["clip_norm"]``.

Data larger than ``memory_limit_bytes`` (memory-mapped ``.npy``, HDF5) is streamed: each epoch
visits a seeded permutation in segments that fit the limit, one ``run_parallel`` call per segment
(a multiple of the global batch, so only the epoch's last batch is partial; ``sync="states"``
averages at every segment end).
"""
import contextlib
import numbers
import os
import time
import warnings

import numpy as np

from engine.training.callbacks import CSVLogger, ModelCheckpoint, ProgressBar
from engine.training.checkpoint import load_checkpoint
from engine.training.datasets import (Feed, Standardizer, Subset, as_labels, check_every_class,
                             check_features, check_labels, describe, stratified_split)
from engine.training.evaluation import _predict, evaluate
from engine.training.history import History, merge_results
from engine.training.losses import make_loss
from engine.training.phases import phase_index, phase_schedules, plan_epochs
from engine.training.resume import ResumeMixin
from engine.training.run_folder import hold_run_folder, run_folder_of
from engine.backends.device import make_processor
from engine.training.schedules import Schedule
from engine.parallel.system import available_memory_bytes, usable_cores
from engine.core.sharding import match_frozen

__all__ = ["Trainer", "fit", "evaluate", "make_loss"]

TRAIN_ACCURACY_SAMPLE = 2000  # training examples re-evaluated after each epoch for "accuracy"
# timeout_s="auto": hang detection on by default. The first epoch is the warm-up (worker start,
# first reads of memory-mapped data, TensorFlow tracing); afterwards a phase may take the larger of
# 60 s and 20x the median step time of the last epoch before its worker is killed and replaced.
WARM_UP_TIMEOUT_S = 300.0
HANG_TIMEOUT_FLOOR_S = 60.0
HANG_TIMEOUT_STEPS = 20


class Trainer(ResumeMixin):
    """Trains a model with a ParallelBatchProcessor, one ``run_parallel`` pass per epoch.

    Args:
        model: a model following the protocol in ``models``; ``num_outputs`` classes.
        batch_size: examples per optimizer step (all processes together; times ``grad_accum``).
        num_processes, sync, update_interval, optimizer, seed: as for ParallelBatchProcessor.
        learning_rate: the base rate. schedule: "constant", "step", "warmup-cosine", "plateau"
            (defaults of ``make_schedule``) or an ``engine.training.schedules.Schedule`` (its own rate).
        loss: None or "cross_entropy", "focal", or a ``models.losses`` object; a
            ``class_weight="balanced"`` in it is resolved from the training labels (scikit-learn).
        clip_norm: clip each step's gradient to this global norm (None: no clipping).
        grad_accum: K: one step per K x batch_size examples, run in micro-batches of batch_size.
        callbacks: ``engine.training.callbacks`` objects. output_dir: if set, also write history.csv,
            checkpoints/last.h5 (every epoch, for resume), checkpoints/best.h5 (best val_loss)
            and, at the end, model.h5 (the trained state that ``fit`` returns) there.
        standardize: scale features by training-split mean and std (kept in checkpoints).
        verbose: show a progress bar. metadata: JSON dict stored in every checkpoint.
        memory_limit_bytes: training data above this streams (default: 1/4 of available memory).
        device: "auto" (a Keras model goes to tf.distribute.MirroredStrategy when TensorFlow sees
            GPUs, everything else to the engine), "cpu" or "gpu". mixed_precision, xla: options
            of the GPU path (engine.backends.MirroredProcessor).
        timeout_s: "auto" (default): hang detection on, 300 s during the first epoch, then the
            larger of 60 s and 20x the median step time; a number of seconds; None: wait forever.
        overwrite: replace a run already in output_dir instead of refusing (resuming the run
            that is there needs no overwrite). output_dir is held exclusively while fit runs.
        freeze: fnmatch patterns of weight names kept fixed for the whole run (e.g. ["conv*"];
            ``ParallelBatchProcessor.set_frozen``). phases: a phase plan instead, e.g.
            ``[dict(epochs=5, freeze=["conv*"], learning_rate=1e-3), dict(epochs=10,
            learning_rate=1e-4)]`` (``engine.training.phases``); history and checkpoints record
            the phase, and a resumed run continues in the phase of its epoch.
        timeline: a path for a Chrome trace of every step (``ParallelBatchProcessor(timeline=)``),
            written when training ends; on a cluster only rank 0 writes it.
        cluster: None, or "mpi" under ``mpirun``/``srun`` (one process per node, each with its
            workers; docs/cluster.md): every rank ends with the same state; only rank 0 writes
            output_dir and shows progress.
    """

    def __init__(self, model, *, batch_size=32, num_processes=None, sync="gradients",
                 update_interval=1, optimizer="adam", learning_rate=1e-3, schedule="constant",
                 loss=None, clip_norm=None, grad_accum=1, callbacks=(), output_dir=None, seed=0,
                 standardize=False, verbose=True, metadata=None, memory_limit_bytes=None,
                 start_method=None, timeout_s="auto", device="auto", mixed_precision=False,
                 xla=False, overwrite=False, freeze=None, phases=None, cluster=None,
                 timeline=None):
        if freeze and phases is not None:
            raise ValueError("give freeze= or phases=, not both: with a phase plan, each phase "
                             "names its own frozen weights (dict(epochs=..., freeze=[...])).")
        self.freeze, self.phases = freeze, phases
        _check_positive_int(grad_accum, "grad_accum", "Use 1 for one step per batch.")
        _check_positive_int(batch_size, "batch_size", "It is the global batch of one step.")
        if clip_norm is not None and (isinstance(clip_norm, bool) or not isinstance(
                clip_norm, numbers.Real) or not clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive number or None. Received: "
                             f"clip_norm={clip_norm!r}.")
        if timeout_s != "auto" and timeout_s is not None and (isinstance(timeout_s, bool) or not
                                                           isinstance(timeout_s, numbers.Real)
                                                           or not timeout_s > 0):
            raise ValueError(f"timeout_s must be 'auto', a positive number of seconds or None. "
                             f"Received: timeout_s={timeout_s!r}.")
        if not isinstance(schedule, (str, Schedule)):
            raise TypeError(f"schedule must be a name or an engine.training.schedules.Schedule. Received: "
                            f"{schedule!r}.")
        # The model and loss as given; fit() resolves class weights from its own training labels.
        self._base_model, self._loss_spec = model, make_loss(loss)
        self.model, self.loss = model, self._loss_spec
        self.batch_size, self.grad_accum, self.clip_norm = batch_size, grad_accum, clip_norm
        self.learning_rate, self.schedule = learning_rate, schedule
        self.callbacks, self.output_dir, self.overwrite = list(callbacks), output_dir, overwrite
        self.timeout_s = timeout_s
        self.seed, self.standardize, self.verbose = seed, standardize, verbose
        self.metadata = dict(metadata or {})
        self.memory_limit_bytes = memory_limit_bytes or available_memory_bytes() // 4
        processes = num_processes or usable_cores()
        # Gradient accumulation IS the processor's micro-batching: a step over K x batch_size
        # examples whose workers run chunks of one micro-batch's share (the gradients of chunks
        # are averaged weighted by size, so it is one step on the K x batch_size batch).
        micro = -(-batch_size // processes) if grad_accum > 1 else None
        self.processor_options = dict(
            num_processes=num_processes, batch_size=batch_size * grad_accum, sync=sync,
            update_interval=update_interval, optimizer=optimizer, seed=seed,
            micro_batch_size=micro, start_method=start_method,
            timeout_s=WARM_UP_TIMEOUT_S if timeout_s == "auto" else timeout_s, timeline=timeline)
        # Keras models go to tf.distribute when GPUs are there (engine.backends.device).
        self.device_options = dict(device=device, mixed_precision=mixed_precision, xla=xla)
        self.cluster = self._join_cluster(cluster, device)
        self.state, self.history, self.standardizer = None, History(), None
        self.stop_training, self.epochs, self.initial_epoch = False, 0, 0
        self._processor = None

    def _join_cluster(self, cluster, device):
        """The Cluster for ``cluster=`` (None on one machine); on ranks other than 0, no files and
        no progress bar: rank 0 writes for every rank, whose states are the same."""
        if cluster is None:
            return None
        if device == "gpu":
            raise ValueError("cluster= runs on the engine's CPU workers, not the GPU path. "
                             f"Received: device={device!r}, cluster={cluster!r}. Use "
                             "device='cpu' (or 'auto').")
        from engine.parallel.cluster import make_cluster
        timeout_s = self.processor_options["timeout_s"]
        joined = cluster if hasattr(cluster, "mean_") else make_cluster(cluster,
                                                                        timeout_s=timeout_s)
        self.device_options["device"] = "cpu"
        self.processor_options["cluster"] = joined
        if not joined.is_root:
            self.output_dir, self.verbose = None, False
            self.processor_options["timeline"] = None
        return joined

    # -- public API ------------------------------------------------------------------------------
    def fit(self, x, y, *, epochs=None, validation_data=None, validation_split=0.0, resume=None,
            initial_state=None, check_data=True):
        """Train for epochs ``initial_epoch + 1 .. epochs`` and return the History.

        Args:
            x, y: features (array, memory map, h5py dataset) and integer labels.
            epochs: the last epoch to train (a resumed run continues up to it); with phases, at
                most their total (the default).
            validation_data: ``(x_val, y_val)``; or validation_split: a fraction of (x, y) held
                out, stratified by class and seeded.
            resume: a checkpoint written by this trainer: restores weights, theta, optimizer
                state, epoch, schedule, callback states, standardization and the RNG streams.
            initial_state: start from this NetworkState instead of ``model.init_state(seed)``.
            check_data: read the features once to check they are finite (skip it only for data
                checked already: it is a full pass over a memory-mapped file).
        Raises:
            ValueError (DataError) for bad data or options, before any worker starts.
        """
        self._plan, epochs = plan_epochs(self.phases, epochs, freeze=self.freeze,
                                         learning_rate=self.learning_rate, schedule=self.schedule)
        self.epochs = epochs
        x_train, y_train, x_val, y_val = self._prepare_data(x, y, validation_data,
                                                            validation_split, check_data)
        layout = self.model.init_state(self.seed).layout
        for phase in self._plan:  # every pattern checked before any worker starts
            match_frozen([n for n, _ in layout.weight_shapes], phase.freeze,
                         [n for n, _ in layout.theta_shapes])
        checkpoint = load_checkpoint(resume, layout=layout) if resume is not None else None
        if checkpoint is not None and checkpoint.training_state is None:
            raise ValueError(f"{resume!r} holds a state but no training progress; resume needs a "
                             "checkpoint written by the trainer (ModelCheckpoint).")
        self.standardizer = (Standardizer.from_arrays(checkpoint.arrays) if checkpoint else None) \
            or (Standardizer.fit(x_train) if self.standardize else None)
        self._schedules = phase_schedules(self._plan)  # without phases: one, over all epochs
        self._schedule, self._frozen_now = self._schedules[0], ()
        self.model = self._model_with_loss(y_train)
        self._train = Feed(x_train, y_train, self.standardizer, self.memory_limit_bytes)
        self._val = None if x_val is None else Feed(x_val, y_val, self.standardizer,
                                                     self.memory_limit_bytes)
        sample = np.random.default_rng(self.seed).permutation(len(y_train))
        sample = np.sort(sample[:TRAIN_ACCURACY_SAMPLE])
        self._train_sample = Feed(Subset(x_train, sample), y_train[sample], self.standardizer,
                                   self.memory_limit_bytes)
        self._stream_rng = np.random.default_rng([self.seed, 1])
        callbacks = self._all_callbacks(x_val is not None)
        self.state = initial_state.copy() if initial_state is not None else \
            self.model.init_state(self.seed)
        self.history, self.initial_epoch, self._epochs_done = History(), 0, 0
        with self._hold_output_dir(resume):
            self._processor = make_processor(self.model, **self.device_options,
                                             **self.processor_options)
            if any(p.freeze for p in self._plan) and not hasattr(self._processor, "set_frozen"):
                self._processor.close()
                raise ValueError(f"freezing weights needs the engine's processor; "
                                 f"{type(self._processor).__name__} (the GPU path) cannot. Use "
                                 "device='cpu', or train without freeze.")
            try:
                if checkpoint is not None:
                    self._restore(checkpoint, callbacks, resume)
                if self.initial_epoch >= epochs:
                    warnings.warn(f"{resume!r} has already trained {self.initial_epoch} epochs, "
                                  f"so epochs={epochs} leaves nothing to do. Pass a larger epochs "
                                  "to continue.", RuntimeWarning, stacklevel=2)
                else:
                    self._loop(callbacks)
                    if self.output_dir is not None:
                        self.save_checkpoint(os.path.join(self.output_dir, "model.h5"))
            finally:
                self._processor.close()
        self.history.state, self.history.standardizer = self.state, self.standardizer
        return self.history

    def evaluate(self, x, y, state=None):
        """``{"loss", "accuracy", "probabilities"}`` of ``state`` (default: the trained one)."""
        return evaluate(self.model, self.state if state is None else state, x, y,
                        standardizer=self.standardizer,
                        num_processes=self.processor_options["num_processes"],
                        batch_size=self.processor_options["batch_size"])

    # -- setup -----------------------------------------------------------------------------------
    def _hold_output_dir(self, resume):
        """The output folder, held for the run (a no-op without one); see run_folder."""
        if self.output_dir is None:
            return contextlib.nullcontext()
        resuming = resume is not None and run_folder_of(resume) == os.path.realpath(
            self.output_dir)
        return hold_run_folder(self.output_dir, overwrite=self.overwrite, resuming=resuming)

    def _prepare_data(self, x, y, validation_data, validation_split, check_data):
        num_classes = int(self.model.num_outputs)
        name = describe(x, "x")
        y = as_labels(y, "y")
        check_features(x, name, num_labels=len(y), finite=check_data)
        check_labels(y, num_classes, f"labels of {name}")
        x_val = y_val = None
        if validation_data is not None:
            x_val, y_val = validation_data
            val_name = describe(x_val, "validation_data x")
            y_val = as_labels(y_val, "validation_data y")
            check_features(x_val, val_name, num_labels=len(y_val), finite=check_data)
            check_labels(y_val, num_classes, f"labels of {val_name}")
        elif validation_split:
            if not 0 < validation_split < 1:
                raise ValueError(f"validation_split must be in [0, 1). Received: "
                                 f"validation_split={validation_split!r}.")
            kept, held = stratified_split(y, validation_split, self.seed, name)
            x, y, x_val, y_val = Subset(x, kept, name), y[kept], Subset(x, held, name), y[held]
        check_every_class(y, num_classes, name)
        return x, y.astype(np.int64, copy=False), x_val, y_val

    def _model_with_loss(self, y_train):
        loss = self._loss_spec
        if loss is None:
            return self._base_model
        if loss.class_weight == "balanced":
            from sklearn.utils.class_weight import compute_class_weight
            classes = np.arange(self.model.num_outputs)
            loss = loss.with_class_weight(compute_class_weight("balanced", classes=classes,
                                                               y=y_train))
        if not callable(getattr(self._base_model, "with_loss", None)):
            raise TypeError(f"loss={loss!r} needs a model that can carry a loss (models.Sequential "
                            f"and its subclasses); {type(self._base_model).__name__} computes its "
                            "own.")
        self.loss = loss
        return self._base_model.with_loss(loss)

    def _enter_phase(self, epoch):
        """At each epoch: the phase's frozen weights, and at a later phase's first epoch a fresh
        optimizer (reset_optimizer). Returns the phase's index."""
        index = phase_index(self._plan, epoch)
        phase = self._plan[index]
        if epoch == phase.start and index > 0 and phase.reset_optimizer:
            self._processor.reset_optimizer()
        if phase.freeze != self._frozen_now:
            self._processor.set_frozen(list(phase.freeze))
            self._frozen_now = phase.freeze
        self._schedule = self._schedules[index]
        return index

    def _all_callbacks(self, validating):
        callbacks = list(self.callbacks)
        if self.output_dir is not None:
            folder = os.path.join(self.output_dir, "checkpoints")
            callbacks.append(CSVLogger(os.path.join(self.output_dir, "history.csv")))
            callbacks.append(ModelCheckpoint(os.path.join(folder, "last.h5")))
            if validating:
                callbacks.append(ModelCheckpoint(os.path.join(folder, "best.h5"),
                                                 monitor="val_loss", save_best_only=True))
        if self.verbose:
            callbacks.append(ProgressBar())
        produced = {"loss", "accuracy", "learning_rate"} | (
            {"val_loss", "val_accuracy"} if validating else set())
        wanted = [(type(c).__name__, m) for c in callbacks for m in c.monitors]
        wanted += [("ReduceLROnPlateau", schedule.monitor) for schedule in self._schedules
                   if hasattr(schedule, "monitor")]
        for owner, monitor in wanted:
            if monitor not in produced:
                raise ValueError(f"{owner} monitors {monitor!r}, which this run does not produce "
                                 f"(it logs {sorted(produced)}). Give validation data for val_* "
                                 "metrics, or monitor one of those.")
        # Keys by class and occurrence, so adding another kind of callback on resume keeps the
        # saved states matched to theirs.
        self._callback_keys, seen = {}, {}
        for callback in callbacks:
            name = type(callback).__name__
            seen[name] = seen.get(name, 0) + 1
            self._callback_keys[f"{name}{seen[name]}"] = callback
        for callback in callbacks:
            callback.trainer = self
        return callbacks

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self, callbacks):
        self.stop_training = False
        for callback in callbacks:
            callback.on_train_begin()
        try:
            for epoch in range(self.initial_epoch, self.epochs):
                phase = self._enter_phase(epoch)
                in_phase = epoch - self._plan[phase].start  # a phase's schedule runs from 0
                learning_rate = float(self._schedule(in_phase))
                for callback in callbacks:
                    callback.on_epoch_begin(epoch, {"learning_rate": learning_rate})
                began = time.perf_counter()
                trained = self._train_epoch(learning_rate)
                logs = {"loss": trained.pop("loss"),
                        "accuracy": self._accuracy(self._train_sample)[1]}
                if self._val is not None:
                    logs["val_loss"], logs["val_accuracy"] = self._accuracy(self._val)
                logs.update(trained)
                logs["epoch_s"] = time.perf_counter() - began
                logs["phase"] = phase + 1
                self._schedule.update(in_phase, logs)
                self.history.append(epoch + 1, logs)
                self._epochs_done = epoch + 1
                for callback in callbacks:
                    callback.on_epoch_end(epoch, logs)
                for callback in callbacks:
                    callback.on_epoch_commit(epoch, logs)
                if self.stop_training:
                    break
        finally:
            for callback in callbacks:
                callback.on_train_end()

    def _train_epoch(self, learning_rate):
        params = {"learning_rate": learning_rate, "clip_norm": self.clip_norm}
        feed, parts = self._train, []
        if feed.in_memory:
            self.state, results = self._processor.run_parallel(feed.x, feed.y, self.state, params)
            parts.append(results)
        else:
            order = self._stream_rng.permutation(len(feed.y))
            step_rows = self.processor_options["batch_size"]
            for x, y in feed.segments(order, step_rows):
                self.state, results = self._processor.run_parallel(x, y, self.state, params)
                parts.append(results)
        self._update_timeout([wall for part in parts for wall in part["wall_s"]])
        return merge_results(parts, learning_rate)

    def _update_timeout(self, step_times):
        """timeout_s="auto": after each epoch, 20x its median step time, at least 60 s."""
        if self.timeout_s == "auto" and len(step_times):
            self._processor.timeout_s = max(HANG_TIMEOUT_FLOOR_S,
                                            HANG_TIMEOUT_STEPS * float(np.median(step_times)))

    def _accuracy(self, feed):
        loss, probabilities = _predict(self._processor, self.state, feed)
        return loss, float(np.mean(probabilities.argmax(axis=1) == feed.y))


def fit(model, x, y, *, epochs=None, validation_data=None, validation_split=0.0, resume=None,
        initial_state=None, check_data=True, **options):
    """Train ``model`` on ``(x, y)``; returns a :class:`History` whose ``state`` is the result.

    Every keyword of :class:`Trainer` is accepted (``batch_size``, ``num_processes``, ``sync``,
    ``update_interval``, ``optimizer``, ``learning_rate``, ``schedule``, ``loss``, ``clip_norm``,
    ``grad_accum``, ``callbacks``, ``output_dir``, ``seed``, ``standardize``, ``freeze``,
    ``phases``, ...); the others are those of :meth:`Trainer.fit`.
    """
    trainer = Trainer(model, **options)
    return trainer.fit(x, y, epochs=epochs, validation_data=validation_data,
                       validation_split=validation_split, resume=resume,
                       initial_state=initial_state, check_data=check_data)


def _check_positive_int(value, name, hint):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int. Received: {name}={value!r}. {hint}")

