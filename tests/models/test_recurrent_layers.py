"""LSTM, GRU and Bidirectional against finite differences (float64), TensorFlow's GradientTape
and PyTorch's autograd (float32, same weights), plus their shapes, errors and kernels.

TensorFlow and torch run in a child process (this file run as a script): the pytest process never
imports them, because later tests fork workers and forking after either runtime started is unsafe.

    python test_recurrent_layers.py {keras|torch} INPUT.pkl OUTPUT.pkl
"""
import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models.layers import Dense  # noqa: E402
from models.layers import _recurrent_kernels as kernels  # noqa: E402
from models.layers.recurrent import GRU, LSTM, Bidirectional  # noqa: E402
from models.sequential import Sequential  # noqa: E402

# Float32 forward and gradients against TensorFlow / torch: both sides accumulate over at most a
# few dozen float32 products per value, ~1e-7 relative each; measured differences are below 1.1e-6
# (gradients) and 2e-7 (outputs) on these shapes, so 1e-5 absolute leaves a 10x margin and still
# catches any wrong gate, bias row or time direction (those give differences of order 0.1).
PEER_ATOL = 1e-5

CASES = [(cls, sequences, bidirectional) for cls in (LSTM, GRU) for sequences in (True, False)
         for bidirectional in (False, True)]
CASE_IDS = [f"{'bi' if bi else ''}{cls.__name__.lower()}-{'sequences' if seq else 'last'}"
            for cls, seq, bi in CASES]


def make_layer(cls, sequences, bidirectional, units=5):
    layer = cls(units, return_sequences=sequences)
    return Bidirectional(layer) if bidirectional else layer


def random_case(layer, shape, seed, dtype):
    """Input, weights (initial values plus noise: every gate and bias entry matters) and dy."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    weights = {name: (value + 0.3 * rng.standard_normal(value.shape)).astype(dtype)
               for name, value in layer.init_weights(shape[1:], rng).items()}
    y, _ = layer.forward(x, weights, {})
    dy = rng.standard_normal(y.shape).astype(dtype)
    return x, weights, dy


# -- finite differences ------------------------------------------------------------------------
@pytest.mark.parametrize("cls, sequences, bidirectional", CASES, ids=CASE_IDS)
def test_recurrent_gradients_match_finite_differences(layer_gradient_check, cls, sequences,
                                                      bidirectional):
    layer = make_layer(cls, sequences, bidirectional, units=3)
    layer_gradient_check(layer, np.random.default_rng(1).standard_normal((2, 4, 3)))


@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_a_stack_of_recurrent_layers_trains_through_sequential_with_exact_gradients(
        finite_difference, cls):
    model = Sequential([Bidirectional(cls(3, return_sequences=True)), cls(2), Dense(3)],
                       input_shape=(4, 2))
    rng = np.random.default_rng(2)
    weights = {name: rng.standard_normal(shape) * 0.7
               for name, shape in model.weight_shapes.items()}
    x, y = rng.standard_normal((3, 4, 2)), np.array([0, 2, 1])
    loss, grads, _ = model.forward_backward(weights, {}, x, y)
    for name, array in weights.items():
        numeric = finite_difference(lambda: model.forward_backward(weights, {}, x, y)[0], array)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


# -- TensorFlow and torch ------------------------------------------------------------------------
def run_peer(tmp_path, framework, case):
    source, target = tmp_path / f"{framework}.in.pkl", tmp_path / f"{framework}.out.pkl"
    source.write_bytes(pickle.dumps(case))
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), framework, str(source),
                                str(target)], capture_output=True, text=True, timeout=300,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    return pickle.loads(target.read_bytes())


def peer_cases():
    """Every layer configuration, as the plain data a peer needs, and our float32 results."""
    cases = []
    for index, (cls, sequences, bidirectional) in enumerate(CASES):
        layer = make_layer(cls, sequences, bidirectional)
        x, weights, dy = random_case(layer, (3, 6, 4), seed=10 + index, dtype=np.float32)
        y, cache = layer.forward(x, weights, {}, training=True)
        dx, grads = layer.backward(weights, cache, dy)
        assert y.dtype == dx.dtype == np.float32
        assert all(g.dtype == np.float32 for g in grads.values())
        cases.append(dict(kind=cls.__name__, units=5, sequences=sequences,
                          bidirectional=bidirectional, x=x, weights=weights, dy=dy,
                          ours=dict(y=y, dx=dx, grads=grads)))
    return cases


def assert_same_as_peer(cases, results, framework):
    for case, theirs in zip(cases, results):
        label = f"{framework} {case['kind']} sequences={case['sequences']} " \
                f"bidirectional={case['bidirectional']}"
        ours = case["ours"]
        np.testing.assert_allclose(ours["y"], theirs["y"], rtol=0, atol=PEER_ATOL,
                                   err_msg=f"{label}: output")
        np.testing.assert_allclose(ours["dx"], theirs["dx"], rtol=0, atol=PEER_ATOL,
                                   err_msg=f"{label}: input gradient")
        assert set(theirs["grads"]) == set(ours["grads"])
        for name, value in theirs["grads"].items():
            np.testing.assert_allclose(ours["grads"][name], value, rtol=0, atol=PEER_ATOL,
                                       err_msg=f"{label}: gradient of {name}")


@pytest.mark.tf
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="TensorFlow is not installed")
def test_recurrent_layers_match_keras_forward_and_gradient_tape(tmp_path):
    cases = peer_cases()
    assert_same_as_peer(cases, run_peer(tmp_path, "keras", strip(cases)), "keras")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not installed (pip install torch==2.13.0)")
def test_recurrent_layers_match_torch_forward_and_autograd(tmp_path):
    cases = peer_cases()
    assert_same_as_peer(cases, run_peer(tmp_path, "torch", strip(cases)), "torch")


def strip(cases):
    return [{k: v for k, v in case.items() if k != "ours"} for case in cases]


# -- shapes, dtypes, errors, kernels ------------------------------------------------------------
@pytest.mark.parametrize("cls, sequences, bidirectional", CASES, ids=CASE_IDS)
def test_recurrent_shapes_and_names_follow_keras(cls, sequences, bidirectional):
    layer = make_layer(cls, sequences, bidirectional, units=5)
    gates = 4 if cls is LSTM else 3
    bias = (4 * 5,) if cls is LSTM else (2, 15)
    local = {"kernel": (7, gates * 5), "recurrent_kernel": (5, gates * 5), "bias": bias}
    expected = ({f"{d}/{k}": v for d in ("forward", "backward") for k, v in local.items()}
                if bidirectional else local)
    assert layer.weight_shapes((9, 7)) == expected
    width = 10 if bidirectional else 5
    assert layer.output_shape((9, 7)) == ((9, width) if sequences else (width,))
    initial = layer.init_weights((9, 7), np.random.default_rng(0))
    assert {k: v.shape for k, v in initial.items()} == expected
    assert all(v.dtype == np.float32 for v in initial.values())


def test_lstm_initial_weights_are_keras_initializers():
    weights = LSTM(6).init_weights((4, 3), np.random.default_rng(0))
    recurrent = weights["recurrent_kernel"].astype(np.float64)
    np.testing.assert_allclose(recurrent @ recurrent.T, np.eye(6), atol=1e-6)  # orthogonal rows
    np.testing.assert_array_equal(weights["bias"], np.r_[np.zeros(6), np.ones(6), np.zeros(12)])
    limit = np.sqrt(6 / (3 + 24))
    assert np.abs(weights["kernel"]).max() <= limit


def test_bidirectional_backward_direction_reads_the_sequence_reversed():
    layer = Bidirectional(GRU(4, return_sequences=True))
    x, weights, _ = random_case(layer, (2, 5, 3), seed=3, dtype=np.float64)
    y, _ = layer.forward(x, weights, {})
    single = GRU(4, return_sequences=True)
    backward = {k[len("backward/"):]: v for k, v in weights.items() if k.startswith("backward/")}
    reversed_y, _ = single.forward(x[:, ::-1], backward, {})
    np.testing.assert_allclose(y[:, :, 4:], reversed_y[:, ::-1], rtol=1e-12, atol=1e-12)


def test_recurrent_layers_reject_inputs_without_a_time_axis():
    with pytest.raises(ValueError, match=r"LSTM expects sequences .* Received input_shape=\(12,\)"):
        LSTM(3).output_shape((12,))
    weights = GRU(3).init_weights((5, 2), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"GRU expects inputs of shape \(n, timesteps, 2\)"):
        GRU(3).forward(np.zeros((4, 5, 3), np.float32), weights, {})
    with pytest.raises(ValueError, match="units must be a positive int"):
        GRU(0)
    with pytest.raises(ValueError, match="return_sequences must be True or False"):
        LSTM(3, return_sequences=1)
    with pytest.raises(TypeError, match="Bidirectional wraps an LSTM or GRU layer"):
        Bidirectional(Dense(3))


def test_fast_float32_tanh_is_within_4e_7_of_tanh():
    x = np.linspace(-20, 20, 400_001, dtype=np.float32)
    out = np.empty_like(x)
    kernels.tanh_into(out, x)
    assert np.abs(out - np.tanh(x.astype(np.float64))).max() < 4e-7
    assert np.all(np.abs(out) <= 1)


def test_float64_kernels_use_exact_tanh():
    x = np.linspace(-5, 5, 1001)
    out = np.empty_like(x)
    kernels.tanh_into(out, x)
    np.testing.assert_allclose(out, np.tanh(x), rtol=1e-15, atol=1e-15)


# -- the peers, in a child process ---------------------------------------------------------------
def _keras_results(cases):
    import keras
    import tensorflow as tf
    results = []
    for case in cases:
        cls = keras.layers.LSTM if case["kind"] == "LSTM" else keras.layers.GRU
        layer = cls(case["units"], return_sequences=case["sequences"])
        names = ["kernel", "recurrent_kernel", "bias"]
        if case["bidirectional"]:
            layer = keras.layers.Bidirectional(layer)
            names = [f"{d}/{n}" for d in ("forward", "backward") for n in names]
        x = tf.constant(case["x"])
        layer(x)
        layer.set_weights([case["weights"][name] for name in names])
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            objective = tf.reduce_sum(y * case["dy"])
        dx, *grads = tape.gradient(objective, [x] + layer.trainable_weights)
        results.append(dict(y=y.numpy(), dx=dx.numpy(),
                            grads={n: g.numpy() for n, g in zip(names, grads)}))
    return results


def _torch_results(cases):
    import torch
    results = []
    for case in cases:
        units, weights, lstm = case["units"], case["weights"], case["kind"] == "LSTM"
        cls = torch.nn.LSTM if lstm else torch.nn.GRU
        module = cls(case["x"].shape[2], units, batch_first=True,
                     bidirectional=case["bidirectional"])
        # Keras GRU gates are (z, r, h), torch's (r, z, n); LSTM orders agree (i, f, c/g, o).
        order = np.arange(4 * units) if lstm else np.r_[units:2 * units, 0:units,
                                                       2 * units:3 * units]
        directions = [("forward/", ""), ("backward/", "_reverse")] if case["bidirectional"] \
            else [("", "")]
        with torch.no_grad():
            for prefix, suffix in directions:
                kernel, bias = weights[prefix + "kernel"], weights[prefix + "bias"]
                getattr(module, f"weight_ih_l0{suffix}").copy_(torch.from_numpy(kernel.T[order]))
                getattr(module, f"weight_hh_l0{suffix}").copy_(
                    torch.from_numpy(weights[prefix + "recurrent_kernel"].T[order]))
                input_bias = bias if lstm else bias[0]
                recurrent_bias = np.zeros_like(bias) if lstm else bias[1]
                getattr(module, f"bias_ih_l0{suffix}").copy_(torch.from_numpy(input_bias[order]))
                getattr(module, f"bias_hh_l0{suffix}").copy_(
                    torch.from_numpy(recurrent_bias[order]))
        x = torch.from_numpy(case["x"]).requires_grad_(True)
        y, _ = module(x)
        if not case["sequences"]:  # Keras: the forward's last state, the backward's first
            y = y[:, -1] if not case["bidirectional"] else torch.cat(
                [y[:, -1, :units], y[:, 0, units:]], dim=1)
        (y * torch.from_numpy(case["dy"])).sum().backward()
        grads = {}
        inverse = np.argsort(order)
        for prefix, suffix in directions:
            grad = lambda name: getattr(module, f"{name}_l0{suffix}").grad.numpy()[inverse]  # noqa
            grads[prefix + "kernel"] = grad("weight_ih").T
            grads[prefix + "recurrent_kernel"] = grad("weight_hh").T
            # LSTM: the input and recurrent biases are one bias in Keras, so their gradient too.
            grads[prefix + "bias"] = grad("bias_ih") if lstm else np.stack(
                [grad("bias_ih"), grad("bias_hh")])
        results.append(dict(y=y.detach().numpy(), dx=x.grad.numpy(), grads=grads))
    return results


if __name__ == "__main__":
    framework, source, target = sys.argv[1:4]
    with open(source, "rb") as f:
        peer_input = pickle.load(f)
    output = (_keras_results if framework == "keras" else _torch_results)(peer_input)
    with open(target, "wb") as f:
        pickle.dump(output, f)
