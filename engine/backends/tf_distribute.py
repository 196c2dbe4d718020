"""MirroredProcessor: a KerasModel trained under ``tf.distribute.MirroredStrategy`` (GPUs), behind
``ParallelBatchProcessor``'s interface, so ``fit``'s callbacks, checkpoints, history and reports
work unchanged.

This module imports TensorFlow in the calling process (the GPU path has no worker pool to fork).

What a step does, and why it equals the engine's ``sync="gradients"`` step
--------------------------------------------------------------------------
The global batch is cut into contiguous shards exactly as the engine cuts it (``split_batch``:
sizes differ by at most one), one per replica. Each replica's loss is the SUM of its per-example
losses divided by the global batch's rows (regularisation divided by the number of replicas), so
the all-reduced SUM of the replicas' gradients is the gradient of the mean loss over the batch.
The gradient's global norm is taken on the all-reduced gradient (clipping scales every replica's
gradient by the same factor), and Keras' optimizer applies the sum. Non-trainable variables
(BatchNorm statistics) are per replica in Keras 3 (aggregation "none"); after every step each
replica's values are replaced by their mean weighted by shard size, which is what the engine does
with theta.
"""
import json
import resource
import time

import numpy as np

from engine.core.errors import NonFiniteLossError
from engine.core.optim import SGD, Adam, make_optimizer
from engine.core.state import NetworkState
from engine.core.sharding import split_batch
from engine.core.validation import check_data, check_params, check_state

__all__ = ["MirroredProcessor", "split_cpu_into_logical_devices"]


def split_cpu_into_logical_devices(count):
    """Make TensorFlow show ``count`` logical CPUs ("/cpu:0" ...): MirroredStrategy over them runs
    the real multi-replica code path without a GPU. Must run before TensorFlow executes anything."""
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    return [f"/cpu:{index}" for index in range(count)]


class MirroredProcessor:
    """Data-parallel steps of a :class:`KerasModel` on several devices with MirroredStrategy.

    Same calls and results as :class:`engine.ParallelBatchProcessor` in ``sync="gradients"``
    mode, with the same contract: one step equals one step on the whole batch (float32 rounding).

    Args:
        model: an ``engine.backends.KerasModel``.
        devices: device names; None means every GPU TensorFlow sees.
        batch_size, optimizer, seed: as for ParallelBatchProcessor (the optimizer runs as the
            matching Keras optimizer: SGD with momentum/Nesterov, Adam, AdamW).
        mixed_precision: compute in float16 with float32 variables ("mixed_float16"; the output
            layer stays float32) and dynamic loss scaling.
        xla: compile the step with XLA (``jit_compile=True``).
    Raises:
        ValueError: if no device is given or visible, or the model is not a KerasModel.
        NonFiniteLossError: as the engine's, but its ``last_good_state`` is the state the call
            started from (a copy before every step would cost a device-to-host copy per step).
    """

    def __init__(self, model, *, devices=None, batch_size=50, optimizer="adam", seed=0,
                 mixed_precision=False, xla=False):
        from engine.backends.keras import KerasModel
        if not isinstance(model, KerasModel):
            raise ValueError(f"MirroredProcessor trains an engine.backends.KerasModel. Received: "
                             f"{type(model).__name__}.")
        import tensorflow as tf
        devices = list(devices) if devices is not None else [
            device.name for device in tf.config.list_logical_devices("GPU")]
        if not devices:
            raise ValueError("MirroredProcessor needs devices, and TensorFlow sees no GPU. Pass "
                             "devices=[...] or use ParallelBatchProcessor on the CPU.")
        if batch_size < len(devices):
            raise ValueError(f"batch_size must be at least the number of devices. Received: "
                             f"batch_size={batch_size} for {len(devices)} devices.")
        self.model, self.devices, self.batch_size = model, devices, int(batch_size)
        self.num_processes = len(devices)  # what reports call the degree of parallelism
        self.optimizer = make_optimizer(optimizer)
        self.seed, self.mixed_precision, self.xla = int(seed), bool(mixed_precision), bool(xla)
        self._rng = np.random.default_rng(self.seed)
        self._strategy = tf.distribute.MirroredStrategy(devices)
        self._spec = model.spec()
        self._returned_state = self._call_start_state = None
        self._build()

    # -- public API, as ParallelBatchProcessor -----------------------------------------------------
    def run_parallel(self, examples, labels, initial_state, params=None):
        """One pass over the data in shuffled global batches; see ParallelBatchProcessor."""
        learning_rate, update_weights, clip_norm = check_params(params)
        examples, labels = self._check(examples, labels, initial_state)
        self._load_state(initial_state)
        order = self._rng.permutation(len(examples)) if update_weights else np.arange(len(examples))
        records, predictions = [], []
        for start in range(0, len(examples), self.batch_size):
            index = order[start:start + self.batch_size]
            if update_weights:
                records.append(self._train_step(examples[index], labels[index], learning_rate,
                                                clip_norm))
            else:
                record, probabilities = self._evaluate_step(examples[index], labels[index])
                records.append(record)
                predictions.append(probabilities)
        results = {key: np.array([record[key] for record in records]) for key in records[0]}
        results["examples"] = results["examples"].astype(np.int64)
        results["mean_loss"] = float(np.dot(results["loss"], results["examples"]) / len(examples))
        results["peak_rss_bytes"] = np.array([_peak_rss_bytes()], np.int64)
        results["restarts"] = []
        if not update_weights:
            results["predictions"] = np.concatenate(predictions)
        return self._current_state(), results

    def process_batch(self, examples, labels, state, params=None):
        """One step on one global batch (all of ``examples``), split across the devices."""
        learning_rate, update_weights, clip_norm = check_params(params)
        examples, labels = self._check(examples, labels, state)
        if state is not self._returned_state:
            self._load_state(state)
        self._call_start_state = state
        if update_weights:
            results = self._train_step(examples, labels, learning_rate, clip_norm)
        else:
            results, predictions = self._evaluate_step(examples, labels)
            results["predictions"] = predictions
        results["peak_rss_bytes"], results["restarts"] = [_peak_rss_bytes()], []
        return self._current_state(), results

    def training_state(self):
        """Optimizer buffers in the engine's layout (num_buffers, num_weights), the step count and
        the shuffling stream: checkpoints move between this path and the CPU engine."""
        buffers = [np.concatenate([np.asarray(v.numpy(), np.float32).ravel() for v in slots])
                   for slots in self._optimizer_slots()]
        optimizer = np.stack(buffers) if buffers else np.zeros((0, self._spec.layout.num_weights),
                                                               np.float32)
        return {"optimizer": optimizer, "step": int(self._keras_optimizer.iterations.numpy()),
                "shuffle_rng": self._rng.bit_generator.state}

    def load_training_state(self, training_state):
        """Restore what :meth:`training_state` returned."""
        self._rng.bit_generator.state = training_state["shuffle_rng"]
        saved = np.asarray(training_state["optimizer"], np.float32)
        slots = self._optimizer_slots()
        if saved.shape[0] != len(slots):
            raise ValueError(f"saved optimizer state has {saved.shape[0]} buffers, this optimizer "
                             f"needs {len(slots)}: the optimizer differs from the saved run.")
        for flat, variables in zip(saved, slots):
            _assign_flat(variables, flat)
        self._keras_optimizer.iterations.assign(int(training_state["step"]))

    def reset_optimizer(self):
        for variables in self._optimizer_slots():
            for variable in variables:
                variable.assign(np.zeros(variable.shape, np.float32))
        self._keras_optimizer.iterations.assign(0)

    @property
    def worker_pids(self):
        return []

    def close(self):
        """Nothing to release beyond Python objects; kept for the processor interface."""
        self._returned_state = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- setup -----------------------------------------------------------------------------------
    def _build(self):
        import keras
        import tensorflow as tf

        from engine.backends._keras_runtime import build_keras_model, make_per_example_loss
        spec, options = self._spec, self.model._options()
        if self.mixed_precision:
            spec = _with_mixed_precision(spec, options)
        with self._strategy.scope():
            self._keras_model = build_keras_model(spec, options)
            self._weights = list(self._keras_model.trainable_weights)
            self._theta = list(self._keras_model.non_trainable_weights)
            self._keras_optimizer = _keras_optimizer(self.optimizer)
            if self.mixed_precision:
                self._keras_optimizer = keras.optimizers.LossScaleOptimizer(self._keras_optimizer)
            self._keras_optimizer.build(self._weights)
        self._per_example_loss = make_per_example_loss(self._spec, options["loss_config"])
        self._step = tf.function(self._distributed_step, jit_compile=self.xla,
                                 reduce_retracing=True)
        self._predict = tf.function(self._predict_step, reduce_retracing=True)

    def _check(self, examples, labels, state):
        check_state(state, self._spec.layout)
        examples, labels = check_data(examples, labels, self._spec.input_shape,
                                      self._spec.num_outputs)
        return np.asarray(examples, np.float32), labels

    def _load_state(self, state):
        _assign_flat(self._weights + self._theta, state.buffer)
        self._call_start_state = state

    def _current_state(self):
        buffer = np.concatenate([np.asarray(v.numpy(), np.float32).ravel()
                                 for v in self._weights + self._theta])
        self._returned_state = NetworkState.from_buffer(self._spec.layout, buffer)
        return self._returned_state

    def _optimizer_slots(self):
        """The optimizer's per-weight buffers, grouped as the engine's optimizer orders them."""
        inner = getattr(self._keras_optimizer, "inner_optimizer", self._keras_optimizer)
        if isinstance(self.optimizer, Adam):
            return [list(inner._momentums), list(inner._velocities)]
        if isinstance(self.optimizer, SGD) and self.optimizer.momentum > 0:
            return [list(inner.momentums)]
        return []

    # -- steps -----------------------------------------------------------------------------------
    def _train_step(self, x, y, learning_rate, clip_norm):
        self._keras_optimizer.learning_rate = learning_rate
        bounds = split_batch(len(x), len(self.devices))
        shards = [(x[bounds[i]:bounds[i + 1]], y[bounds[i]:bounds[i + 1]])
                  for i in range(len(self.devices))]
        distributed = self._strategy.experimental_distribute_values_from_function(
            lambda context: shards[context.replica_id_in_sync_group])
        began = time.perf_counter()
        loss, grad_norm = self._step(distributed, np.float32(len(x)),
                                     np.float32(np.inf if clip_norm is None else clip_norm))
        loss, grad_norm = float(loss), float(grad_norm)
        ended = time.perf_counter()
        step = int(self._keras_optimizer.iterations.numpy()) - 1
        if not np.isfinite(loss) or (not self.mixed_precision and not np.isfinite(grad_norm)):
            # The variables already hold the failed update; keeping a copy before every step would
            # cost a device-to-host copy per step, so the last good state is the call's start.
            raise NonFiniteLossError(step, loss, self._call_start_state,
                                     what="the gradients are" if np.isfinite(loss) else
                                     "the loss is")
        return dict(loss=loss, examples=len(x), compute_s=ended - began, sync_s=0.0, wait_s=0.0,
                    wall_s=ended - began, grad_norm=grad_norm)

    def _distributed_step(self, shards, rows, clip_norm):
        import tensorflow as tf
        strategy, optimizer = self._strategy, self._keras_optimizer
        replicas = float(strategy.num_replicas_in_sync)

        def replica_step(shard):
            x, y = shard
            context = tf.distribute.get_replica_context()
            with tf.GradientTape() as tape:
                outputs = tf.cast(self._keras_model(x, training=True), tf.float32)
                loss = tf.reduce_sum(self._per_example_loss(y, outputs)) / rows
                if self._keras_model.losses:
                    loss += tf.add_n([tf.cast(t, tf.float32) for t in
                                      self._keras_model.losses]) / replicas
                scaled = optimizer.scale_loss(loss) if self.mixed_precision else loss
            grads = tape.gradient(scaled, self._weights)
            grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, self._weights)]
            total = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            norm = tf.linalg.global_norm([tf.cast(g, tf.float32) for g in total])
            if self.mixed_precision:
                norm /= tf.cast(optimizer.scale_loss(1.0), tf.float32)
            scale = tf.minimum(1.0, clip_norm / tf.maximum(norm, 1e-30))
            optimizer.apply([g * tf.cast(scale, g.dtype) for g in grads], self._weights)
            share = tf.cast(tf.shape(x)[0], tf.float32) / rows
            for variable in self._theta:  # per-replica statistics -> their shard-weighted mean
                variable.assign(context.all_reduce(tf.distribute.ReduceOp.SUM, variable * share))
            return loss, norm

        losses, norms = strategy.run(replica_step, args=(shards,))
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)
        return loss, strategy.experimental_local_results(norms)[0]

    def _evaluate_step(self, x, y):
        began = time.perf_counter()
        loss, probabilities = self._predict(x, y)
        ended = time.perf_counter()
        record = dict(loss=float(loss), examples=len(x), compute_s=ended - began, sync_s=0.0,
                      wait_s=0.0, wall_s=ended - began, grad_norm=float("nan"))
        return record, probabilities.numpy()

    def _predict_step(self, x, y):
        import tensorflow as tf

        from engine.backends._keras_runtime import probabilities
        outputs = tf.cast(self._keras_model(x, training=False), tf.float32)
        loss = tf.reduce_mean(self._per_example_loss(y, outputs))
        if self._keras_model.losses:
            loss += tf.add_n([tf.cast(t, tf.float32) for t in self._keras_model.losses])
        return loss, probabilities(outputs, self._spec)


def _keras_optimizer(optimizer):
    """The Keras optimizer doing what the engine's optimizer object describes."""
    import keras
    if isinstance(optimizer, SGD):
        return keras.optimizers.SGD(momentum=optimizer.momentum, nesterov=optimizer.nesterov)
    if isinstance(optimizer, Adam):
        options = dict(beta_1=optimizer.beta1, beta_2=optimizer.beta2, epsilon=optimizer.epsilon)
        if optimizer.weight_decay:
            return keras.optimizers.AdamW(weight_decay=optimizer.weight_decay, **options)
        return keras.optimizers.Adam(**options)
    raise ValueError(f"MirroredProcessor runs engine.SGD, engine.Adam and engine.AdamW. Received: "
                     f"{optimizer!r}.")


def _with_mixed_precision(spec, options):
    """The spec with every float32 layer policy turned into mixed_float16, except the output layer
    (its softmax stays float32 for numerical stability, as Keras' mixed-precision guide advises)."""
    from dataclasses import replace

    from engine.backends._keras_runtime import build_keras_model
    config = json.loads(spec.architecture or build_keras_model(spec, options).to_json())
    outputs = config["config"].get("output_layers") or \
        [config["config"]["layers"][-1]["config"]["name"]]
    if isinstance(outputs[0], str):  # one output is stored as [name, node, tensor]
        outputs = [outputs]
    output_names = {entry[0] for entry in outputs}

    def rewrite(node, policy):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and node.get("config", {}).get("name") == \
                    "float32":
                node["config"]["name"] = policy
            for key, value in node.items():
                child_policy = "float32" if key == "config" and isinstance(value, dict) and \
                    value.get("name") in output_names else policy
                rewrite(value, child_policy)
        elif isinstance(node, list):
            for value in node:
                rewrite(value, policy)

    rewrite(config, "mixed_float16")
    return replace(spec, architecture=json.dumps(config))


def _assign_flat(variables, flat):
    offset = 0
    for variable in variables:
        count = int(np.prod(variable.shape))
        variable.assign(np.asarray(flat[offset:offset + count], np.float32).reshape(variable.shape))
        offset += count


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
