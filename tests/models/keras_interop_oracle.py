"""Keras and torch oracles of the native-layer and interop tests, run in a child process.

The pytest process never imports TensorFlow (forking after it is unsafe, and later tests rely on
forked workers; see tests/backends/keras_oracle.py), so each task here builds Keras models, runs
``models.from_keras`` / ``to_keras`` and Keras's own maths, and returns plain data (numpy arrays,
native models and states) for the tests to compare with the native computation.

    python keras_interop_oracle.py TASK INPUT.pkl OUTPUT.pkl
"""
import os
import pickle
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

_TIMEOUT_S = 540


def run_oracle(directory, task, *args, **kwargs):
    """Run ``task(*args, **kwargs)`` in a fresh Python process and return its result."""
    source, target = (os.path.join(directory, f"{task}.{end}.pkl") for end in ("in", "out"))
    with open(source, "wb") as f:
        pickle.dump((args, kwargs), f)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), task, source, target],
                               capture_output=True, text=True, timeout=_TIMEOUT_S, env=env)
    if completed.returncode != 0:
        raise AssertionError(f"oracle task {task!r} failed (exit {completed.returncode}):\n"
                             f"{completed.stderr[-6000:]}")
    with open(target, "rb") as f:
        return pickle.load(f)


def _probabilities(keras_output):
    """Keras's (n, 1) sigmoid output as the native two-class [1 - p, p]."""
    p = np.asarray(keras_output, np.float32)
    return np.concatenate([1 - p, p], axis=1) if p.shape[1] == 1 else p


def _perturb_statistics(keras_model, seed):
    """Give BatchNorm non-trivial moving statistics, so inference is not the identity map."""
    rng = np.random.default_rng(seed)
    for layer in keras_model.layers:
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma * rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                               rng.normal(0, 0.3, beta.shape).astype(np.float32),
                               rng.normal(0, 0.5, mean.shape).astype(np.float32),
                               rng.uniform(0.5, 2.0, var.shape).astype(np.float32)])


def task_zoo(cases, directory):
    """Per zoo case: Keras predictions, from_keras, and the to_keras export saved and reloaded."""
    import keras
    from models import keras_zoo
    from models.keras_interop import from_keras
    results = []
    for index, (name, kwargs) in enumerate(cases):
        keras_model = getattr(keras_zoo, name)(**kwargs)
        _perturb_statistics(keras_model, index)
        model, state = from_keras(keras_model)
        x = np.random.default_rng(index).standard_normal((5,) + model.input_shape)
        x = x.astype(np.float32)
        path = os.path.join(directory, f"{name}_{index}.keras")
        model.to_keras(state).save(path)
        reloaded = keras.models.load_model(path)
        results.append(dict(model=model, state=state, x=x,
                            keras=_probabilities(keras_model.predict(x, verbose=0)),
                            exported=_probabilities(reloaded.predict(x, verbose=0)),
                            keras_parameters=keras_model.count_params()))
    return results


def _random_stack(rng, index):
    """A random Keras classifier over (timesteps, features) built from the supported layers."""
    import keras
    from keras import layers
    timesteps, features = int(rng.integers(6, 12)), int(rng.integers(2, 6))
    inputs = keras.Input((timesteps, features))
    x = inputs
    for depth in range(int(rng.integers(2, 5))):
        choice = rng.choice(["conv", "bn", "pool", "layernorm", "rnn", "attention", "dropout"])
        width = int(rng.integers(3, 7))
        if choice == "conv":
            x = layers.Conv1D(width, int(rng.integers(1, 4)), strides=int(rng.integers(1, 3)),
                              padding=str(rng.choice(["same", "valid"])),
                              activation=str(rng.choice(["relu", "linear"])))(x)
        elif choice == "bn":
            x = layers.BatchNormalization(momentum=float(rng.uniform(0.9, 0.99)))(x)
        elif choice == "pool" and x.shape[1] >= 2:
            x = layers.MaxPooling1D(2)(x)
        elif choice == "layernorm":
            x = layers.LayerNormalization()(x)
        elif choice == "rnn":
            cell = layers.LSTM if rng.random() < 0.5 else layers.GRU
            x = (layers.Bidirectional(cell(width, return_sequences=True)) if rng.random() < 0.5
                 else cell(width, return_sequences=True))(x)
        elif choice == "attention":
            attended = layers.MultiHeadAttention(int(rng.integers(1, 3)), 3)(x, x)
            x = layers.Add()([x, attended])
        else:
            x = layers.Dropout(0.3)(x)
    ending = rng.choice(["gap", "flatten", "rnn", "concat"])
    if ending == "gap":
        x = layers.GlobalAveragePooling1D()(x)
    elif ending == "flatten":
        x = layers.Flatten()(x)
    elif ending == "rnn":
        x = layers.Bidirectional(layers.GRU(4))(x)
    else:
        x = layers.Concatenate()([layers.GlobalAveragePooling1D()(x), layers.LSTM(3)(x)])
    x = layers.Dense(int(rng.integers(3, 8)), activation="relu")(x)
    outputs = layers.Dense(int(rng.integers(2, 5)), activation="softmax")(x)
    return keras.Model(inputs, outputs, name=f"stack_{index}")


def task_stacks(count, seed):
    """``count`` random stacks: from_keras model and state, an input, Keras's predictions."""
    from models.keras_interop import from_keras
    rng = np.random.default_rng(seed)
    results = []
    for index in range(count):
        keras_model = _random_stack(rng, index)
        _perturb_statistics(keras_model, index)
        model, state = from_keras(keras_model)
        x = rng.standard_normal((4,) + model.input_shape).astype(np.float32)
        results.append(dict(model=model, state=state, x=x, summary=[
            type(layer).__name__ for layer in keras_model.layers],
            keras=keras_model.predict(x, verbose=0)))
    return results


def task_sgd(cases, learning_rate):
    """Per zoo case: the weights and statistics after one Keras SGD ``train_on_batch``."""
    import keras
    from models import keras_zoo
    from models.keras_interop import from_keras
    results = []
    for index, (name, kwargs) in enumerate(cases):
        keras_model = getattr(keras_zoo, name)(**kwargs)
        _perturb_statistics(keras_model, index)
        model, state = from_keras(keras_model)
        rng = np.random.default_rng(index)
        x = rng.standard_normal((6,) + model.input_shape).astype(np.float32)
        y = rng.integers(0, model.num_outputs, 6)
        loss = "binary_crossentropy" if keras_model.outputs[0].shape[-1] == 1 else \
            "sparse_categorical_crossentropy"
        keras_model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss=loss)
        keras_loss = float(np.ravel(keras_model.train_on_batch(x, y))[0])
        after = from_keras(keras_model)[1]
        results.append(dict(model=model, state=state, x=x, y=y, keras_loss=keras_loss,
                            keras_after=after))
    return results


def task_not_supported():
    """from_keras's error message on small models that each hold one unsupported layer."""
    import keras
    from keras import layers
    from models.keras_interop import from_keras

    def model_with(make):
        inputs = keras.Input((8, 3))
        x = make(layers.Conv1D(4, 3, name="conv")(inputs))
        return keras.Model(inputs, layers.Dense(2, activation="softmax", name="out")(x))

    makers = {
        "simple_rnn": lambda x: layers.SimpleRNN(4, name="simple_rnn")(x),
        "dilated": lambda x: layers.Flatten()(layers.Conv1D(2, 2, dilation_rate=2,
                                                            name="dilated")(x)),
        "dense_over_time": lambda x: layers.Flatten()(layers.Dense(3, name="dense_over_time")(x)),
        "cross_attention": lambda x: layers.Flatten()(layers.MultiHeadAttention(
            2, 2, name="cross_attention")(x, layers.Conv1D(4, 1)(x))),
        "tanh_lstm": lambda x: layers.LSTM(3, recurrent_dropout=0.1, name="tanh_lstm")(x),
    }
    messages = {}
    for name, make in makers.items():
        try:
            from_keras(model_with(make))
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


def task_tape(specs, seed):
    """Per (keras class, config, input shapes, training): the layer's output and GradientTape's
    gradients of sum(y * dy) with respect to its inputs and trainable weights."""
    import keras
    import tensorflow as tf
    from keras import layers
    rng = np.random.default_rng(seed)
    results = []
    for kind, config, shapes, training in specs:
        xs = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
        if kind == "AttentionPooling":  # lstm_attention's additive attention, as Keras layers
            inputs = keras.Input(shapes[0][1:])
            hidden = layers.Dense(config["units"], activation="tanh")
            score = layers.Dense(1, use_bias=False)
            weights = layers.Softmax(axis=1)(score(hidden(inputs)))
            layer = keras.Model(inputs, layers.Flatten()(layers.Dot(axes=1)([weights, inputs])))
            call = lambda tensors, training: layer(tensors[0], training=training)
        else:
            layer = getattr(layers, kind)(**config)
            if kind == "MultiHeadAttention":
                call = lambda tensors, training: layer(tensors[0], tensors[0], training=training)
            elif kind in ("Add", "Concatenate"):
                call = lambda tensors, training: layer(tensors, training=training)
            else:
                call = lambda tensors, training: layer(tensors[0], training=training)
        call([tf.constant(x) for x in xs], False)  # builds the weights
        for variable in layer.trainable_weights:  # random values, biases included
            variable.assign(rng.standard_normal(variable.shape).astype(np.float32) * 0.5)
        tensors = [tf.constant(x) for x in xs]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            y = call(tensors, training)
            dy = tf.constant(rng.standard_normal(y.shape).astype(np.float32))
            objective = tf.reduce_sum(y * dy)
        grads = tape.gradient(objective, tensors + list(layer.trainable_weights))
        results.append(dict(xs=xs, dy=dy.numpy(), y=y.numpy(),
                            weights=[v.numpy() for v in layer.trainable_weights],
                            dxs=[g.numpy() for g in grads[:len(xs)]],
                            dweights=[g.numpy() for g in grads[len(xs):]]))
    return results


def task_load_and_predict(path, x):
    """``keras.models.load_model(path).predict(x)``, as native two-class probabilities."""
    import keras
    return _probabilities(keras.models.load_model(path).predict(x, verbose=0))


def task_sequential(native_model, native_state, x):
    """A keras.Sequential through from_keras, and a native Sequential through to_keras."""
    import keras
    from keras import layers
    from models.keras_interop import from_keras
    keras_model = keras.Sequential([keras.Input(x.shape[1:]),
                                    layers.Conv1D(4, 3, activation="relu"),
                                    layers.BatchNormalization(), layers.MaxPooling1D(2),
                                    layers.Flatten(), layers.Dense(5), layers.ReLU(),
                                    layers.Dense(3, activation="softmax")])
    _perturb_statistics(keras_model, 0)
    model, state = from_keras(keras_model)
    return dict(model=model, state=state, keras=keras_model.predict(x, verbose=0),
                exported=native_model.to_keras(native_state).predict(x, verbose=0))


def _torch_forward(torch, F, kind, config, xs, w, training):
    """The layer ``kind`` in torch's own ops, on channels-last tensors like the native layer."""
    x = xs[0]
    if kind == "Conv1D":
        length, k, stride = x.shape[1], w["kernel"].shape[0], config["stride"]
        out = -(-length // stride)
        total = max((out - 1) * stride + k - length, 0) if config["padding"] == "same" else 0
        padded = F.pad(x.transpose(1, 2), (total // 2, total - total // 2))
        y = F.conv1d(padded, w["kernel"].permute(2, 1, 0), w["bias"], stride=stride)
        y = y.transpose(1, 2)
        return F.relu(y) if config["activation"] == "relu" else y
    if kind == "Dense":
        y = F.linear(x, w["kernel"].T, w["bias"])
        return F.relu(y) if config["activation"] == "relu" else y
    if kind == "BatchNorm":
        channels = x.shape[-1]
        y = F.batch_norm(x.reshape(-1, channels), torch.zeros(channels, dtype=x.dtype),
                         torch.ones(channels, dtype=x.dtype), w["gamma"], w["beta"],
                         training=training, eps=config["epsilon"])
        return y.reshape(x.shape)
    if kind == "LayerNorm":
        return F.layer_norm(x, x.shape[-1:], w["gamma"], w["beta"], eps=config["epsilon"])
    if kind == "MaxPool1D":
        return F.max_pool1d(x.transpose(1, 2), config["pool_size"],
                            config["stride"]).transpose(1, 2)
    if kind == "GlobalAveragePooling1D":
        return x.mean(dim=1)
    if kind == "MultiHeadSelfAttention":  # torch's own attention: needs heads * key_dim = features
        d, h, k = x.shape[-1], config["heads"], config["key_dim"]
        in_weight = torch.cat([w[f"{p}/kernel"].reshape(d, h * k).T for p in
                               ("query", "key", "value")])
        in_bias = torch.cat([w[f"{p}/bias"].reshape(-1) for p in ("query", "key", "value")])
        y, _ = F.multi_head_attention_forward(
            x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), d, h, in_weight, in_bias,
            None, None, False, 0.0, w["attention_output/kernel"].reshape(h * k, d).T,
            w["attention_output/bias"], training=training, need_weights=False)
        return y.transpose(0, 1)
    if kind == "AttentionPooling":
        hidden = torch.tanh(x @ w["hidden/kernel"] + w["hidden/bias"])
        alpha = torch.softmax((hidden @ w["score/kernel"])[..., 0], dim=1)
        return (alpha[..., None] * x).sum(dim=1)
    if kind == "Add":
        return sum(xs[1:], xs[0])
    if kind == "Concatenate":
        return torch.cat(xs, dim=-1)
    raise ValueError(kind)


def task_torch(cases):
    """Per (kind, config, xs, weights, dy, training): torch's output and autograd gradients of
    sum(y * dy) in float32."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    results = []
    for kind, config, xs, weights, dy, training in cases:
        tx = [torch.tensor(x, requires_grad=True) for x in xs]
        tw = {name: torch.tensor(value, requires_grad=True) for name, value in weights.items()}
        y = _torch_forward(torch, F, kind, config, tx, tw, training)
        (y * torch.tensor(dy)).sum().backward()
        results.append(dict(y=y.detach().numpy(), dxs=[t.grad.numpy() for t in tx],
                            dweights={name: t.grad.numpy() for name, t in tw.items()}))
    return results


TASKS = {"zoo": task_zoo, "torch": task_torch, "tape": task_tape, "sequential": task_sequential,
         "load_and_predict": task_load_and_predict, "stacks": task_stacks, "sgd": task_sgd,
         "not_supported": task_not_supported}

if __name__ == "__main__":
    task, source, target = sys.argv[1:4]
    with open(source, "rb") as f:
        args, kwargs = pickle.load(f)
    if task == "zoo":
        kwargs["directory"] = os.path.dirname(source)
    result = TASKS[task](*args, **kwargs)
    with open(target, "wb") as f:
        pickle.dump(result, f)
