"""models.losses against hand computations, finite differences and the engine's sharding."""
import math
import pickle

import numpy as np
import pytest

from engine import ParallelBatchProcessor
from models import MLP, CrossEntropy, FocalLoss
from models.layers import softmax_cross_entropy
from models.losses import loss_from_config

LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
LABELS = np.array([0, 2])


def _log_softmax_by_hand(row):
    total = sum(math.exp(v) for v in row)
    return [v - math.log(total) for v in row]


def _central_difference(loss, logits, labels, step=1e-6):
    """d mean-loss / d logits in float64; truncation error ~ step**2 (see tests/models)."""
    grad = np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
        shifted = logits.copy()
        shifted[index] += step
        above = loss.value(shifted, labels)
        shifted[index] -= 2 * step
        grad[index] = (above - loss.value(shifted, labels)) / (2 * step)
    return grad


def test_default_cross_entropy_equals_the_models_softmax_cross_entropy():
    logits = np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32)
    labels = np.arange(9) % 4
    value, grad = CrossEntropy().value_and_grad(logits, labels)
    expected_value, expected_grad = softmax_cross_entropy(logits.copy(), labels)
    assert value == pytest.approx(expected_value, rel=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert grad.dtype == np.float32


def test_label_smoothing_matches_a_hand_computation():
    s, classes = 0.1, 3
    expected = 0.0
    for row, label in zip(LOGITS, LABELS):
        log_p = _log_softmax_by_hand(row)
        targets = [s / classes + (1 - s if c == label else 0.0) for c in range(classes)]
        expected += -sum(t * lp for t, lp in zip(targets, log_p))
    assert CrossEntropy(label_smoothing=s).value(LOGITS, LABELS) == pytest.approx(expected / 2,
                                                                                  rel=1e-12)


def test_focal_loss_matches_a_hand_computation_and_reduces_to_cross_entropy():
    gamma, alpha = 2.0, 0.25
    expected = 0.0
    for row, label in zip(LOGITS, LABELS):
        p = math.exp(_log_softmax_by_hand(row)[label])
        expected += -alpha * (1 - p) ** gamma * math.log(p)
    assert FocalLoss(gamma=gamma, alpha=alpha).value(LOGITS, LABELS) == pytest.approx(
        expected / 2, rel=1e-12)
    assert FocalLoss(gamma=0.0).value(LOGITS, LABELS) == pytest.approx(
        CrossEntropy().value(LOGITS, LABELS), rel=1e-12)


def test_focal_loss_with_per_class_alpha_weights_each_target_class():
    alpha = [0.5, 1.0, 3.0]
    expected = 0.0
    for row, label in zip(LOGITS, LABELS):
        p = math.exp(_log_softmax_by_hand(row)[label])
        expected += -alpha[label] * (1 - p) ** 1.5 * math.log(p)
    assert FocalLoss(gamma=1.5, alpha=alpha).value(LOGITS, LABELS) == pytest.approx(
        expected / 2, rel=1e-12)


def test_class_weights_scale_each_example_and_divide_by_the_number_of_examples():
    # Sum of weighted terms over n (not over the sum of weights): what lets shards combine.
    weights = [2.0, 1.0, 0.5]
    terms = [-_log_softmax_by_hand(row)[label] for row, label in zip(LOGITS, LABELS)]
    expected = (weights[0] * terms[0] + weights[2] * terms[1]) / 2
    assert CrossEntropy(class_weight=weights).value(LOGITS, LABELS) == pytest.approx(expected,
                                                                                      rel=1e-12)
    as_dict = CrossEntropy(class_weight={0: 2.0, 1: 1.0, 2: 0.5})
    assert as_dict.value(LOGITS, LABELS) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss", [
    CrossEntropy(label_smoothing=0.2, class_weight=[1.0, 3.0, 0.5, 2.0]),
    FocalLoss(gamma=2.0),
    FocalLoss(gamma=0.5, alpha=[0.2, 1.0, 2.0, 0.7], label_smoothing=0.1,
              class_weight=[1.0, 3.0, 0.5, 2.0]),
], ids=["ce_smoothing_weights", "focal", "focal_everything"])
def test_gradients_match_finite_differences_in_float64(loss):
    rng = np.random.default_rng(3)
    logits, labels = rng.standard_normal((6, 4)) * 2, np.array([0, 1, 2, 3, 1, 0])
    _, grad = loss.value_and_grad(logits, labels)
    np.testing.assert_allclose(grad, _central_difference(loss, logits, labels), rtol=1e-6,
                               atol=1e-8)


def test_focal_gradient_is_finite_when_a_probability_rounds_to_one():
    logits = np.array([[60.0, 0.0, 0.0], [0.0, 60.0, 0.0]], dtype=np.float32)
    value, grad = FocalLoss(gamma=0.5).value_and_grad(logits, np.array([0, 2]))
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_a_model_with_a_loss_trains_on_it_and_survives_pickling(blobs):
    x, y = blobs[0][:20], blobs[1][:20]
    base = MLP(sizes=(12, 8, 3))
    loss = FocalLoss(gamma=2.0, class_weight=[1.0, 2.0, 3.0])
    model = base.with_loss(loss)
    state = model.init_state(0)
    logits = model.logits(state.weights, state.theta, x)
    assert model.loss_and_grads(state, x, y)[0] == pytest.approx(loss.value(logits, y), rel=1e-6)
    assert model.loss(state, x, y) == pytest.approx(loss.value(logits, y), rel=1e-6)
    assert base.loss_fn is None  # with_loss copies; the original keeps cross-entropy
    assert pickle.loads(pickle.dumps(model)).loss_fn == loss


def test_weighted_focal_loss_gradient_sync_matches_one_process(blobs):
    # The engine averages shard gradients weighted by shard size: right only for a mean over
    # examples, which is why class weights divide by n.
    x, y = blobs[0][:50], blobs[1][:50]
    model = MLP(sizes=(12, 8, 3)).with_loss(
        FocalLoss(gamma=2.0, label_smoothing=0.1, class_weight=[0.5, 1.0, 4.0]))
    state = model.init_state(1)
    states = []
    for processes in (1, 2):
        with ParallelBatchProcessor(model, num_processes=processes, batch_size=50,
                                    optimizer="sgd") as processor:
            states.append(processor.process_batch(x, y, state, {"learning_rate": 0.5})[0])
    np.testing.assert_allclose(states[1].buffer, states[0].buffer, rtol=1e-4, atol=1e-6)


def test_configs_round_trip_and_unknown_kinds_are_refused():
    for loss in (CrossEntropy(label_smoothing=0.1, class_weight=[1, 2]),
                 FocalLoss(gamma=1.0, alpha=[0.5, 2.0], class_weight="balanced")):
        assert loss_from_config(loss.get_config()) == loss
    with pytest.raises(ValueError, match="unknown loss kind"):
        loss_from_config({"kind": "os.system"})


def test_bad_loss_options_fail_with_the_received_value():
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropy(label_smoothing=1.0)
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1)
    with pytest.raises(ValueError, match="class_weight"):
        CrossEntropy(class_weight=[1.0, -2.0])
    with pytest.raises(ValueError, match="3 classes"):
        CrossEntropy(class_weight=[1.0, 2.0]).value(LOGITS, LABELS)
    with pytest.raises(ValueError, match="resolved from the training labels"):
        CrossEntropy(class_weight="balanced").value(LOGITS, LABELS)
    with pytest.raises(TypeError, match="value_and_grad"):
        MLP(sizes=(4, 2)).with_loss("focal")
