"""The Keras zoo's models (``models.keras_zoo``) as native graphs: no TensorFlow anywhere.

``get_model("imu_cnn_bilstm", timesteps=100, channels=6, num_classes=4)`` builds the same
architecture as ``get_model("keras:imu_cnn_bilstm", ...)`` from ``models.layers``, with the same
arguments and the Keras layer names as node names, so ``model.to_keras(state)`` and
``models.from_keras`` map one onto the other weight by weight. Each builder returns a
``models.Graph`` whose logits replace the Keras softmax (or sigmoid) output; the loss is the same
cross-entropy. ``learning_rate`` is accepted so the signatures match: the engine's optimizer sets
the rate of training, and ``to_keras`` compiles the exported model with ``Adam(learning_rate)``.
"""
import numbers

from models.graph import Graph
from models.keras_zoo import _sequence_shape
from models.layers import (Add, AttentionPooling, BatchNorm, BinaryLogits, Concatenate, Conv1D,
                           Dense, Dropout, GlobalAveragePooling1D, LayerNorm, MaxPool1D,
                           MultiHeadSelfAttention)
from models.layers.base import check_num_classes, check_positive_int
from models.layers.recurrent import GRU, LSTM, Bidirectional

__all__ = ["imu_cnn_bilstm", "lstm_attention", "cnn_bilstm_attention"]

# Keras's BatchNormalization defaults, so from_keras/to_keras and training behave alike.
_KERAS_BN = dict(momentum=0.99, epsilon=1e-3)


def _check_learning_rate(learning_rate):
    if (isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real)
            or not learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive number. Received: "
                         f"learning_rate={learning_rate!r}.")
    return float(learning_rate)


def _head(nodes, source, num_classes, dropout):
    """Dense(128, relu) -> Dropout -> Dense(num_classes) logits, as keras_zoo._dense_head."""
    return nodes + [("dense", Dense(128, activation="relu", init="glorot"), source),
                    ("dropout", Dropout(dropout), "dense"),
                    ("classes", Dense(check_num_classes(num_classes), init="glorot"), "dropout")]


def _graph(nodes, shape, learning_rate, name):
    model = Graph(nodes, input_shape=shape)
    model.learning_rate = _check_learning_rate(learning_rate)
    model.name = name
    return model


def imu_cnn_bilstm(*, timesteps=128, channels=13, num_classes=26, dropout=0.3,
                   learning_rate=1e-3, input_shape=None):
    """CNN + BiLSTM for IMU character recognition, native (about 0.74M weights at the defaults).

    Conv1D(64, 5, relu) + BatchNorm, Conv1D(128, 5, relu), MaxPool(2), BiLSTM(128, sequences),
    BiLSTM(128), Dense(128, relu), Dropout, Dense(num_classes). ``input_shape=(timesteps,
    channels)`` overrides both (the CLI fills it from the data).
    """
    shape = _sequence_shape(input_shape, timesteps, channels)
    nodes = [("conv1", Conv1D(64, 5, activation="relu", init="glorot"), "input"),
             ("conv1_bn", BatchNorm(**_KERAS_BN), "conv1"),
             ("conv2", Conv1D(128, 5, activation="relu", init="glorot"), "conv1_bn"),
             ("pool", MaxPool1D(2), "conv2"),
             ("bilstm1", Bidirectional(LSTM(128, return_sequences=True)), "pool"),
             ("bilstm2", Bidirectional(LSTM(128)), "bilstm1")]
    return _graph(_head(nodes, "bilstm2", num_classes, dropout), shape, learning_rate,
                  "imu_cnn_bilstm")


def lstm_attention(*, timesteps=20, features=256, units=128, attention_units=64, num_classes=2,
                   head="sigmoid", dropout=0.3, learning_rate=1e-3, input_shape=None):
    """LSTM over a sequence of feature vectors with additive attention pooling (Bahdanau), native.

    ``head="sigmoid"`` (binary: one logit z, seen as the two classes [0, z], which is binary
    cross-entropy; needs num_classes=2) or ``"softmax"`` (num_classes logits).
    ``input_shape=(timesteps, features)`` overrides both (the CLI fills it from the data).
    """
    shape = _sequence_shape(input_shape, timesteps, features)
    if head not in ("sigmoid", "softmax"):
        raise ValueError(f"head must be 'sigmoid' or 'softmax'. Received: head={head!r}.")
    num_classes = check_num_classes(num_classes)
    if head == "sigmoid" and num_classes != 2:
        raise ValueError(f"a sigmoid head is binary: it needs num_classes=2. Received: "
                         f"num_classes={num_classes}. Use head='softmax' for more classes.")
    nodes = [("lstm", LSTM(check_positive_int(units, "units"), return_sequences=True), "input"),
             ("attention", AttentionPooling(attention_units), "lstm"),
             ("dropout", Dropout(dropout), "attention")]
    if head == "sigmoid":
        nodes += [("violent", Dense(1, init="glorot"), "dropout"),
                  ("violent_logits", BinaryLogits(), "violent")]
    else:
        nodes += [("classes", Dense(num_classes, init="glorot"), "dropout")]
    return _graph(nodes, shape, learning_rate, "lstm_attention")


def cnn_bilstm_attention(*, timesteps=60, features=126, num_classes=20, filters=(64, 128),
                         lstm_units=64, heads=4, key_dim=32, gru_units=64, dropout=0.3,
                         learning_rate=1e-3, input_shape=None):
    """Conv1D stack, BiLSTM, multi-head self-attention with a skip connection and LayerNorm, and a
    parallel GRU path over the convolution features, fused before the head; native.
    ``input_shape=(timesteps, features)`` overrides both."""
    shape = _sequence_shape(input_shape, timesteps, features)
    if not isinstance(filters, (tuple, list)) or not filters:
        raise ValueError(f"filters needs one entry per convolution, at least one. Received: "
                         f"filters={filters!r}.")
    nodes, source = [], "input"
    for index, count in enumerate(filters):
        name = f"conv{index + 1}"
        nodes.append((name, Conv1D(count, 3, padding="same", activation="relu", init="glorot"),
                      source))
        source = name
    nodes += [("conv_bn", BatchNorm(**_KERAS_BN), source),
              ("bilstm", Bidirectional(LSTM(lstm_units, return_sequences=True)), "conv_bn"),
              ("self_attention", MultiHeadSelfAttention(heads, key_dim, dropout=dropout * 0.5),
               "bilstm"),
              ("attention_skip", Add(), ["bilstm", "self_attention"]),
              ("attention_norm", LayerNorm(), "attention_skip"),
              ("attention_pool", GlobalAveragePooling1D(), "attention_norm"),
              ("gru", GRU(gru_units), "conv_bn"),
              ("fuse", Concatenate(), ["attention_pool", "gru"])]
    return _graph(_head(nodes, "fuse", num_classes, dropout), shape, learning_rate,
                  "cnn_bilstm_attention")
