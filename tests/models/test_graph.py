"""models.Graph: branches and merges against finite differences, a chain against Sequential, the
errors of a malformed graph, and the protocol (pickling, float32, with_loss)."""
import pickle

import numpy as np
import pytest

from models import Graph, Sequential
from models.layers import (Add, BatchNorm, Concatenate, Conv1D, Dense, Dropout, Flatten,
                           GlobalAveragePooling1D, LayerNorm, ReLU)
from models.losses import FocalLoss


def branchy_graph():
    """A skip (Add), a branch point read by two nodes, a Concatenate, BatchNorm theta, dropout."""
    return Graph([
        ("conv", Conv1D(4, 3, padding="same"), "input"),
        ("bn", BatchNorm(momentum=0.99, epsilon=1e-3), "conv"),
        ("left", Conv1D(4, 3, padding="same", activation="relu"), "bn"),
        ("skip", Add(), ["bn", "left"]),
        ("norm", LayerNorm(), "skip"),
        ("pool", GlobalAveragePooling1D(), "norm"),
        ("right", Flatten(), "bn"),
        ("right_dense", Dense(3, activation="relu"), "right"),
        ("fuse", Concatenate(), ["pool", "right_dense"]),
        ("dropout", Dropout(0.3), "fuse"),
        ("classes", Dense(3, init="glorot"), "dropout"),
    ], input_shape=(6, 2))


def test_branch_and_merge_gradients_match_finite_differences_in_float64(finite_difference):
    model = branchy_graph()
    state = model.init_state(seed=0)
    rng = np.random.default_rng(1)
    weights = {k: v.astype(np.float64) + 0.1 * rng.standard_normal(v.shape)
               for k, v in state.weights.items()}
    theta = {k: v.astype(np.float64) for k, v in state.theta.items()}
    x, y = rng.standard_normal((5, 6, 2)), rng.integers(0, 3, 5)

    def loss():
        return model.forward_backward(weights, theta, x, y, rng=np.random.default_rng(3))[0]

    _, grads, new_theta = model.forward_backward(weights, theta, x, y, rng=np.random.default_rng(3))
    assert set(grads) == set(weights) and set(new_theta) == set(theta)
    for name, array in weights.items():
        np.testing.assert_allclose(grads[name], finite_difference(loss, array), rtol=1e-6,
                                   atol=1e-8, err_msg=name)


def test_a_chain_graph_equals_the_sequential_model_of_the_same_layers():
    layers = [Conv1D(3, 3, stride=2, padding=1), BatchNorm(), ReLU(), Flatten(), Dense(4)]
    sequential = Sequential(layers, input_shape=(9, 2))
    names = [f"{layer.kind}_{i}" for i, layer in enumerate(layers)]
    graph = Graph([(name, layer, previous) for name, layer, previous in
                   zip(names, layers, ["input"] + names[:-1])], input_shape=(9, 2))
    assert graph.weight_shapes == sequential.weight_shapes
    assert graph.theta_shapes == sequential.theta_shapes
    state = sequential.init_state(seed=4)
    assert graph.init_state(seed=4).weights.keys() == state.weights.keys()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 9, 2)).astype(np.float32), rng.integers(0, 4, 7)
    loss_s, grads_s, theta_s = sequential.loss_and_grads(state, x, y)
    loss_g, grads_g, theta_g = graph.loss_and_grads(state, x, y)
    assert loss_g == loss_s
    for name in grads_s:
        np.testing.assert_array_equal(grads_g[name], grads_s[name])
    for name in theta_s:
        np.testing.assert_array_equal(theta_g[name], theta_s[name])
    np.testing.assert_array_equal(graph.predict(state, x), sequential.predict(state, x))


def test_graph_follows_the_protocol_in_float32_and_pickles():
    model = branchy_graph()
    state = model.init_state(seed=0)
    assert state.weights.keys() == model.weight_shapes.keys()
    assert all(v.dtype == np.float32 for v in state.weights.values())
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 6, 2)).astype(np.float32), rng.integers(0, 3, 8)
    before = state.buffer.copy()
    loss, grads, theta = model.loss_and_grads(state, x, y, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(state.buffer, before)
    assert isinstance(loss, float) and all(g.dtype == np.float32 for g in grads.values())
    probabilities = model.predict(state, x)
    assert probabilities.shape == (8, 3) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-6)
    clone = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(clone.predict(state, x), probabilities)
    focal = model.with_loss(FocalLoss(gamma=2.0))
    assert focal.loss(state, x, y) != model.loss(state, x, y)
    assert model.predict_and_loss(state, x, y)[1] == pytest.approx(model.loss(state, x, y))


@pytest.mark.parametrize("nodes, message", [
    ([("a", Dense(3), "b"), ("b", Dense(3), "a")], r"'a' reads \['b'\], not defined before it"),
    ([("a", Dense(3), "input"), ("a", Dense(3), "a")], "unique"),
    ([("a", Dense(3), "input"), ("b", Dense(3), "input"), ("c", Dense(3), "a")],
     r"nodes \['b'\] do not lead to the output 'c'"),
    ([("a/b", Dense(3), "input")], "without '/'"),
    ([("a", Dense(3), ["input", "input"])], "merge layer"),
    ([("a", Add(), "input")], "merge layer"),
    ([("a", Dense(3), "input", "extra")], "triple"),
    ([("a", "Dense", "input")], "models.layers.Layer"),
    ([("a", Conv1D(2, 3), "input")], r"node 'a' \(Conv1D"),
])
def test_malformed_graphs_are_refused_with_the_reason(nodes, message):
    with pytest.raises(ValueError, match=message):
        Graph(nodes, input_shape=(4,))


def test_to_keras_refuses_a_state_of_another_model_before_loading_tensorflow():
    model, other = branchy_graph(), Graph([("classes", Dense(3), "input")], input_shape=(4,))
    with pytest.raises(ValueError, match="state does not belong to this model"):
        model.to_keras(other.init_state(seed=0))
