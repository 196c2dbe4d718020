"""TensorFlow-side oracles for the Keras backend tests, run in a child process.

The pytest process must never import TensorFlow: once it is loaded, every later test's processor
would start workers with spawn instead of fork (``engine.parallel.pool.default_start_method``), and forking
a process that has loaded TensorFlow is unsafe. So the tests run the engine here (TensorFlow-free,
forked workers: the production setting) and ask this script, in a fresh process, for what only
Keras can say: ``train_on_batch``, ``load_model(...).predict``, a MirroredStrategy run.

    python keras_oracle.py TASK INPUT.pkl OUTPUT.pkl

Builders used by the tests live here too (importable without TensorFlow: Keras is imported inside).
"""
import os
import pickle
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def conv_lstm(*, timesteps=12, channels=5, num_classes=4, l2=1e-3):
    """A small model without BatchNorm or Dropout (so the 2-process step equals the whole-batch
    step exactly), with an L2 regulariser (the regularisation loss is part of Keras' loss)."""
    import keras
    from keras import layers
    inputs = keras.Input((timesteps, channels))
    x = layers.Conv1D(8, 3, activation="relu", name="conv")(inputs)
    x = layers.LSTM(8, name="lstm")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="classes",
                           kernel_regularizer=keras.regularizers.L2(l2))(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def dense_dropout(*, features=6, num_classes=3, logits=False):
    """A dense model with Dropout (random streams) and optionally logits outputs."""
    import keras
    from keras import layers
    inputs = keras.Input((features,))
    x = layers.Dense(16, activation="relu", name="hidden")(inputs)
    x = layers.Dropout(0.5, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation=None if logits else "softmax", name="out")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=logits))
    return model


_TIMEOUT_S = 540


def run_oracle(directory, task, *args, **kwargs):
    """Run ``task(*args, **kwargs)`` of this script in a fresh Python process; return its result.
    Inputs and outputs travel as pickle files in ``directory``; a failure shows the child's
    stderr."""
    source = os.path.join(directory, f"{task}.in.pkl")
    target = os.path.join(directory, f"{task}.out.pkl")
    with open(source, "wb") as f:
        pickle.dump((args, kwargs), f)
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), task, source, target],
                               capture_output=True, text=True, timeout=_TIMEOUT_S)
    if completed.returncode != 0:
        raise AssertionError(f"oracle task {task!r} failed (exit {completed.returncode}):\n"
                             f"{completed.stderr[-6000:]}")
    with open(target, "rb") as f:
        return pickle.load(f)


# -- helpers (TensorFlow loaded) --------------------------------------------------------------
def _assign_by_name(keras_model, state):
    """Load a NetworkState into a Keras model through the variables' paths (the state's names)."""
    variables = {v.path: v for v in
                 keras_model.trainable_weights + keras_model.non_trainable_weights}
    for name, array in list(state.weights.items()) + list(state.theta.items()):
        variables[name].assign(array)


def _read_by_name(keras_model, state):
    out = state.copy()
    variables = {v.path: v for v in
                 keras_model.trainable_weights + keras_model.non_trainable_weights}
    for name in list(out.weights) + list(out.theta):
        target = out.weights[name] if name in out.weights else out.theta[name]
        target[...] = variables[name].numpy()
    return out


# -- tasks ------------------------------------------------------------------------------------
def train_on_batch(builder, state, x, y, learning_rate):
    """One Keras train_on_batch with plain SGD on the whole batch: (loss, new state)."""
    import keras
    model = builder()
    _assign_by_name(model, state)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss=model.loss)
    loss = model.train_on_batch(x, y)
    return float(np.ravel(loss)[0]), _read_by_name(model, state)


def shard_statistics(builder, state, shards):
    """BatchNorm statistics after one training-mode forward pass on each shard separately."""
    thetas = []
    for x in shards:
        model = builder()
        _assign_by_name(model, state)
        model(x, training=True)
        thetas.append(_read_by_name(model, state).theta)
    return thetas


def predict_loaded(path, x, keras_model_wrapper, state):
    """Predictions of the .keras file, and of the KerasModel wrapper on the state, here."""
    import keras
    loaded = keras.models.load_model(path)
    return loaded.predict(x, verbose=0), keras_model_wrapper.predict(state, x)


def mirrored(model, state, x, y, batch_size, learning_rate, seed, optimizer, epochs):
    """A real two-replica MirroredStrategy run over two logical CPUs: (losses, final state)."""
    from engine.backends.tf_distribute import MirroredProcessor, split_cpu_into_logical_devices
    devices = split_cpu_into_logical_devices(2)
    processor = MirroredProcessor(model, devices=devices, batch_size=batch_size,
                                  optimizer=optimizer, seed=seed)
    losses = []
    for _ in range(epochs):
        state, results = processor.run_parallel(x, y, state, {"learning_rate": learning_rate})
        losses.append(results["loss"])
    _, evaluation = processor.run_parallel(x, y, state, {"update_weights": False})
    return np.concatenate(losses), state, evaluation["predictions"], \
        processor._strategy.num_replicas_in_sync


def in_process_checks(x, y):
    """Checks of KerasModel that need TensorFlow in the calling process (numpy twins as oracles)."""
    from engine.backends.keras import KerasModel
    from engine.parallel.worker import _LazyRandom
    from models.losses import CrossEntropy, FocalLoss
    import functools
    out = {}
    # Dropout: one stream per (seed, worker, step), reproducible.
    model = KerasModel(functools.partial(dense_dropout, features=x.shape[1]))
    state = model.init_state(0)
    losses = [model.loss_and_grads(state, x, y, rng=_LazyRandom(5, worker, 0))[0]
              for worker in (0, 0, 1)]
    out["dropout_losses"] = losses
    # The engine's losses on a softmax head, a logits head and a sigmoid (binary) head.
    out["losses"] = []
    for loss_fn in (FocalLoss(gamma=2.0, alpha=[0.5, 1.0, 2.0], label_smoothing=0.1,
                              class_weight=[1.0, 2.0, 0.5]),
                    CrossEntropy(label_smoothing=0.2)):
        for logits in (False, True):
            plain = KerasModel(functools.partial(dense_dropout, features=x.shape[1], logits=logits))
            state = plain.init_state(1)
            probabilities = plain.predict(state, x)
            weighted = plain.with_loss(loss_fn)
            out["losses"].append((weighted.loss(state, x, y),
                                  loss_fn.value(np.log(probabilities.astype(np.float64)), y)))
    from models.keras_zoo import lstm_attention
    binary = KerasModel(functools.partial(lstm_attention, timesteps=4, features=x.shape[1] // 2,
                                          units=4, attention_units=3, dropout=0.0))
    state = binary.init_state(0)
    sequences = x[:, :(x.shape[1] // 2) * 2].reshape(len(x), 2, -1).repeat(2, axis=1)
    probabilities = binary.predict(state, sequences)
    labels = (y > 0).astype(np.int64)
    out["binary_probabilities"] = probabilities
    out["binary_keras_loss"] = (binary.loss(state, sequences, labels), float(
        np.mean(-np.log(probabilities[np.arange(len(labels)), labels]))))
    # Unrolled recurrent layers: the same loss and gradients as the graph while-loop.
    series = np.random.default_rng(9).normal(size=(len(x), 6, 2)).astype(np.float32)
    both = [KerasModel(functools.partial(conv_lstm, timesteps=6, channels=2), unroll_rnns=unroll)
            for unroll in (False, True)]
    start = both[0].init_state(0)
    out["unrolled"] = [model.loss_and_grads(start, series, y % 4) for model in both]
    focal = FocalLoss(gamma=1.5, class_weight=[1.0, 3.0])
    out["binary_focal"] = (binary.with_loss(focal).loss(state, sequences, labels),
                           focal.value(np.log(probabilities.astype(np.float64)), labels))
    return out


def zoo(kwargs_by_name, directory):
    """Each zoo model: Keras' parameter count at the defaults; and, at small sizes, a few epochs in
    this process (num_processes=1) and a .keras round trip of the trained state."""
    import keras

    from engine import ParallelBatchProcessor
    from models import keras_zoo
    out = {}
    for name, (kwargs, shape, classes) in kwargs_by_name.items():
        model = keras_zoo.get_keras_model(f"keras:{name}", **kwargs)
        rng = np.random.default_rng(5)
        x = rng.normal(size=(48, *shape)).astype(np.float32)
        y = rng.integers(0, classes, 48)
        state = model.init_state(0)
        losses = []
        with ParallelBatchProcessor(model, num_processes=1, batch_size=16) as proc:
            for _ in range(4):
                state, results = proc.run_parallel(x, y, state, {"learning_rate": 3e-3})
                losses.append(results["mean_loss"])
            _, evaluation = proc.run_parallel(x, y, state, {"update_weights": False})
        path = model.save_keras(state, os.path.join(directory, f"{name}.keras"))
        reloaded = keras.models.load_model(path).predict(x, verbose=0)
        out[name] = dict(parameters=keras_zoo._BUILDERS[name]().count_params(),
                         losses=losses, predictions=evaluation["predictions"], reloaded=reloaded)
    return out


def batch(requests):
    """Several tasks in one process (one TensorFlow import): [(task, args, kwargs), ...]. A
    "mirrored" task must come first: it splits the CPU before TensorFlow starts."""
    return [TASKS[task](*args, **kwargs) for task, args, kwargs in requests]


def keras_object_on_two_processes(x, y, learning_rate):
    """The spawn path: a KerasModel made from a keras.Model object in a process that has loaded
    TensorFlow; one 2-process gradient step against train_on_batch on the whole batch."""
    from engine import ParallelBatchProcessor
    from engine.backends.keras import KerasModel
    from engine.parallel.pool import default_start_method
    import keras
    keras.utils.set_random_seed(3)
    keras_model = conv_lstm(timesteps=x.shape[1], channels=x.shape[2])
    model = KerasModel(keras_model)
    state = model.init_state()
    with ParallelBatchProcessor(model, num_processes=2, batch_size=len(x), optimizer="sgd") as proc:
        new_state, results = proc.process_batch(x, y, state, {"learning_rate": learning_rate})
    loss, expected = train_on_batch(lambda: keras_model, state, x, y, learning_rate)
    return dict(start_method=default_start_method(), loss=(results["loss"], loss),
                state=new_state, expected=expected)


TASKS = {"train_on_batch": train_on_batch, "shard_statistics": shard_statistics,
         "predict_loaded": predict_loaded, "mirrored": mirrored,
         "in_process_checks": in_process_checks, "zoo": zoo, "batch": batch,
         "keras_object_on_two_processes": keras_object_on_two_processes}


def main():
    task, source, target = sys.argv[1:4]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with open(source, "rb") as f:
        args, kwargs = pickle.load(f)
    result = TASKS[task](*args, **kwargs)
    with open(target, "wb") as f:
        pickle.dump(result, f)


if __name__ == "__main__":
    main()
