"""The TensorFlow side of :class:`engine.backends.keras.KerasModel`.

Imported only where the maths runs: in a worker (on its first step), in the owner when
``num_processes=1``, or in a helper process that exports a ``.keras`` file. The Keras model is
built once; a step is one compiled ``tf.function`` that assigns the flat state buffer into the
model's variables (split and reshaped in the graph, no Python loop), sets the random layers' seeds,
and returns the mean loss with the gradient and the new non-trainable values as one flat vector.
"""
import os

import numpy as np

_EVAL_CHUNK = 1024   # rows per inference call: bounds activation memory on large shards
_LOG_FLOOR = 1e-7    # probabilities are clipped here before the log, as Keras' cross-entropy does


def configure_tensorflow_threads():
    """Intra-op threads = this process's share of the cores, inter-op threads = 1.

    A worker's share is in ``OMP_NUM_THREADS`` (set by ``engine.parallel.system.limit_threads`` before the
    model runs); elsewhere every usable core. Must run before TensorFlow executes anything: once
    its runtime is up the setting cannot change, and then the current one is kept.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from engine.parallel.system import usable_cores
    threads = int(os.environ.get("OMP_NUM_THREADS") or usable_cores())
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    return threads


def build_keras_model(spec, options, *, unroll_rnns=False):
    """A fresh Keras model: from the JSON architecture, or by calling the builder.

    ``unroll_rnns`` rebuilds it with every recurrent layer unrolled over its (fixed) timesteps:
    the same maths, without the per-timestep cost of a graph while-loop (measured on the IMU model
    at 32 examples and one thread: 235 -> 205 ms per step), but a longer first trace.
    """
    import json

    import keras
    custom_objects = options["custom_objects"]
    architecture = spec.architecture
    if architecture is None:
        with keras.utils.custom_object_scope(custom_objects):
            model = options["builder"]()
        if not unroll_rnns:
            return model
        architecture = model.to_json()
    if unroll_rnns:
        config = json.loads(architecture)
        _set_unroll(config)
        architecture = json.dumps(config)
    return keras.models.model_from_json(architecture, custom_objects=custom_objects)


_RECURRENT = ("LSTM", "GRU", "SimpleRNN", "RNN")


def _set_unroll(node):
    if isinstance(node, dict):
        if node.get("class_name") in _RECURRENT and isinstance(node.get("config"), dict):
            node["config"]["unroll"] = True
        for value in node.values():
            _set_unroll(value)
    elif isinstance(node, list):
        for value in node:
            _set_unroll(value)


class KerasRuntime:
    """One built Keras model with its compiled training, inference and loss functions."""

    def __init__(self, spec, options):
        configure_tensorflow_threads()
        import tensorflow as tf
        self.spec, self.layout = spec, spec.layout
        self.model = model = build_keras_model(spec, options,
                                               unroll_rnns=options.get("unroll_rnns", False))
        self._weights = list(model.trainable_weights)
        self._theta = list(model.non_trainable_weights)
        _check_variables(spec, self._weights, self._theta)
        theta_ids = {id(v) for v in self._theta}
        self._seed_states = [v for v in model.non_trainable_variables if id(v) not in theta_ids]
        self.num_seed_generators = len(self._seed_states)
        self._shapes = [tuple(shape) for _, shape in spec.weight_shapes + spec.theta_shapes]
        self._sizes = [int(np.prod(shape)) for shape in self._shapes]
        self._per_example_loss = make_per_example_loss(spec, options["loss_config"])
        flat = tf.TensorSpec((self.layout.size,), tf.float32)
        x = tf.TensorSpec((None, *spec.input_shape), tf.float32)
        y = tf.TensorSpec((None,), tf.int64)
        seeds = tf.TensorSpec((self.num_seed_generators, 2), tf.int64)
        self._train = tf.function(self._train_step, input_signature=[flat, x, y, seeds],
                                  jit_compile=options["jit_compile"])
        self._assign_fn = tf.function(self._assign, input_signature=[flat])
        self._predict = tf.function(self._predict_step, input_signature=[x])
        self._eval = tf.function(self._eval_step, input_signature=[x, y])

    # -- called by KerasModel --------------------------------------------------------------------
    def loss_and_grads(self, buffer, x, y, seeds):
        """(mean loss, flat float32 vector: gradient of the weights, then the new theta)."""
        if seeds is None:
            seeds = np.zeros((0, 2), np.int64)
        loss, flat = self._train(buffer, _features(x), _labels(y), np.asarray(seeds, np.int64))
        return float(loss), flat.numpy()

    def predict(self, buffer, x):
        self._assign_fn(buffer)
        x = _features(x)
        chunks = [self._predict(x[i:i + _EVAL_CHUNK]).numpy()
                  for i in range(0, len(x), _EVAL_CHUNK)]
        if not chunks:
            return np.empty((0, self.spec.num_outputs), np.float32)
        return np.concatenate(chunks)

    def loss(self, buffer, x, y):
        self._assign_fn(buffer)
        x, y = _features(x), _labels(y)
        total = 0.0
        for i in range(0, len(x), _EVAL_CHUNK):
            rows = slice(i, i + _EVAL_CHUNK)
            total += float(self._eval(x[rows], y[rows])) * len(x[rows])
        return total / max(1, len(x))

    def export(self, buffer):
        """The Keras model holding ``buffer``, compiled as the original was (for ``.save``).
        Build the runtime with ``unroll_rnns=False`` so the file keeps the user's layers."""
        self._assign_fn(buffer)
        if self.spec.compile_config is not None and not self.model.compiled:
            self.model.compile_from_config(self.spec.compile_config)
        return self.model

    # -- the compiled functions ------------------------------------------------------------------
    def _assign(self, flat):
        import tensorflow as tf
        parts = tf.split(flat, self._sizes) if self._sizes else []
        for variable, part, shape in zip(self._weights + self._theta, parts, self._shapes):
            variable.assign(tf.reshape(part, shape))

    def _total_loss(self, y, outputs):
        import tensorflow as tf
        loss = tf.reduce_mean(self._per_example_loss(y, outputs))
        if self.model.losses:  # weight and activity regularisers, as Keras adds them
            loss += tf.add_n([tf.cast(term, tf.float32) for term in self.model.losses])
        return loss

    def _train_step(self, flat, x, y, seeds):
        import tensorflow as tf
        self._assign(flat)
        for index, state in enumerate(self._seed_states):
            state.assign(tf.cast(seeds[index], state.dtype))
        with tf.GradientTape() as tape:
            outputs = tf.cast(self.model(x, training=True), tf.float32)
            loss = self._total_loss(y, outputs)
        grads = tape.gradient(loss, self._weights)
        pieces = [tf.reshape(tf.zeros_like(v) if g is None else tf.cast(g, tf.float32), [-1])
                  for g, v in zip(grads, self._weights)]
        pieces += [tf.reshape(v, [-1]) for v in self._theta]  # read after the forward pass
        return loss, tf.concat(pieces, 0) if pieces else tf.zeros([0])

    def _predict_step(self, x):
        import tensorflow as tf
        return probabilities(tf.cast(self.model(x, training=False), tf.float32), self.spec)

    def _eval_step(self, x, y):
        import tensorflow as tf
        return self._total_loss(y, tf.cast(self.model(x, training=False), tf.float32))


def probabilities(outputs, spec):
    """(n, num_outputs) class probabilities from the model's outputs (logits or probabilities)."""
    import tensorflow as tf
    if spec.output_units == 1:
        p = tf.sigmoid(outputs) if spec.from_logits else outputs
        return tf.concat([1.0 - p, p], axis=-1)
    return tf.nn.softmax(outputs) if spec.from_logits else outputs


def make_per_example_loss(spec, engine_loss_config):
    """A function ``(integer labels, model outputs) -> per-example loss`` (mean taken by caller).

    With ``engine_loss_config`` (a ``models.losses`` loss's ``get_config()``): the engine's formula
    ``w[y] * sum_c alpha_c * q_c * (1 - p_c)**gamma * (-log p_c)`` on the class probabilities (a
    one-unit sigmoid head is two classes). Otherwise the Keras model's compiled loss (sparse
    categorical cross-entropy when it has none), given targets in the form that loss expects.
    """
    if engine_loss_config is not None:
        return _engine_loss(spec, engine_loss_config)
    return _keras_loss(spec, spec.loss_config or "sparse_categorical_crossentropy")


def _engine_loss(spec, config):
    import tensorflow as tf
    classes = spec.num_outputs
    smoothing, gamma = float(config["label_smoothing"]), float(config.get("gamma", 0.0))
    alpha = np.broadcast_to(np.asarray(config.get("alpha", 1.0), np.float32), (classes,))
    weight = config.get("class_weight")
    for name, values in (("alpha", config.get("alpha", 1.0)), ("class_weight", weight)):
        if values is not None and np.ndim(values) == 1 and len(values) != classes:
            raise ValueError(f"{name} has {len(values)} entries but the model has {classes} "
                             "classes.")
    alpha = tf.constant(alpha)
    weight = None if weight is None else tf.constant(np.asarray(weight, np.float32))

    def per_example(y, outputs):
        if spec.from_logits and spec.output_units > 1:
            log_p = tf.nn.log_softmax(outputs)
            p = tf.exp(log_p)
        else:
            p = probabilities(outputs, spec)
            log_p = tf.math.log(tf.clip_by_value(p, _LOG_FLOOR, 1.0))
        target = (1.0 - smoothing) * tf.one_hot(y, classes) + smoothing / classes
        terms = -alpha * target * log_p
        if gamma:
            terms *= tf.pow(tf.maximum(1.0 - p, 0.0), gamma)
        loss = tf.reduce_sum(terms, axis=-1)
        return loss if weight is None else loss * tf.gather(weight, y)
    return per_example


def _keras_loss(spec, loss_config):
    import keras
    import tensorflow as tf
    loss = keras.losses.get(loss_config)
    kind = _target_kind(loss_config)
    if kind == "binary" and spec.output_units > 1:
        kind = "one_hot"

    def per_example(y, outputs):
        if kind == "one_hot":
            target = tf.one_hot(y, spec.output_units)
        elif kind == "binary":
            target = tf.cast(tf.reshape(y, (-1, 1)), tf.float32)
        else:
            target = y
        # Loss.call gives the per-example values; __call__ would also reduce them.
        values = loss.call(target, outputs) if isinstance(loss, keras.losses.Loss) else \
            loss(target, outputs)
        return tf.reshape(tf.cast(values, tf.float32), [-1])
    return per_example


def _target_kind(loss_config):
    """How a Keras loss wants its targets: "sparse" (indices), "one_hot", or "binary" (0/1)."""
    if isinstance(loss_config, dict):
        name = loss_config.get("class_name") or loss_config.get("config", {}).get("name", "")
    else:
        name = str(loss_config)
    key = name.lower().replace("_", "")
    if "sparse" in key:
        return "sparse"
    if "binary" in key:
        return "binary"
    if "categorical" in key or key in ("kldivergence", "kld", "kullbackleiblerdivergence"):
        return "one_hot"
    raise ValueError(f"KerasModel cannot tell which targets the Keras loss {name!r} expects. Use a "
                     "(sparse_)categorical or binary cross-entropy (or focal) loss in compile(), "
                     "or pass loss_fn=models.losses.CrossEntropy().")


def _check_variables(spec, weights, theta):
    """The model built here must have the variables the state was laid out for, in order."""
    for kind, entries, variables in (("trainable", spec.weight_shapes, weights),
                                     ("non-trainable", spec.theta_shapes, theta)):
        shapes = [tuple(shape) for _, shape in entries]
        found = [tuple(v.shape) for v in variables]
        if shapes != found:
            raise ValueError(f"the Keras model built in this process has {kind} variables of "
                             f"shapes {found}, but the state was laid out for {shapes}. The "
                             "builder must build the same architecture every time it is called.")


def _features(x):
    return np.asarray(x, dtype=np.float32)


def _labels(y):
    return np.asarray(y, dtype=np.int64)
