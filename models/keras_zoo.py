"""Keras models of our users' projects, as builders, and their registry (``keras:<name>``).

Each builder imports Keras inside the function (importing this module never loads TensorFlow),
returns a compiled ``keras.Model`` and is meant to be wrapped, not called, by the owner process:

    model = get_keras_model("imu_cnn_bilstm", dropout=0.3)   # a KerasModel, TensorFlow-free
    state = model.init_state(seed=0)

``get_keras_model`` wraps ``functools.partial(builder, **kwargs)`` in a ``KerasModel``, so every
worker calls the builder itself and the owner never imports TensorFlow. Every layer is named, so
the state's keys (the variables' paths) are the same in every process and every run, which is what
lets a checkpoint of one run load into the next.
"""
import functools
import inspect

__all__ = ["imu_cnn_bilstm", "lstm_attention", "cnn_bilstm_attention", "get_keras_model",
           "available_keras_models", "keras_model_signature"]


def imu_cnn_bilstm(*, timesteps=128, channels=13, num_classes=26, dropout=0.3,
                   learning_rate=1e-3, input_shape=None):
    """CNN + BiLSTM for IMU character recognition (about 0.74M parameters at the defaults).

    Conv1D(64, 5) + BatchNorm, Conv1D(128, 5), MaxPool(2), BiLSTM(128, sequences), BiLSTM(128),
    Dense(128), Dropout, Dense(num_classes, softmax). The engine's reference workload.
    ``input_shape=(timesteps, channels)`` overrides both (the CLI fills it from the data).
    """
    timesteps, channels = _sequence_shape(input_shape, timesteps, channels)
    import keras
    from keras import layers
    inputs = keras.Input((timesteps, channels), name="imu")
    x = layers.Conv1D(64, 5, activation="relu", name="conv1")(inputs)
    x = layers.BatchNormalization(name="conv1_bn")(x)
    x = layers.Conv1D(128, 5, activation="relu", name="conv2")(x)
    x = layers.MaxPooling1D(2, name="pool")(x)
    x = layers.Bidirectional(layers.LSTM(128, return_sequences=True, name="lstm1"),
                             name="bilstm1")(x)
    x = layers.Bidirectional(layers.LSTM(128, name="lstm2"), name="bilstm2")(x)
    return _dense_head(inputs, x, num_classes, dropout, learning_rate, "imu_cnn_bilstm")


def lstm_attention(*, timesteps=20, features=256, units=128, attention_units=64, num_classes=2,
                   head="sigmoid", dropout=0.3, learning_rate=1e-3, input_shape=None):
    """LSTM over a sequence of feature vectors (e.g. per-frame video features) with additive
    attention pooling (Bahdanau): ``score_t = v . tanh(W h_t + b)``, ``context = sum_t
    softmax(score)_t h_t``.

    ``head="sigmoid"`` (binary: one unit, binary cross-entropy; needs num_classes=2) or
    ``"softmax"`` (num_classes units, sparse categorical cross-entropy).
    ``input_shape=(timesteps, features)`` overrides both (the CLI fills it from the data).
    """
    timesteps, features = _sequence_shape(input_shape, timesteps, features)
    if head not in ("sigmoid", "softmax"):
        raise ValueError(f"head must be 'sigmoid' or 'softmax'. Received: head={head!r}.")
    if head == "sigmoid" and num_classes != 2:
        raise ValueError(f"a sigmoid head is binary: it needs num_classes=2. Received: "
                         f"num_classes={num_classes}. Use head='softmax' for more classes.")
    import keras
    from keras import layers
    inputs = keras.Input((timesteps, features), name="frames")
    states = layers.LSTM(units, return_sequences=True, name="lstm")(inputs)
    scores = layers.Dense(attention_units, activation="tanh", name="attention_hidden")(states)
    scores = layers.Dense(1, use_bias=False, name="attention_score")(scores)
    weights = layers.Softmax(axis=1, name="attention_weights")(scores)     # over time
    context = layers.Dot(axes=1, name="attention_pool")([weights, states])  # (n, 1, units)
    x = layers.Flatten(name="context")(context)
    x = layers.Dropout(dropout, name="dropout")(x)
    if head == "sigmoid":
        outputs = layers.Dense(1, activation="sigmoid", name="violent")(x)
        loss = "binary_crossentropy"
    else:
        outputs = layers.Dense(num_classes, activation="softmax", name="classes")(x)
        loss = "sparse_categorical_crossentropy"
    model = keras.Model(inputs, outputs, name="lstm_attention")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"])
    return model


def cnn_bilstm_attention(*, timesteps=60, features=126, num_classes=20, filters=(64, 128),
                         lstm_units=64, heads=4, key_dim=32, gru_units=64, dropout=0.3,
                         learning_rate=1e-3, input_shape=None):
    """Conv1D stack, BiLSTM, multi-head self-attention with a skip connection and LayerNorm, and a
    parallel GRU path over the convolution features, fused before the head (sign language from
    per-frame keypoints). ``input_shape=(timesteps, features)`` overrides both."""
    timesteps, features = _sequence_shape(input_shape, timesteps, features)
    import keras
    from keras import layers
    inputs = keras.Input((timesteps, features), name="keypoints")
    x = inputs
    for index, count in enumerate(filters):
        x = layers.Conv1D(count, 3, padding="same", activation="relu", name=f"conv{index + 1}")(x)
    conv = layers.BatchNormalization(name="conv_bn")(x)
    sequence = layers.Bidirectional(layers.LSTM(lstm_units, return_sequences=True, name="lstm"),
                                    name="bilstm")(conv)
    attended = layers.MultiHeadAttention(heads, key_dim, dropout=dropout * 0.5,
                                         name="self_attention")(sequence, sequence)
    sequence = layers.LayerNormalization(name="attention_norm")(
        layers.Add(name="attention_skip")([sequence, attended]))
    attention_path = layers.GlobalAveragePooling1D(name="attention_pool")(sequence)
    gru_path = layers.GRU(gru_units, name="gru")(conv)
    x = layers.Concatenate(name="fuse")([attention_path, gru_path])
    return _dense_head(inputs, x, num_classes, dropout, learning_rate, "cnn_bilstm_attention")


def _sequence_shape(input_shape, timesteps, features):
    if input_shape is None:
        return int(timesteps), int(features)
    if len(tuple(input_shape)) != 2:
        raise ValueError(f"these models take sequences: input_shape must be (timesteps, features). "
                         f"Received: input_shape={input_shape!r}.")
    return tuple(int(d) for d in input_shape)


_BUILDERS = {"imu_cnn_bilstm": imu_cnn_bilstm, "lstm_attention": lstm_attention,
             "cnn_bilstm_attention": cnn_bilstm_attention}


def available_keras_models():
    """``"keras:<name>"`` -> ``"builder(signature): summary"`` for every zoo model."""
    return {f"keras:{name}": f"{name}{inspect.signature(builder)}: "
                             f"{inspect.getdoc(builder).splitlines()[0]}"
            for name, builder in _BUILDERS.items()}


def keras_model_signature(name):
    """The ``inspect.Signature`` of a zoo builder (``"keras:"`` prefix optional)."""
    return inspect.signature(_builder(name))


def _dense_head(inputs, x, num_classes, dropout, learning_rate, name):
    """Dense(128) -> Dropout -> softmax classes, compiled with Adam and sparse cross-entropy."""
    import keras
    from keras import layers
    x = layers.Dense(128, activation="relu", name="dense")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="classes")(x)
    model = keras.Model(inputs, outputs, name=name)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _builder(name):
    key = name[len("keras:"):] if name.startswith("keras:") else name
    if key not in _BUILDERS:
        raise ValueError(f"unknown Keras model {name!r}. Known names: "
                         f"{sorted(f'keras:{n}' for n in _BUILDERS)}.")
    return _BUILDERS[key]


def get_keras_model(name, *, loss_fn=None, jit_compile=False, unroll_rnns=False, **kwargs):
    """A :class:`engine.backends.keras.KerasModel` of the zoo model ``name`` (``"keras:"`` prefix
    optional) built with ``kwargs``, e.g. ``get_keras_model("imu_cnn_bilstm", dropout=0.0)``.

    Raises:
        ValueError: for an unknown name (the message lists the known names).
        TypeError: for arguments the builder does not take (the message shows its signature).
    """
    builder = _builder(name)
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as error:
        raise TypeError(f"get_keras_model({name!r}): {error}. Received: {kwargs!r}. Expected: "
                        f"{builder.__name__}{inspect.signature(builder)}.") from None
    from engine.backends.keras import KerasModel
    return KerasModel(functools.partial(builder, **kwargs), loss_fn=loss_fn,
                      jit_compile=jit_compile, unroll_rnns=unroll_rnns)
