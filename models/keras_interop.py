"""Keras models to native graphs and back: ``from_keras(keras_model)`` and ``to_keras(model, state)``.

Each Keras layer maps onto one native layer with the same weights in the same layout (Keras's
kernel layouts are the native ones), named after the Keras layer. Two patterns are more than one
layer on one side: the additive attention of ``keras_zoo.lstm_attention`` (Dense(tanh) ->
Dense(1, no bias) -> Softmax(axis=1) -> Dot(axes=1) with the states) is one ``AttentionPooling``,
and the output activation (softmax, or a one-unit sigmoid) is the native loss, so the native graph
ends in logits (``BinaryLogits`` for the sigmoid). TensorFlow is imported inside the functions
only: importing this module loads nothing.
"""
import numpy as np

from models.graph import INPUT, Graph
from models.layers import (Add, AttentionPooling, BatchNorm, BinaryLogits, Concatenate, Conv1D,
                           Dense, Dropout, Flatten, GlobalAveragePooling1D, LayerNorm, MaxPool1D,
                           MultiHeadSelfAttention, ReLU, Reshape)

__all__ = ["from_keras", "to_keras"]


class UnsupportedLayerError(ValueError):
    """A Keras layer (or configuration) with no native counterpart."""


def _unsupported(layer, why):
    return UnsupportedLayerError(
        f"layer {layer.name!r} ({type(layer).__name__}) is not supported natively: {why}. "
        "Supported: Conv1D, Dense, BatchNormalization, LayerNormalization, MaxPooling1D, "
        "GlobalAveragePooling1D, Dropout, Flatten, Reshape, ReLU, LSTM, GRU, Bidirectional, "
        "MultiHeadAttention (self-attention), Add, Concatenate, additive attention pooling; "
        "train it with engine.backends.KerasModel instead.")


def _need(layer, condition, why):
    if not condition:
        raise _unsupported(layer, why)


def _activation(layer):
    activation = layer.get_config().get("activation", "linear")
    return activation if isinstance(activation, str) else getattr(activation, "__name__", "?")


def _inputs_of(layer):
    nodes = layer._inbound_nodes
    _need(layer, len(nodes) == 1, f"it is called {len(nodes)} times (shared layers are not)")
    return [t._keras_history.operation for t in nodes[0].input_tensors]


def _recurrent_layer(layer, backwards=False):
    from models.layers.recurrent import GRU, LSTM
    config = layer.get_config()
    kind = type(layer).__name__
    _need(layer, kind in ("LSTM", "GRU"), "only LSTM and GRU recurrences are")
    _need(layer, config["activation"] == "tanh" and config["recurrent_activation"] == "sigmoid",
          "activations other than tanh/sigmoid")
    _need(layer, config["use_bias"] and config["go_backwards"] == backwards and not config["stateful"]
          and not config.get("return_state") and config["dropout"] == 0
          and config["recurrent_dropout"] == 0, "use_bias=False, go_backwards, stateful, "
          "return_state or (recurrent_)dropout")
    if kind == "GRU":
        _need(layer, config["reset_after"], "GRU(reset_after=False)")
    cls = LSTM if kind == "LSTM" else GRU
    return cls(config["units"], return_sequences=bool(config["return_sequences"]))


def _convert(layer, output):
    """(native layer, [weight local names in get_weights() order], {keras theta index: name})."""
    kind, config = type(layer).__name__, layer.get_config()
    activation = _activation(layer)
    if kind == "Conv1D":
        _need(layer, tuple(config["dilation_rate"]) == (1,) and config["groups"] == 1
              and config["use_bias"] and config["data_format"] == "channels_last"
              and config["padding"] in ("same", "valid") and activation in ("linear", "relu"),
              "dilation, groups, use_bias=False, causal padding or an activation other than relu")
        return Conv1D(config["filters"], config["kernel_size"][0], stride=config["strides"][0],
                      padding=config["padding"], activation=None if activation == "linear"
                      else "relu"), ["kernel", "bias"]
    if kind == "Dense":
        _need(layer, len(layer.input.shape) == 2, "Dense over sequences (only (n, features))")
        final = {"softmax"} if output else set()
        _need(layer, config["use_bias"] and activation in {"linear", "relu"} | final | (
            {"sigmoid"} if output and config["units"] == 1 else set()),
              f"activation {activation!r} here (relu or linear; softmax or a one-unit sigmoid on "
              "the output layer), or use_bias=False")
        return Dense(config["units"], activation="relu" if activation == "relu" else None), [
            "kernel", "bias"]
    if kind == "BatchNormalization":
        _need(layer, config["axis"] in (-1, [-1], len(layer.input.shape) - 1,
                                        [len(layer.input.shape) - 1]) and config["center"]
              and config["scale"] and not config.get("renorm"), "axis other than the last, "
              "center/scale=False or renorm")
        return BatchNorm(momentum=config["momentum"], epsilon=config["epsilon"]), [
            "gamma", "beta", "running_mean", "running_var"]
    if kind == "LayerNormalization":
        _need(layer, config["axis"] in (-1, [-1], len(layer.input.shape) - 1,
                                        [len(layer.input.shape) - 1]) and config["center"]
              and config["scale"] and not config.get("rms_scaling"), "axis other than the last, "
              "center/scale=False or rms_scaling")
        return LayerNorm(epsilon=config["epsilon"]), ["gamma", "beta"]
    if kind == "MaxPooling1D":
        _need(layer, config["padding"] == "valid" and config["data_format"] == "channels_last",
              "padding='same' or channels_first")
        return MaxPool1D(config["pool_size"][0], stride=config["strides"][0]), []
    if kind == "GlobalAveragePooling1D":
        _need(layer, not config.get("keepdims") and config["data_format"] == "channels_last",
              "keepdims=True or channels_first")
        return GlobalAveragePooling1D(), []
    if kind == "Dropout":
        _need(layer, config.get("noise_shape") is None, "noise_shape")
        return Dropout(config["rate"]), []
    if kind == "Flatten":
        return Flatten(), []
    if kind == "Reshape":
        return Reshape(config["target_shape"]), []
    if kind == "ReLU" or (kind == "Activation" and activation == "relu"):
        _need(layer, kind == "Activation" or (config["max_value"] is None and
                                              config["negative_slope"] == 0
                                              and config["threshold"] == 0), "a leaky or capped ReLU")
        return ReLU(), []
    if kind in ("LSTM", "GRU"):
        return _recurrent_layer(layer), ["kernel", "recurrent_kernel", "bias"]
    if kind == "Bidirectional":
        from models.layers.recurrent import Bidirectional
        _need(layer, config["merge_mode"] == "concat", f"merge_mode={config['merge_mode']!r}")
        forward = _recurrent_layer(layer.forward_layer)
        backward = _recurrent_layer(layer.backward_layer, backwards=True)
        _need(layer, repr(forward) == repr(backward), "different forward and backward layers")
        names = ["kernel", "recurrent_kernel", "bias"]
        return Bidirectional(forward), [f"{d}/{n}" for d in ("forward", "backward") for n in names]
    if kind == "MultiHeadAttention":
        _need(layer, config["value_dim"] in (None, config["key_dim"]) and config["use_bias"]
              and config["output_shape"] is None and config["attention_axes"] in (None, (1,), [1])
              and not config.get("use_gate") and config.get("sliding_window") is None,
              "value_dim != key_dim, output_shape, attention_axes, use_gate or no bias")
        tensors = layer._inbound_nodes[0].input_tensors
        _need(layer, len(tensors) == 2 and tensors[0] is tensors[1], "attention of one sequence "
              "over another (only self-attention, layer(x, x), is)")
        return MultiHeadSelfAttention(config["num_heads"], config["key_dim"],
                                      dropout=config["dropout"]), [
            f"{part}/{kind_}" for part in ("query", "key", "value", "attention_output")
            for kind_ in ("kernel", "bias")]
    if kind == "Add":
        return Add(), []
    if kind == "Concatenate":
        _need(layer, config["axis"] in (-1, len(layer.output.shape) - 1), "axis other than -1")
        return Concatenate(), []
    raise _unsupported(layer, "no native layer of this class")


def _attention_pattern(layer, consumers):
    """The layers of additive attention pooling that starts at ``layer`` (a Dense(tanh) over a
    sequence), as (hidden, score, dot), or None when ``layer`` does not start one."""
    def only(current, kind):
        after = consumers.get(current.name, [])
        return after[0] if len(after) == 1 and type(after[0]).__name__ == kind else None
    if type(layer).__name__ != "Dense" or len(layer.input.shape) != 3 or _activation(layer) != "tanh":
        return None
    score = only(layer, "Dense")
    softmax = score and only(score, "Softmax")
    dot = softmax and only(softmax, "Dot")
    if not dot or score.get_config()["units"] != 1 or score.get_config()["use_bias"]:
        return None
    states = _inputs_of(layer)[0]
    if (softmax.get_config()["axis"] not in (1, [1]) or dot.get_config()["axes"] not in (1, [1, 1])
            or dot.get_config()["normalize"] or [op.name for op in _inputs_of(dot)] !=
            [softmax.name, states.name]):
        return None
    return score, softmax, dot


def from_keras(keras_model):
    """A native model and state equal to ``keras_model`` (a Sequential or functional classifier).

    Args:
        keras_model: a built ``keras.Model`` with one (timesteps, features) or (features,) input
            and one output, made of the layers listed in ``UnsupportedLayerError``'s message.

    Returns:
        ``(model, state)``: a ``models.Graph`` named after the Keras layers (logits instead of the
        softmax/sigmoid output) and a ``NetworkState`` holding the Keras weights and statistics.

    Raises:
        UnsupportedLayerError (a ValueError): naming the first layer with no native counterpart.
    """
    import keras
    if not isinstance(keras_model, keras.Model) or len(keras_model.inputs) != 1 or len(
            keras_model.outputs) != 1:
        raise ValueError(f"from_keras takes a built keras.Model with one input and one output. "
                         f"Received: {keras_model!r}.")
    input_shape = tuple(keras_model.inputs[0].shape[1:])
    source_of, consumers = {}, {}
    layers = [layer for layer in keras_model.layers if type(layer).__name__ != "InputLayer"]
    for index, layer in enumerate(layers):
        if isinstance(keras_model, keras.Sequential):
            inputs = [layers[index - 1]] if index else []
        else:
            inputs = [op for op in _inputs_of(layer) if type(op).__name__ != "InputLayer"]
        source_of[layer.name] = inputs
        for op in inputs:
            consumers.setdefault(op.name, []).append(layer)
    output_layer = keras_model.outputs[0]._keras_history.operation
    node_of, nodes, values, absorbed = {}, [], {}, set()
    for layer in layers:
        if layer.name in absorbed:
            continue
        _need(layer, not isinstance(layer, keras.Model), "a nested model (flatten it first)")
        inputs = [node_of[op.name] for op in source_of[layer.name]] or [INPUT]
        name = layer.name if layer.name != INPUT else f"{INPUT}_layer"
        if type(layer).__name__ in ("Softmax", "Activation") and layer is output_layer and (
                _activation(layer) == "softmax" or type(layer).__name__ == "Softmax"):
            node_of[layer.name] = inputs[0]  # the softmax output is the native loss
            continue
        pattern = _attention_pattern(layer, consumers)
        if pattern:
            score, softmax, dot = pattern
            absorbed.update((score.name, softmax.name, dot.name))
            name = name[:-len("_hidden")] if name.endswith("_hidden") else name
            nodes.append((name, AttentionPooling(layer.get_config()["units"]), inputs))
            kernel, bias = layer.get_weights()
            values[name] = {"hidden/kernel": kernel, "hidden/bias": bias,
                            "score/kernel": score.get_weights()[0]}
            node_of[dot.name] = name
            continue
        native, local_names = _convert(layer, layer is output_layer)
        if type(layer).__name__ == "MultiHeadAttention":
            inputs = inputs[:1]  # layer(x, x): one input
        nodes.append((name, native, inputs))
        values[name] = dict(zip(local_names, layer.get_weights(), strict=True))
        node_of[layer.name] = name
        if layer is output_layer and _activation(layer) == "sigmoid":
            nodes.append((f"{name}_logits", BinaryLogits(), name))
            node_of[layer.name] = f"{name}_logits"
    model = Graph(nodes, input_shape=input_shape, output=node_of[output_layer.name])
    state = model.init_state(seed=0)
    for name, arrays in values.items():
        for local, value in arrays.items():
            target = state.weights if f"{name}/{local}" in state.weights else state.theta
            target[f"{name}/{local}"][...] = np.asarray(value, dtype=np.float32)
    return model, state


def to_keras(model, state):
    """A compiled ``keras.Model`` of a native ``Sequential`` or ``Graph`` with ``state``'s values.

    The output gets the softmax (or, after ``BinaryLogits``, a one-unit sigmoid) that the native
    loss implies; compiled with Adam (``model.learning_rate`` if set, else 1e-3) and the matching
    cross-entropy, ready for ``.save("model.keras")``.

    Raises:
        ValueError: for a layer with no Keras counterpart, or a state of another model.
    """
    if set(state.weights) != set(model.weight_shapes) or set(state.theta) != set(model.theta_shapes):
        raise ValueError("state does not belong to this model: its weight names differ. Pass the "
                         "state this model was trained with (model.init_state(...) or a checkpoint).")
    import keras
    from keras import layers as kl
    nodes = getattr(model, "nodes", None)
    if nodes is None:  # a Sequential: a chain named as its parameters are
        names = [f"{layer.kind}_{i}" for i, layer in enumerate(model.layers)]
        nodes = list(zip(names, model.layers, [[INPUT]] + [[n] for n in names[:-1]]))
    output = getattr(model, "output", nodes[-1][0])
    layer_of, sources_of = {n: l for n, l, _ in nodes}, {n: s for n, _, s in nodes}
    binary = isinstance(layer_of[output], BinaryLogits)
    # The node whose Keras layer takes the output activation: the Dense before BinaryLogits (as a
    # sigmoid), the output Dense (softmax), or none (a Softmax layer is added after it).
    activated = sources_of[output][0] if binary else output
    plain_dense = isinstance(layer_of[activated], Dense) and layer_of[activated].activation is None
    if binary and not plain_dense:
        raise ValueError(f"BinaryLogits must follow a Dense(1) for a Keras sigmoid output. "
                         f"Received: {layer_of[activated]!r} before it.")
    inputs = keras.Input(model.input_shape, name=INPUT)
    tensors, assignments = {INPUT: inputs}, []
    for name, layer, sources in nodes:
        def values(*names, prefix=f"{name}/"):
            return [state.weights[prefix + k] if prefix + k in state.weights
                    else state.theta[prefix + k] for k in names]
        tensors[name], pairs = _keras_layer(kl, name, layer, [tensors[s] for s in sources], values,
                                            name == activated and plain_dense, binary)
        assignments += pairs
    outputs = tensors[output]
    if not plain_dense:
        outputs = kl.Softmax(name=f"{output}_softmax")(outputs)
    keras_model = keras.Model(inputs, outputs, name=getattr(model, "name", "native_model"))
    for keras_layer, arrays in assignments:
        keras_layer.set_weights([np.asarray(a) for a in arrays])
    keras_model.compile(optimizer=keras.optimizers.Adam(getattr(model, "learning_rate", 1e-3)),
                        loss="binary_crossentropy" if binary else
                        "sparse_categorical_crossentropy", metrics=["accuracy"])
    return keras_model


def _keras_layer(kl, name, layer, xs, values, is_output, binary):
    """(output tensor, [(keras layer, weights in get_weights() order)]) of one native node."""
    from models.layers.recurrent import GRU, LSTM, Bidirectional
    x = xs[0]
    if isinstance(layer, Conv1D):
        if isinstance(layer.padding, int) and layer.padding:
            x = kl.ZeroPadding1D(layer.padding, name=f"{name}_padding")(x)
        padding = layer.padding if isinstance(layer.padding, str) else "valid"
        keras_layer = kl.Conv1D(layer.filters, layer.kernel_size, strides=layer.stride,
                                padding=padding, activation=layer.activation, name=name)
        return keras_layer(x), [(keras_layer, values("kernel", "bias"))]
    if isinstance(layer, Dense):
        activation = layer.activation
        if is_output:
            activation = "sigmoid" if binary else "softmax"
        keras_layer = kl.Dense(layer.units, activation=activation, name=name)
        return keras_layer(x), [(keras_layer, values("kernel", "bias"))]
    if isinstance(layer, BatchNorm):
        keras_layer = kl.BatchNormalization(momentum=layer.momentum, epsilon=layer.epsilon,
                                            name=name)
        return keras_layer(x), [(keras_layer, values("gamma", "beta", "running_mean",
                                                     "running_var"))]
    if isinstance(layer, LayerNorm):
        keras_layer = kl.LayerNormalization(epsilon=layer.epsilon, name=name)
        return keras_layer(x), [(keras_layer, values("gamma", "beta"))]
    if isinstance(layer, (LSTM, GRU, Bidirectional)):
        inner = layer.layer if isinstance(layer, Bidirectional) else layer
        cls = kl.LSTM if isinstance(inner, LSTM) else kl.GRU
        names = ("kernel", "recurrent_kernel", "bias")
        if isinstance(layer, Bidirectional):
            keras_layer = kl.Bidirectional(cls(inner.units, return_sequences=inner.return_sequences,
                                               name=f"{name}_layer"), name=name)
            names = tuple(f"{d}/{n}" for d in ("forward", "backward") for n in names)
        else:
            keras_layer = cls(inner.units, return_sequences=inner.return_sequences, name=name)
        return keras_layer(x), [(keras_layer, values(*names))]
    if isinstance(layer, MultiHeadSelfAttention):
        keras_layer = kl.MultiHeadAttention(layer.heads, layer.key_dim, dropout=layer.dropout,
                                            name=name)
        names = [f"{p}/{k}" for p in ("query", "key", "value", "attention_output")
                 for k in ("kernel", "bias")]
        return keras_layer(x, x), [(keras_layer, values(*names))]
    if isinstance(layer, AttentionPooling):
        hidden = kl.Dense(layer.units, activation="tanh", name=f"{name}_hidden")
        score = kl.Dense(1, use_bias=False, name=f"{name}_score")
        weights = kl.Softmax(axis=1, name=f"{name}_weights")(score(hidden(x)))
        context = kl.Dot(axes=1, name=f"{name}_pool")([weights, x])
        return kl.Flatten(name=f"{name}_context")(context), [
            (hidden, values("hidden/kernel", "hidden/bias")), (score, values("score/kernel"))]
    simple = {MaxPool1D: lambda: kl.MaxPooling1D(layer.pool_size, strides=layer.stride, name=name),
              GlobalAveragePooling1D: lambda: kl.GlobalAveragePooling1D(name=name),
              Dropout: lambda: kl.Dropout(layer.rate, name=name),
              ReLU: lambda: kl.ReLU(name=name),
              Flatten: lambda: kl.Flatten(name=name),
              Reshape: lambda: kl.Reshape(layer.target_shape, name=name)}
    if type(layer) in simple:
        return simple[type(layer)]()(x), []
    if isinstance(layer, Add):
        return kl.Add(name=name)(xs), []
    if isinstance(layer, Concatenate):
        return kl.Concatenate(name=name)(xs), []
    if isinstance(layer, BinaryLogits):
        return x, []  # the Dense before it carries the sigmoid
    raise ValueError(f"node {name!r}: {type(layer).__name__} has no Keras counterpart in "
                     "models.keras_interop.")
