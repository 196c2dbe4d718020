"""KerasModel in the engine: plain data in the owner, TensorFlow in forked workers, the same maths
as Keras. Oracles: Keras itself (train_on_batch, load_model, per-shard forward passes, a real
two-replica MirroredStrategy run), computed in one child process by ``keras_oracle.py``, and the
engine's NumPy losses.

Float32 tolerance: two shards' gradients are summed in another order than one pass over the whole
batch, so gradients agree to about 1e-6 relative; after one SGD step with learning rate 0.5 the
weights agree to rtol=1e-4, atol=1e-6, and the losses to rel=1e-5.

Cost: every process that runs a Keras model imports TensorFlow (seconds), so each module fixture
below starts one worker pool or one oracle process and several tests read its results.
"""
import functools
import pickle
import sys

import numpy as np
import pytest

from engine import ParallelBatchProcessor
from engine.backends import KerasModel
from keras_oracle import conv_lstm, run_oracle
from models.keras_zoo import get_keras_model

RTOL, ATOL = 1e-4, 1e-6
# Small versions of the three zoo models: (builder arguments, example shape, classes).
ZOO = {
    "imu_cnn_bilstm": (dict(timesteps=16), (16, 13), 26),
    "lstm_attention": (dict(timesteps=6, features=10, units=8), (6, 10), 2),
    "cnn_bilstm_attention": (dict(timesteps=8, features=12, num_classes=5, lstm_units=8,
                                  gru_units=8, heads=2, key_dim=4), (8, 12), 5),
}
MIRRORED = dict(batch_size=16, learning_rate=0.05, seed=3, optimizer="sgd", epochs=2)


def _sequences(rows, timesteps, channels, classes, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(rows, timesteps, channels)).astype(np.float32),
            rng.integers(0, classes, rows))


@pytest.fixture(scope="module")
def conv_lstm_model():
    return KerasModel(functools.partial(conv_lstm))


@pytest.fixture(scope="module")
def small_imu():
    """The IMU model (BatchNorm included) on 16 timesteps, without dropout."""
    return get_keras_model("imu_cnn_bilstm", timesteps=16, dropout=0.0)


@pytest.fixture(scope="module")
def imu_inputs(small_imu):
    """Everything the IMU tests feed to both the engine and the oracle."""
    rng = np.random.default_rng(2)
    state = small_imu.init_state(0)
    exported = state.copy()  # a state unlike the initial one, BatchNorm statistics included
    exported.buffer[:state.num_trainable] += 0.05 * rng.normal(size=state.num_trainable)
    exported.theta["conv1_bn/moving_mean"][...] = rng.normal(size=64)
    exported.theta["conv1_bn/moving_variance"][...] = rng.uniform(0.5, 2.0, size=64)
    return dict(state=state, exported=exported, bn_data=_sequences(11, 16, 13, 26, seed=1),
                mirrored_data=_sequences(48, 16, 13, 26, seed=7),
                predict_x=_sequences(9, 16, 13, 26, seed=3)[0])


@pytest.fixture(scope="module")
def keras_answers(small_imu, imu_inputs, tmp_path_factory):
    """Keras' answers for every test of this module, from one oracle process (one TF import)."""
    directory = str(tmp_path_factory.mktemp("keras_oracle"))
    path = small_imu.save_keras(imu_inputs["exported"], f"{directory}/imu.keras")
    x, y = imu_inputs["bn_data"]
    small_x, small_y = _sequences(24, 1, 6, 3, seed=4)
    requests = [
        ("mirrored", (small_imu, imu_inputs["state"], *imu_inputs["mirrored_data"]), MIRRORED),
        ("train_on_batch", (functools.partial(conv_lstm), *_equivalence_inputs(), 0.5), {}),
        ("shard_statistics", (small_imu.builder, imu_inputs["state"], [x[:6], x[6:]]), {}),
        ("predict_loaded", (path, imu_inputs["predict_x"], small_imu, imu_inputs["exported"]), {}),
        ("in_process_checks", (small_x[:, 0], small_y), {}),
        ("zoo", (ZOO, directory), {}),
    ]
    answers = run_oracle(directory, "batch", requests)
    return dict(zip([request[0] for request in requests], answers), exported_path=path)


def _equivalence_inputs():
    model = KerasModel(functools.partial(conv_lstm))
    x, y = _sequences(13, 12, 5, 4)  # 7 + 6 examples: uneven shards
    return model.init_state(0), x, y


@pytest.fixture(scope="module")
def imu_engine_runs(small_imu, imu_inputs):
    """One 2-process pool for the IMU tests: a step with learning rate 0 (BatchNorm statistics),
    an evaluation, then the epochs the MirroredStrategy run repeats (plain SGD keeps no optimizer
    state, and process_batch does not draw from the shuffling stream, so the first two calls leave
    nothing behind for the epochs)."""
    state = imu_inputs["state"]
    x, y = imu_inputs["bn_data"]
    losses = []
    with ParallelBatchProcessor(small_imu, num_processes=2, batch_size=MIRRORED["batch_size"],
                                optimizer=MIRRORED["optimizer"], seed=MIRRORED["seed"]) as proc:
        bn_state, _ = proc.process_batch(x, y, state, {"learning_rate": 0.0})
        _, evaluation = proc.process_batch(x, y, bn_state, {"update_weights": False})
        x, y = imu_inputs["mirrored_data"]
        mirrored_state = state
        for _ in range(MIRRORED["epochs"]):
            mirrored_state, results = proc.run_parallel(
                x, y, mirrored_state, {"learning_rate": MIRRORED["learning_rate"]})
            losses.append(results["loss"])
        _, final = proc.run_parallel(x, y, mirrored_state, {"update_weights": False})
    return dict(bn_state=bn_state, evaluation=evaluation, losses=np.concatenate(losses),
                mirrored_state=mirrored_state, predictions=final["predictions"])


def test_keras_model_is_plain_data_and_the_owner_never_loads_tensorflow(conv_lstm_model):
    model = conv_lstm_model
    state = model.init_state(0)
    assert "tensorflow" not in sys.modules
    assert model.input_shape == (12, 5) and model.num_outputs == 4
    assert {"conv/kernel", "lstm/lstm_cell/kernel", "classes/kernel"} <= set(state.weights)
    assert model.init_state(0).allclose(state, rtol=0, atol=0)
    blob = pickle.dumps(model)
    assert len(blob) < 20_000  # names, shapes and a builder reference: no weights, no TF objects
    assert pickle.loads(blob).spec().layout == state.layout


def test_gradient_step_on_two_processes_equals_train_on_batch(conv_lstm_model, keras_answers):
    state, x, y = _equivalence_inputs()
    with ParallelBatchProcessor(conv_lstm_model, num_processes=2, batch_size=13,
                                optimizer="sgd") as proc:
        assert proc.start_method == "fork"  # the owner is TensorFlow-free
        new_state, results = proc.process_batch(x, y, state, {"learning_rate": 0.5})
    loss, expected = keras_answers["train_on_batch"]
    assert np.abs(new_state.buffer - state.buffer).max() > 1e-3  # the step moved the weights
    assert results["loss"] == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(new_state.buffer, expected.buffer, rtol=RTOL, atol=ATOL)


def test_batchnorm_statistics_are_the_shard_weighted_mean(imu_engine_runs, imu_inputs,
                                                          keras_answers):
    new_state, state = imu_engine_runs["bn_state"], imu_inputs["state"]
    first, second = keras_answers["shard_statistics"]  # shards of 6 and 5 examples
    assert set(new_state.theta) == {"conv1_bn/moving_mean", "conv1_bn/moving_variance"}
    for name, value in new_state.theta.items():
        np.testing.assert_allclose(value, (6 * first[name] + 5 * second[name]) / 11, rtol=1e-5,
                                   atol=1e-6)
        assert not np.allclose(first[name], second[name])  # the shards did differ
    np.testing.assert_array_equal(new_state.buffer[:state.num_trainable],
                                  state.buffer[:state.num_trainable])  # learning rate 0
    predictions = imu_engine_runs["evaluation"]["predictions"]
    assert predictions.shape == (11, 26)
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, rtol=1e-5)


def test_mirrored_strategy_on_two_logical_cpus_matches_the_engine_on_two_processes(
        imu_engine_runs, keras_answers):
    losses, state, predictions, replicas = keras_answers["mirrored"]
    assert replicas == 2
    # Same shuffling, same shards, BatchNorm statistics averaged at every step on both paths.
    np.testing.assert_allclose(losses, imu_engine_runs["losses"], rtol=1e-4)
    np.testing.assert_allclose(state.buffer, imu_engine_runs["mirrored_state"].buffer, rtol=RTOL,
                               atol=1e-5)
    np.testing.assert_allclose(predictions, imu_engine_runs["predictions"], rtol=1e-4, atol=1e-6)


def test_exported_keras_file_loads_and_predicts_like_the_state(small_imu, imu_inputs,
                                                              keras_answers, tmp_path):
    assert "tensorflow" not in sys.modules  # save_keras ran in a helper process
    loaded, expected = keras_answers["predict_loaded"]
    np.testing.assert_allclose(loaded, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\.keras"):
        small_imu.save_keras(imu_inputs["exported"], tmp_path / "imu.h5")


def test_dropout_draws_one_reproducible_stream_per_worker(keras_answers):
    same, again, other_worker = keras_answers["in_process_checks"]["dropout_losses"]
    assert same == again
    assert same != other_worker


def test_engine_losses_match_their_numpy_twins_on_softmax_logits_and_sigmoid_heads(keras_answers):
    results = keras_answers["in_process_checks"]
    for keras_side, numpy_side in results["losses"]:  # focal + smoothing + weights; smoothing
        assert keras_side == pytest.approx(numpy_side, rel=1e-5)
    probabilities = results["binary_probabilities"]
    assert probabilities.shape == (24, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    for keras_side, numpy_side in (results["binary_keras_loss"], results["binary_focal"]):
        assert keras_side == pytest.approx(numpy_side, rel=1e-5)


def test_unrolled_recurrent_layers_give_the_same_loss_and_gradients(keras_answers):
    (loss, grads), (unrolled_loss, unrolled_grads) = keras_answers["in_process_checks"]["unrolled"]
    assert unrolled_loss == pytest.approx(loss, rel=1e-5)
    for name, grad in grads.items():
        np.testing.assert_allclose(unrolled_grads[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_trains_exports_and_reloads(name, keras_answers):
    result = keras_answers["zoo"][name]
    losses = result["losses"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    classes = ZOO[name][2]
    assert result["predictions"].shape == (48, classes)
    np.testing.assert_allclose(result["predictions"].sum(axis=1), 1.0, rtol=1e-5)
    reloaded = result["reloaded"]
    if reloaded.shape[1] == 1:  # a sigmoid head: the engine sees [1 - p, p]
        reloaded = np.concatenate([1 - reloaded, reloaded], axis=1)
    np.testing.assert_allclose(reloaded, result["predictions"], rtol=1e-4, atol=1e-6)


def test_imu_model_has_about_0_7_million_parameters(keras_answers):
    assert 650_000 < keras_answers["zoo"]["imu_cnn_bilstm"]["parameters"] < 800_000


@pytest.mark.slow
def test_keras_model_object_trains_in_spawned_workers_like_train_on_batch(oracle):
    x, y = _sequences(10, 12, 5, 4, seed=6)
    result = oracle("keras_object_on_two_processes", x, y, 0.5)
    assert result["start_method"] == "spawn"  # TensorFlow was loaded in that owner
    assert result["loss"][0] == pytest.approx(result["loss"][1], rel=1e-5)
    np.testing.assert_allclose(result["state"].buffer, result["expected"].buffer, rtol=RTOL,
                               atol=ATOL)


def test_bad_arguments_say_what_was_received():
    with pytest.raises(TypeError, match="zero-argument function"):
        KerasModel(42)
    with pytest.raises(ValueError, match="keras:imu_cnn_bilstm"):
        get_keras_model("keras:resnet")
    with pytest.raises(TypeError, match=r"imu_cnn_bilstm\(\*, timesteps"):
        get_keras_model("imu_cnn_bilstm", units=3)
    with pytest.raises(TypeError, match="models.losses"):
        KerasModel(functools.partial(conv_lstm), loss_fn="focal")
    from models.losses import FocalLoss
    with pytest.raises(ValueError, match="balanced"):
        KerasModel(functools.partial(conv_lstm), loss_fn=FocalLoss(class_weight="balanced"))


def test_a_failing_builder_raises_here_with_its_message():
    model = get_keras_model("lstm_attention", num_classes=3)  # a sigmoid head needs 2 classes
    with pytest.raises(ValueError, match="sigmoid head is binary"):
        model.init_state(0)
