"""models.from_keras / to_keras against Keras itself: forward passes, one SGD step, the .keras
export, and the native zoo's architecture (weight names and shapes) against its keras: twin.

Keras runs in a child process (keras_interop_oracle.py): this process stays free of TensorFlow.
"""
import functools
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import models
from engine.backends import tensorflow_available
from keras_interop_oracle import run_oracle

pytestmark = [pytest.mark.tf, pytest.mark.skipif(not tensorflow_available(),
                                                 reason="TensorFlow is not installed")]

ZOO = [("imu_cnn_bilstm", dict(timesteps=24, channels=6, num_classes=4)),
       ("lstm_attention", dict(timesteps=9, features=12)),
       ("lstm_attention", dict(timesteps=9, features=12, head="softmax", num_classes=3)),
       ("cnn_bilstm_attention", dict(timesteps=10, features=7, num_classes=5))]
ZOO_IDS = ["imu_cnn_bilstm", "lstm_attention_sigmoid", "lstm_attention_softmax",
           "cnn_bilstm_attention"]
FORWARD_ATOL = 1e-5  # the bar: float32, absolute, on probabilities


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return functools.partial(run_oracle, str(tmp_path_factory.mktemp("keras_interop")))


@pytest.fixture(scope="module")
def zoo_results(oracle):
    return oracle("zoo", ZOO)


@pytest.mark.parametrize("case", range(len(ZOO)), ids=ZOO_IDS)
def test_native_forward_of_the_zoo_equals_keras_predict(zoo_results, case):
    result = zoo_results[case]
    native = result["model"].predict(result["state"], result["x"])
    np.testing.assert_allclose(native, result["keras"], rtol=0, atol=FORWARD_ATOL)


@pytest.mark.parametrize("case", range(len(ZOO)), ids=ZOO_IDS)
def test_to_keras_export_saved_and_reloaded_predicts_as_the_native_model(zoo_results, case):
    result = zoo_results[case]
    native = result["model"].predict(result["state"], result["x"])
    np.testing.assert_allclose(result["exported"], native, rtol=0, atol=FORWARD_ATOL)


@pytest.mark.parametrize("case", range(len(ZOO)), ids=ZOO_IDS)
def test_native_zoo_model_has_the_weights_of_its_keras_twin(zoo_results, case):
    name, kwargs = ZOO[case]
    native = models.get_model(name, **kwargs)
    imported = zoo_results[case]["model"]
    assert native.weight_shapes == imported.weight_shapes
    assert native.theta_shapes == imported.theta_shapes
    assert native.num_weights + sum(np.prod(s) for s in native.theta_shapes.values()) == \
        zoo_results[case]["keras_parameters"]


def test_native_forward_equals_keras_predict_on_random_stacks(oracle):
    for result in oracle("stacks", 12, seed=0):
        native = result["model"].predict(result["state"], result["x"])
        np.testing.assert_allclose(native, result["keras"], rtol=0, atol=FORWARD_ATOL,
                                   err_msg=" -> ".join(result["summary"]))


def test_keras_sequential_and_native_sequential_convert_both_ways(oracle):
    from models import Sequential
    from models.layers import BatchNorm, Conv1D, Dense, Flatten, MaxPool1D, ReLU
    native = Sequential([Conv1D(4, 3, padding=1), BatchNorm(), ReLU(), MaxPool1D(2), Flatten(),
                         Dense(3)], input_shape=(12, 3))
    state = native.init_state(seed=0)
    state.theta["batchnorm_1/running_mean"][...] = 0.3  # inference must use the statistics
    x = np.random.default_rng(0).standard_normal((4, 12, 3)).astype(np.float32)
    result = oracle("sequential", native, state, x)
    np.testing.assert_allclose(result["model"].predict(result["state"], x), result["keras"],
                               rtol=0, atol=FORWARD_ATOL)
    np.testing.assert_allclose(result["exported"], native.predict(state, x), rtol=0,
                               atol=FORWARD_ATOL)


# One SGD step: Keras computes in float32 with its own op order, so the weights after the step
# agree to float32 rounding of the gradient: |w_native - w_keras| <= 1e-6 + 1e-4 |w_keras|.
SGD_RTOL, SGD_ATOL, LEARNING_RATE = 1e-4, 1e-6, 0.1


@pytest.fixture(scope="module")
def sgd_results(oracle):
    # The same step needs the same (no) dropout masks.
    return oracle("sgd", [(name, dict(kwargs, dropout=0.0)) for name, kwargs in ZOO], LEARNING_RATE)


@pytest.mark.parametrize("case", range(len(ZOO)), ids=ZOO_IDS)
def test_one_sgd_step_equals_keras_train_on_batch(sgd_results, case):
    result = sgd_results[case]
    model, state = result["model"], result["state"]
    loss, grads, *theta = model.loss_and_grads(state, result["x"], result["y"])
    assert loss == pytest.approx(result["keras_loss"], rel=1e-5)
    after = result["keras_after"]
    for key, value in state.weights.items():
        np.testing.assert_allclose(value - LEARNING_RATE * grads[key], after.weights[key],
                                   rtol=SGD_RTOL, atol=SGD_ATOL, err_msg=key)
    for key, value in (theta[0] if theta else {}).items():
        np.testing.assert_allclose(value, after.theta[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_from_keras_names_the_first_unsupported_layer_and_its_class(oracle):
    messages = oracle("not_supported")
    expected = {"simple_rnn": "'simple_rnn' (SimpleRNN) is not supported natively: no native",
                "dilated": "'dilated' (Conv1D) is not supported natively: dilation",
                "dense_over_time": "'dense_over_time' (Dense) is not supported natively: Dense "
                                   "over sequences",
                "cross_attention": "'cross_attention' (MultiHeadAttention) is not supported "
                                   "natively: attention of one sequence over another",
                "tanh_lstm": "'tanh_lstm' (LSTM) is not supported natively:"}
    for name, start in expected.items():
        assert messages[name] is not None and start in messages[name], (name, messages[name])
        assert "engine.backends.KerasModel" in messages[name]  # what to do instead


@pytest.mark.slow
def test_train_export_keras_writes_a_model_keras_that_predicts_as_the_checkpoint(oracle, tmp_path):
    from engine.training.checkpoint import load_checkpoint
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 2
    features = (rng.standard_normal((60, 6, 3)) + labels[:, None, None]).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=features, y=labels)
    root = pathlib.Path(__file__).resolve().parents[2]
    completed = subprocess.run(
        [sys.executable, "-m", "engine", "train", "--data", str(tmp_path / "data.npz"), "--model",
         "lstm_attention", "--model-arg", "units=8", "--epochs", "1", "--batch-size", "16",
         "--workers", "1", "--output-dir", str(tmp_path / "run"), "--no-progress",
         "--export-keras"], capture_output=True, text=True, cwd=root, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    checkpoint = load_checkpoint(tmp_path / "run" / "model.h5")
    model = models.get_model("lstm_attention", **checkpoint.metadata["model_args"])
    exported = oracle("load_and_predict", str(tmp_path / "run" / "model.keras"), features)
    np.testing.assert_allclose(exported, model.predict(checkpoint.state, features), rtol=0,
                               atol=FORWARD_ATOL)
