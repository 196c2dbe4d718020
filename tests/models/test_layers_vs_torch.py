"""Each sequence layer's forward and backward against torch's own operations and autograd
(float32; torch runs in a child process, keras_interop_oracle.py; skipped without torch)."""
import functools
import importlib.util

import numpy as np
import pytest

from keras_interop_oracle import run_oracle
from models.layers import (Add, AttentionPooling, BatchNorm, Concatenate, Conv1D, Dense,
                           GlobalAveragePooling1D, LayerNorm, MaxPool1D, MultiHeadSelfAttention)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                reason="torch is not installed (pip install torch==2.13.0)")

# (id, kind, config for the torch side, input shapes, training, native layer)
CASES = [
    ("conv_same_stride_relu", "Conv1D", dict(stride=2, padding="same", activation="relu"),
     [(3, 9, 2)], True, Conv1D(4, 3, stride=2, padding="same", activation="relu")),
    ("conv_same_even_kernel", "Conv1D", dict(stride=1, padding="same", activation=None),
     [(2, 7, 3)], True, Conv1D(3, 4, padding="same")),
    ("conv_valid_stride", "Conv1D", dict(stride=2, padding="valid", activation=None),
     [(3, 10, 2)], True, Conv1D(4, 3, stride=2, padding="valid")),
    ("dense_relu", "Dense", dict(activation="relu"), [(6, 4)], True, Dense(5, activation="relu")),
    ("batchnorm_training", "BatchNorm", dict(epsilon=1e-3), [(4, 6, 3)], True,
     BatchNorm(momentum=0.99, epsilon=1e-3)),
    ("layernorm", "LayerNorm", dict(epsilon=1e-3), [(3, 5, 4)], True, LayerNorm()),
    ("maxpool", "MaxPool1D", dict(pool_size=2, stride=2), [(3, 9, 4)], True, MaxPool1D(2)),
    ("maxpool_overlapping", "MaxPool1D", dict(pool_size=3, stride=1), [(3, 8, 4)], True,
     MaxPool1D(3, stride=1)),
    ("global_average", "GlobalAveragePooling1D", {}, [(3, 6, 4)], True, GlobalAveragePooling1D()),
    ("self_attention", "MultiHeadSelfAttention", dict(heads=3, key_dim=2), [(2, 5, 6)], True,
     MultiHeadSelfAttention(3, 2)),
    ("attention_pooling", "AttentionPooling", {}, [(3, 7, 4)], True, AttentionPooling(5)),
    ("add", "Add", {}, [(3, 4, 5), (3, 4, 5), (3, 4, 5)], True, Add()),
    ("concatenate", "Concatenate", {}, [(3, 4, 2), (3, 4, 5)], True, Concatenate()),
]
RTOL, ATOL = 1e-4, 1e-5  # float32 on both sides, different operation orders


def _inputs(index, shapes, layer):
    rng = np.random.default_rng(index)
    xs = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    in_shape = [s[1:] for s in shapes] if len(shapes) > 1 else shapes[0][1:]
    weights = {name: (rng.standard_normal(shape) * 0.5).astype(np.float32)
               for name, shape in layer.weight_shapes(in_shape).items()}
    return xs, weights


@pytest.fixture(scope="module")
def torch_results(tmp_path_factory):
    oracle = functools.partial(run_oracle, str(tmp_path_factory.mktemp("torch")))
    cases = []
    for index, (_, kind, config, shapes, training, layer) in enumerate(CASES):
        xs, weights = _inputs(index, shapes, layer)
        out_shape = layer.output_shape([s[1:] for s in shapes] if len(shapes) > 1 else
                                       shapes[0][1:])
        dy = np.random.default_rng(100 + index).standard_normal(
            (shapes[0][0],) + tuple(out_shape)).astype(np.float32)
        cases.append((kind, config, xs, weights, dy, training))
    return cases, oracle("torch", cases)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case[0] for case in CASES])
def test_forward_and_gradients_match_torch_autograd(torch_results, index):
    cases, results = torch_results
    _, _, _, _, _, layer = CASES[index]
    _, _, xs, weights, dy, training = cases[index]
    result = results[index]
    theta = layer.init_theta(xs[0].shape[1:])
    y, cache = layer.forward(xs if len(xs) > 1 else xs[0], weights, theta, training=training)
    np.testing.assert_allclose(y, result["y"], rtol=RTOL, atol=ATOL, err_msg="forward")
    dxs, grads = layer.backward(weights, cache, dy)
    dxs = dxs if isinstance(dxs, list) else [dxs]
    for dx, expected in zip(dxs, result["dxs"], strict=True):
        np.testing.assert_allclose(dx, expected, rtol=RTOL, atol=ATOL, err_msg="input gradient")
    for name, expected in result["dweights"].items():
        np.testing.assert_allclose(grads[name], expected, rtol=RTOL, atol=ATOL, err_msg=name)
