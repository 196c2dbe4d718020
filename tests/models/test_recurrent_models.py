"""Models built on the recurrent layers: the MNIST-1D GRU classifier, and the native
imu_cnn_bilstm learning real IMU recordings (BasicMotions).

BasicMotions (4 students x 4 activities, a smartwatch's 3-D accelerometer and gyroscope at 10 Hz
for 10 s: 40 training and 40 test series of (100, 6), classes Standing, Running, Walking,
Badminton) is read from the .ts files that the ``aeon`` package ships; only the files are used,
aeon is never imported (it pins an older numba). Install them with
``pip install --no-deps aeon==1.6.0``; the test is skipped without them.
"""
import importlib.util
import os

import numpy as np
import pytest

import models
from models.gru import GRUClassifier


def test_gru_classifier_is_the_mnist1d_papers_gru():
    model = models.get_model("gru")
    assert isinstance(model, GRUClassifier)
    assert model.input_shape == (40,) and model.num_outputs == 10
    assert model.num_weights == 5_134  # 2 x (1x18 + 6x18 + 2x18) + 480 x 10 + 10
    one_way = GRUClassifier(input_shape=(12, 3), num_classes=4, units=5, bidirectional=False)
    assert one_way.num_weights == (3 * 15 + 5 * 15 + 2 * 15) + 12 * 5 * 4 + 4


def test_gru_classifier_gradients_match_finite_differences(finite_difference):
    model = GRUClassifier(input_shape=(5,), num_classes=3, units=2)
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape) for name, shape in model.weight_shapes.items()}
    x, y = rng.standard_normal((4, 5)), np.array([0, 2, 1, 2])
    _, grads, _ = model.forward_backward(weights, {}, x, y)
    for name, array in weights.items():
        numeric = finite_difference(lambda: model.forward_backward(weights, {}, x, y)[0], array)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_gru_classifier_rejects_bad_arguments():
    with pytest.raises(ValueError, match="input_shape must be"):
        GRUClassifier(input_shape=(4, 5, 6))
    with pytest.raises(ValueError, match="bidirectional must be True or False"):
        GRUClassifier(bidirectional="yes")


def _basic_motions_folder():
    spec = importlib.util.find_spec("aeon")
    if spec is None or spec.origin is None:
        return None
    folder = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "BasicMotions")
    return folder if os.path.exists(os.path.join(folder, "BasicMotions_TEST.ts")) else None


def read_ts(path):
    """A .ts file of equal-length multivariate series -> (x (n, length, channels), labels)."""
    series, labels, classes = [], [], None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.lower().startswith("@classlabel"):
                classes = line.split()[2:]
            if not line or line.startswith(("#", "@")):
                continue
            *channels, label = line.split(":")
            series.append(np.array([[float(v) for v in c.split(",")] for c in channels]).T)
            labels.append(classes.index(label))
    return np.stack(series).astype(np.float32), np.array(labels)


@pytest.mark.slow
@pytest.mark.skipif(_basic_motions_folder() is None,
                    reason="BasicMotions files missing: pip install --no-deps aeon==1.6.0")
def test_native_imu_cnn_bilstm_learns_real_imu_recordings():
    from engine import ParallelBatchProcessor
    folder = _basic_motions_folder()
    x_train, y_train = read_ts(os.path.join(folder, "BasicMotions_TRAIN.ts"))
    x_test, y_test = read_ts(os.path.join(folder, "BasicMotions_TEST.ts"))
    assert x_train.shape == x_test.shape == (40, 100, 6)
    # Per-channel standardization from the training series only.
    mean, std = x_train.mean(axis=(0, 1)), x_train.std(axis=(0, 1))
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    model = models.get_model("imu_cnn_bilstm", timesteps=100, channels=6, num_classes=4)
    state = model.init_state(seed=0)
    with ParallelBatchProcessor(model, num_processes=1, batch_size=8, optimizer="adam",
                                seed=0) as processor:
        # 16 epochs at 1e-3, then 8 at 1e-4 settle it: seeds 0 and 1 end at 40/40 (at 1e-3 alone
        # the test accuracy still swings between 0.78 and 1.0 from one epoch to the next).
        for epoch in range(24):
            state, _ = processor.run_parallel(x_train, y_train, state,
                                              {"learning_rate": 1e-3 if epoch < 16 else 1e-4})
    accuracy = float(np.mean(model.predict(state, x_test).argmax(axis=1) == y_test))
    # Published 1-NN DTW and deep baselines reach 97-100% on this split; chance is 25%.
    assert accuracy >= 0.9, f"test accuracy {accuracy:.3f} on 40 series"
