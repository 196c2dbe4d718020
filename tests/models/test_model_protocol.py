"""Every model against the protocol the engine relies on (see the docstring of models/__init__.py)."""
import pickle

import numpy as np
import pytest

import models.sequential
from models import CNN1D, MLP, SoftmaxRegression

# Small versions of each model, so finite differences over every weight stay fast.
SMALL_MODELS = {
    "softmax_regression": lambda: SoftmaxRegression(input_dim=5, num_classes=3),
    "mlp": lambda: MLP(sizes=(5, 6, 4, 3)),
    "mlp_batchnorm_dropout": lambda: MLP(sizes=(5, 6, 4, 3), dropout=0.3, batchnorm=True),
    "cnn1d": lambda: CNN1D(input_shape=(12,), num_classes=3, channels=3),
    "cnn1d_batchnorm_two_channels": lambda: CNN1D(input_shape=(12, 2), num_classes=3, channels=3,
                                                  batchnorm=True),
}
DETERMINISTIC = ["softmax_regression", "mlp", "cnn1d", "cnn1d_batchnorm_two_channels"]


@pytest.fixture(params=list(SMALL_MODELS))
def model_name(request):
    return request.param


def make_batch(model, n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + model.input_shape).astype(np.float32)
    return x, rng.integers(0, model.num_outputs, n)


def as_float64(arrays):
    return {name: np.array(value, dtype=np.float64) for name, value in arrays.items()}


def test_gradients_match_finite_differences_in_float64(model_name, finite_difference):
    model = SMALL_MODELS[model_name]()
    state = model.init_state(seed=1)
    x, y = make_batch(model)
    weights, theta, x64 = as_float64(state.weights), as_float64(state.theta), x.astype(np.float64)
    # Zero biases put a ReLU input exactly on its kink wherever a whole receptive field is zero;
    # finite differences straddle the kink there, so move every weight off its initial value.
    noise = np.random.default_rng(2)
    for array in weights.values():
        array += 0.1 * noise.standard_normal(array.shape)

    def loss():  # a fresh generator per call: Dropout draws the same mask every time
        return model.forward_backward(weights, theta, x64, y, rng=np.random.default_rng(7))[0]

    _, grads, _ = model.forward_backward(weights, theta, x64, y, rng=np.random.default_rng(7))
    for name, array in weights.items():
        # Tolerance of central differences in float64 with step 1e-6 (see conftest.py).
        np.testing.assert_allclose(grads[name], finite_difference(loss, array), rtol=1e-6,
                                   atol=1e-8, err_msg=name)


@pytest.mark.parametrize("model_name", DETERMINISTIC)
def test_float32_loss_and_grads_match_the_float64_computation(model_name):
    model = SMALL_MODELS[model_name]()
    state = model.init_state(seed=1)
    x, y = make_batch(model)
    loss, grads = model.loss_and_grads(state, x, y)[:2]
    loss64, grads64, _ = model.forward_backward(as_float64(state.weights),
                                                as_float64(state.theta), x.astype(np.float64), y)
    assert isinstance(loss, float) and loss == pytest.approx(loss64, rel=1e-5)
    assert list(grads) == list(state.weights)
    # float32 rounding (eps 6e-8) accumulated over a few layers: within 1e-3 relative, or 1e-4 of
    # the largest gradient entry (a bias before BatchNorm has a true gradient of 0, float32 ~1e-8).
    scale = max(np.abs(g).max() for g in grads64.values())
    for name, grad in grads.items():
        assert grad.dtype == np.float32 and grad.shape == state.weights[name].shape
        np.testing.assert_allclose(grad, grads64[name], rtol=1e-3, atol=1e-4 * scale, err_msg=name)


def test_init_state_is_deterministic_per_seed_and_float32(model_name):
    model = SMALL_MODELS[model_name]()
    first, again, other = model.init_state(seed=3), model.init_state(seed=3), model.init_state(4)
    np.testing.assert_array_equal(first.buffer, again.buffer)
    assert not np.array_equal(first.buffer, other.buffer)
    assert first.buffer.dtype == np.float32
    assert {k: v.shape for k, v in first.weights.items()} == model.weight_shapes
    assert first.num_trainable == model.num_weights


def test_predict_returns_float32_probabilities_whose_rows_sum_to_one(model_name):
    model = SMALL_MODELS[model_name]()
    state = model.init_state(seed=0)
    x, y = make_batch(model, n=9)
    probabilities = model.predict(state, x)
    assert probabilities.shape == (9, model.num_outputs) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-6)
    # loss() is the cross-entropy of exactly these inference-mode probabilities.
    expected = -np.mean(np.log(probabilities[np.arange(9), y].astype(np.float64)))
    assert model.loss(state, x, y) == pytest.approx(expected, rel=1e-5)


def test_evaluation_in_chunks_matches_one_pass(model_name, monkeypatch):
    model = SMALL_MODELS[model_name]()
    state = model.init_state(seed=0)
    x, y = make_batch(model, n=10)
    probabilities, loss = model.predict(state, x), model.loss(state, x, y)
    monkeypatch.setattr(models.sequential, "_EVAL_CHUNK", 3)  # 10 rows: chunks of 3, 3, 3, 1
    np.testing.assert_allclose(model.predict(state, x), probabilities, rtol=1e-6)
    assert model.loss(state, x, y) == pytest.approx(loss, rel=1e-6)


def test_loss_and_grads_predict_and_loss_leave_the_state_unchanged(model_name):
    model = SMALL_MODELS[model_name]()
    state = model.init_state(seed=0)
    before = state.buffer.copy()
    x, y = make_batch(model)
    model.loss_and_grads(state, x, y, rng=np.random.default_rng(0))
    model.predict(state, x)
    model.loss(state, x, y)
    np.testing.assert_array_equal(state.buffer, before)


def test_models_with_batchnorm_return_theta_and_the_others_do_not(model_name):
    model = SMALL_MODELS[model_name]()
    state = model.init_state(seed=0)
    result = model.loss_and_grads(state, *make_batch(model))
    if state.theta:
        assert len(result) == 3 and list(result[2]) == list(state.theta)
        assert all(result[2][k].shape == v.shape for k, v in state.theta.items())
    else:
        assert len(result) == 2


def test_batchnorm_theta_moves_running_statistics_towards_the_batch_statistics():
    model = MLP(sizes=(5, 6, 3), batchnorm=True)
    state = model.init_state(seed=0)
    state.theta["batchnorm_1/running_mean"][...] = 0.5
    x, y = make_batch(model, n=16)
    _, _, theta = model.loss_and_grads(state, x, y)
    # Oracle: BatchNorm's input is the first Dense layer's output; momentum 0.9.
    hidden = x.astype(np.float64) @ state.weights["dense_0/kernel"] + state.weights["dense_0/bias"]
    np.testing.assert_allclose(theta["batchnorm_1/running_mean"],
                               0.9 * 0.5 + 0.1 * hidden.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(theta["batchnorm_1/running_var"], 0.9 + 0.1 * hidden.var(axis=0),
                               rtol=1e-5)
    assert all(value.dtype == np.float32 for value in theta.values())


def test_dropout_follows_the_given_rng_and_is_off_in_inference():
    model = MLP(sizes=(5, 16, 3), dropout=0.5)
    state = model.init_state(seed=0)
    x, y = make_batch(model)
    same = [model.loss_and_grads(state, x, y, rng=np.random.default_rng(1))[0] for _ in range(2)]
    other = model.loss_and_grads(state, x, y, rng=np.random.default_rng(2))[0]
    assert same[0] == same[1] != other
    np.testing.assert_array_equal(model.predict(state, x), model.predict(state, x))


def test_gradient_of_the_mean_loss_is_the_size_weighted_mean_of_shard_gradients():
    # The engine splits a batch over workers; this is what makes that exact.
    model = MLP(sizes=(5, 6, 3))
    state = model.init_state(seed=0)
    x, y = make_batch(model, n=10)
    loss, grads = model.loss_and_grads(state, x, y)
    shards = [model.loss_and_grads(state, x[:3], y[:3]), model.loss_and_grads(state, x[3:], y[3:])]
    assert loss == pytest.approx(0.3 * shards[0][0] + 0.7 * shards[1][0], rel=1e-6)
    for name in grads:
        np.testing.assert_allclose(grads[name], 0.3 * shards[0][1][name] + 0.7 * shards[1][1][name],
                                   rtol=1e-5, atol=1e-7)


def test_pickle_round_trip_keeps_the_model(model_name):
    model = SMALL_MODELS[model_name]()
    copy = pickle.loads(pickle.dumps(model))
    assert repr(copy) == repr(model)
    state = model.init_state(seed=0)
    np.testing.assert_array_equal(copy.init_state(seed=0).buffer, state.buffer)
    x, _ = make_batch(model)
    np.testing.assert_array_equal(copy.predict(state, x), model.predict(state, x))


def test_cnn1d_default_is_mnist1d_convbase_with_5210_weights():
    model = CNN1D()
    state = model.init_state(seed=0)
    assert model.input_shape == (40,) and model.num_outputs == 10
    assert state.num_trainable == model.num_weights == 5210
    kernels = [shape for name, shape in model.weight_shapes.items() if name.endswith("/kernel")]
    assert kernels == [(5, 1, 25), (3, 25, 25), (3, 25, 25), (125, 10)]


def test_parameter_names_are_kind_and_position_in_the_layer_list():
    model = MLP(sizes=(4, 3, 2), batchnorm=True)
    assert list(model.weight_shapes) == ["dense_0/kernel", "dense_0/bias", "batchnorm_1/gamma",
                                         "batchnorm_1/beta", "dense_3/kernel", "dense_3/bias"]
    assert list(model.theta_shapes) == ["batchnorm_1/running_mean", "batchnorm_1/running_var"]


def test_inputs_of_the_wrong_shape_or_labels_of_the_wrong_kind_are_rejected():
    model = MLP(sizes=(5, 4, 3))
    state = model.init_state(seed=0)
    x, y = make_batch(model)
    with pytest.raises(ValueError, match=r"x must have shape \(n, 5\).*\(8, 6\)"):
        model.loss_and_grads(state, np.zeros((8, 6), np.float32), y)
    with pytest.raises(ValueError, match="integer class labels.*float64"):
        model.loss_and_grads(state, x, y.astype(np.float64))
    with pytest.raises(ValueError, match="integer class labels.*argmax"):
        model.loss(state, x, np.eye(3)[y].astype(np.int64))
    with pytest.raises(ValueError, match="class indices"):
        model.loss_and_grads(state, x, y + 3)
    with pytest.raises(ValueError, match="at least one example"):
        model.loss(state, x[:0], y[:0])
