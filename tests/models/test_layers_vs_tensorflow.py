"""Each sequence layer's forward and backward against its Keras twin under TensorFlow's
GradientTape (float32; Keras runs in a child process, keras_interop_oracle.py)."""
import functools

import numpy as np
import pytest

from engine.backends import tensorflow_available
from keras_interop_oracle import run_oracle
from models.layers import (Add, AttentionPooling, BatchNorm, Concatenate, Conv1D, Dense,
                           GlobalAveragePooling1D, LayerNorm, MaxPool1D, MultiHeadSelfAttention)

pytestmark = [pytest.mark.tf, pytest.mark.skipif(not tensorflow_available(),
                                                 reason="TensorFlow is not installed")]

# (id, Keras class, its config, input shapes, training, native layer, native names of Keras's
# trainable weights in their order)
MHA_NAMES = [f"{p}/{k}" for p in ("query", "key", "value", "attention_output")
             for k in ("kernel", "bias")]
CASES = [
    ("conv_same_stride_relu", "Conv1D", dict(filters=4, kernel_size=3, strides=2, padding="same",
                                              activation="relu"), [(3, 9, 2)], True,
     Conv1D(4, 3, stride=2, padding="same", activation="relu"), ["kernel", "bias"]),
    ("conv_same_even_kernel", "Conv1D", dict(filters=3, kernel_size=4, padding="same"),
     [(2, 7, 3)], True, Conv1D(3, 4, padding="same"), ["kernel", "bias"]),
    ("conv_valid", "Conv1D", dict(filters=4, kernel_size=5, strides=1), [(3, 9, 2)], True,
     Conv1D(4, 5), ["kernel", "bias"]),
    ("dense_relu", "Dense", dict(units=5, activation="relu"), [(6, 4)], True,
     Dense(5, activation="relu"), ["kernel", "bias"]),
    ("batchnorm_training", "BatchNormalization", {}, [(4, 6, 3)], True,
     BatchNorm(momentum=0.99, epsilon=1e-3), ["gamma", "beta"]),
    ("layernorm", "LayerNormalization", {}, [(3, 5, 4)], True, LayerNorm(), ["gamma", "beta"]),
    ("maxpool", "MaxPooling1D", dict(pool_size=2), [(3, 9, 4)], True, MaxPool1D(2), []),
    ("maxpool_stride", "MaxPooling1D", dict(pool_size=3, strides=2), [(3, 9, 4)], True,
     MaxPool1D(3, stride=2), []),
    ("global_average", "GlobalAveragePooling1D", {}, [(3, 6, 4)], True, GlobalAveragePooling1D(),
     []),
    ("self_attention", "MultiHeadAttention", dict(num_heads=3, key_dim=2), [(2, 5, 4)], True,
     MultiHeadSelfAttention(3, 2), MHA_NAMES),
    ("attention_pooling", "AttentionPooling", dict(units=5), [(3, 7, 4)], True,
     AttentionPooling(5), ["hidden/kernel", "hidden/bias", "score/kernel"]),
    ("add", "Add", {}, [(3, 4, 5), (3, 4, 5)], True, Add(), []),
    ("concatenate", "Concatenate", {}, [(3, 4, 2), (3, 4, 5)], True, Concatenate(), []),
]
# Both sides compute in float32 with different operation orders.
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def tape_results(tmp_path_factory):
    oracle = functools.partial(run_oracle, str(tmp_path_factory.mktemp("tape")))
    return oracle("tape", [(kind, config, shapes, training)
                           for _, kind, config, shapes, training, _, _ in CASES], seed=0)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case[0] for case in CASES])
def test_forward_and_gradients_match_keras_under_gradient_tape(tape_results, index):
    _, _, _, _, training, layer, names = CASES[index]
    result = tape_results[index]
    weights = dict(zip(names, result["weights"], strict=True))
    theta = {k: v for k, v in layer.init_theta(result["xs"][0].shape[1:]).items()}
    xs = result["xs"] if len(result["xs"]) > 1 else result["xs"][0]
    y, cache = layer.forward(xs, weights, theta, training=training)
    np.testing.assert_allclose(y, result["y"], rtol=RTOL, atol=ATOL, err_msg="forward")
    dxs, grads = layer.backward(weights, cache, result["dy"])
    dxs = dxs if isinstance(dxs, list) else [dxs]
    for dx, expected in zip(dxs, result["dxs"], strict=True):
        np.testing.assert_allclose(dx, expected, rtol=RTOL, atol=ATOL, err_msg="input gradient")
    for name, expected in zip(names, result["dweights"], strict=True):
        np.testing.assert_allclose(grads[name], expected, rtol=RTOL, atol=ATOL, err_msg=name)
