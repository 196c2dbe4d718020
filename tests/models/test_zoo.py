"""The native zoo (models.zoo): the arguments of its keras: twins, gradients against finite
differences, training through the engine and the CLI with no TensorFlow in any process."""
import inspect
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import models
from models import keras_zoo, zoo

NAMES = ["imu_cnn_bilstm", "lstm_attention", "cnn_bilstm_attention"]
SMALL = {"imu_cnn_bilstm": dict(timesteps=14, channels=3, num_classes=3, dropout=0.2),
         "lstm_attention": dict(timesteps=5, features=3, units=4, attention_units=3, dropout=0.2),
         "cnn_bilstm_attention": dict(timesteps=5, features=3, num_classes=3, filters=(4,),
                                      lstm_units=3, heads=2, key_dim=2, gru_units=3, dropout=0.2)}


@pytest.mark.parametrize("name", NAMES)
def test_native_zoo_takes_the_arguments_of_its_keras_twin(name):
    assert inspect.signature(getattr(zoo, name)) == inspect.signature(getattr(keras_zoo, name))
    assert models.model_signature(name) == models.model_signature(f"keras:{name}")


def test_get_model_builds_the_reference_model_with_the_issue_arguments():
    model = models.get_model("imu_cnn_bilstm", timesteps=100, channels=6, num_classes=4)
    assert model.input_shape == (100, 6) and model.num_outputs == 4
    assert models.get_model("imu_cnn_bilstm", input_shape=(64, 13), num_classes=26).input_shape \
        == (64, 13)
    # 739,226 values in the Keras reference model: weights plus BatchNorm's moving statistics.
    reference = models.get_model("imu_cnn_bilstm")
    assert reference.num_weights + sum(np.prod(s) for s in reference.theta_shapes.values()) == \
        739_226


def test_zoo_arguments_are_checked_with_the_received_value():
    with pytest.raises(ValueError, match="needs num_classes=2. Received: num_classes=3"):
        models.get_model("lstm_attention", num_classes=3)
    with pytest.raises(ValueError, match="head must be"):
        models.get_model("lstm_attention", head="tanh")
    with pytest.raises(ValueError, match=r"input_shape must be \(timesteps, features\)"):
        models.get_model("cnn_bilstm_attention", input_shape=(10,))
    with pytest.raises(ValueError, match="learning_rate"):
        models.get_model("imu_cnn_bilstm", learning_rate=0)


def _sampled_finite_differences(model, weights, theta, x, y, grads, *, samples=6, step=1e-6):
    """Central differences on a few random entries of every weight (the models have ~0.3M)."""
    rng = np.random.default_rng(5)

    def loss():
        return model.forward_backward(weights, theta, x, y, rng=np.random.default_rng(11))[0]

    for name, array in weights.items():
        for flat in rng.choice(array.size, size=min(samples, array.size), replace=False):
            index = np.unravel_index(flat, array.shape)
            original = array[index]
            array[index] = original + step
            above = loss()
            array[index] = original - step
            below = loss()
            array[index] = original
            np.testing.assert_allclose(grads[name][index], (above - below) / (2 * step),
                                       rtol=1e-5, atol=1e-8, err_msg=f"{name}{index}")


@pytest.mark.parametrize("name", NAMES)
def test_zoo_gradients_match_finite_differences_in_float64(name):
    model = models.get_model(name, **SMALL[name])
    state = model.init_state(seed=0)
    rng = np.random.default_rng(1)
    weights = {k: v.astype(np.float64) + 0.05 * rng.standard_normal(v.shape)
               for k, v in state.weights.items()}
    theta = {k: v.astype(np.float64) for k, v in state.theta.items()}
    x = rng.standard_normal((4,) + model.input_shape)
    y = rng.integers(0, model.num_outputs, 4)
    _, grads, _ = model.forward_backward(weights, theta, x, y, rng=np.random.default_rng(11))
    _sampled_finite_differences(model, weights, theta, x, y, grads)


def test_two_processes_step_equals_one_process_on_the_whole_batch():
    # lstm_attention has no BatchNorm (which normalises each shard with its own statistics), so
    # the README's gradients-mode contract holds: equal to float32 rounding (rtol 1e-4).
    from engine import ParallelBatchProcessor
    model = models.get_model("lstm_attention", **dict(SMALL["lstm_attention"], dropout=0.0))
    state = model.init_state(seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24,) + model.input_shape).astype(np.float32)
    y = rng.integers(0, 2, 24)
    results = []
    for processes in (1, 2):
        with ParallelBatchProcessor(model, num_processes=processes, batch_size=24) as processor:
            new, _ = processor.process_batch(x, y, state, params={"learning_rate": 0.1})
        results.append(new)
    assert not np.array_equal(results[0].buffer, state.buffer)
    np.testing.assert_allclose(results[1].buffer, results[0].buffer, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_cli_trains_imu_cnn_bilstm_on_two_workers_without_importing_tensorflow(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(96) % 3
    features = (rng.standard_normal((96, 20, 4)) + labels[:, None, None]).astype(np.float32)
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "features.npy", features)
    np.save(data / "labels.npy", labels)
    # Stand-ins that record any import of TensorFlow or Keras, in the CLI or in a worker.
    marker = tmp_path / "tensorflow_imported"
    for package in ("tensorflow", "keras"):
        (tmp_path / "fake" / package).mkdir(parents=True)
        (tmp_path / "fake" / package / "__init__.py").write_text(
            "import os, pathlib\n"
            "pathlib.Path(os.environ['TF_MARKER']).write_text(str(os.getpid()))\n"
            "raise ImportError('TensorFlow must not be imported by a native model')\n")
    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, TF_MARKER=str(marker), PYTHONPATH=f"{tmp_path / 'fake'}:{root}")
    completed = subprocess.run(
        [sys.executable, "-m", "engine", "train", "--data", str(data), "--model", "imu_cnn_bilstm",
         "--epochs", "2", "--batch-size", "32", "--workers", "2", "--output-dir",
         str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True, env=env,
        cwd=root, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "imu_cnn_bilstm" in completed.stdout and "2 processes" in completed.stdout
    assert not marker.exists(), f"TensorFlow was imported by process {marker.read_text()}"
    assert (tmp_path / "run" / "model.h5").exists()
