"""fit/evaluate: a thin layer over ParallelBatchProcessor, checked against driving it by hand."""
import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from engine import ParallelBatchProcessor
from engine.training.callbacks import EarlyStopping
from engine.training.datasets import DataError
from engine.training.schedules import StepDecay
from engine.training.trainer import Trainer, evaluate, fit
from models import MLP, FocalLoss


def test_fit_is_run_parallel_once_per_epoch_with_the_schedules_rate_and_clipping(blobs):
    x, y = blobs
    model = MLP(sizes=(12, 16, 3))
    schedule = StepDecay(0.05, step_epochs=1, factor=0.5)
    history = fit(model, x, y, epochs=3, batch_size=64, num_processes=2, optimizer="sgd",
                  schedule=schedule, clip_norm=0.5, seed=4, verbose=False)
    state = model.init_state(4)
    with ParallelBatchProcessor(model, num_processes=2, batch_size=64, optimizer="sgd",
                                seed=4) as processor:
        for epoch in range(3):
            state, results = processor.run_parallel(x, y, state, {
                "learning_rate": schedule(epoch), "clip_norm": 0.5})
    np.testing.assert_array_equal(history.state.buffer, state.buffer)
    assert history.history["learning_rate"] == [0.05, 0.025, 0.0125]
    assert history.history["loss"][-1] == pytest.approx(results["mean_loss"], rel=1e-12)


def test_history_holds_metrics_and_the_engines_timing_per_epoch(blobs, quiet_fit):
    history = fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=2, validation_split=0.25, **quiet_fit)
    assert history.epoch == [1, 2]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "grad_norm",
                "compute_s", "sync_s", "wait_s", "wall_s", "samples_per_s", "epoch_s"):
        assert len(history.history[key]) == 2 and np.all(np.isfinite(history.history[key])), key
    assert history.history["steps"] == [8.0, 8.0]  # 450 training examples in batches of 64
    assert history.history["val_accuracy"][-1] > 0.8


def test_gradient_accumulation_is_one_step_on_k_batches_in_micro_batches(blobs):
    x, y = blobs
    model = MLP(sizes=(12, 16, 3))
    options = dict(num_processes=2, optimizer="sgd", learning_rate=0.1, seed=2, verbose=False)
    accumulated = Trainer(model, batch_size=32, grad_accum=3, **options)
    assert accumulated.processor_options["batch_size"] == 96
    assert accumulated.processor_options["micro_batch_size"] == 16  # 32 split over 2 workers
    result = accumulated.fit(x, y, epochs=2)
    large_batch = fit(model, x, y, epochs=2, batch_size=96, **options)
    assert result.history["steps"] == [7.0, 7.0]
    # Chunked sums change only float32 rounding.
    np.testing.assert_allclose(result.state.buffer, large_batch.state.buffer, rtol=1e-4, atol=1e-6)


def test_balanced_class_weights_come_from_scikit_learn_on_the_training_labels(blobs, quiet_fit):
    x, y = blobs[0][:300], blobs[1][:300]
    y = np.where(np.arange(300) < 200, 0, y)  # make class 0 dominant
    trainer = Trainer(MLP(sizes=(12, 8, 3)), loss=FocalLoss(class_weight="balanced"), **quiet_fit)
    history = trainer.fit(x, y, epochs=3)
    counts = np.bincount(y, minlength=3)
    np.testing.assert_allclose(trainer.loss.class_weight, 300 / (3 * counts))
    np.testing.assert_allclose(trainer.loss.class_weight, compute_class_weight(
        "balanced", classes=np.arange(3), y=y))
    assert trainer.model.loss_fn is trainer.loss
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_evaluate_gives_the_models_predictions_and_accuracy(blobs):
    x, y = blobs
    model = MLP(sizes=(12, 8, 3))
    state = model.init_state(0)
    result = evaluate(model, state, x, y, num_processes=1, batch_size=100)
    np.testing.assert_allclose(result["probabilities"], model.predict(state, x), rtol=1e-6)
    assert result["accuracy"] == np.mean(model.predict(state, x).argmax(axis=1) == y)
    assert result["loss"] == pytest.approx(model.loss(state, x, y), rel=1e-5)


def test_data_too_large_for_memory_streams_in_segments(tmp_path, blobs, quiet_fit):
    np.save(tmp_path / "x.npy", blobs[0])
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    limit = 100 * 12 * 4  # 100 examples: segments of 64 rows (a multiple of the batch)
    history = fit(MLP(sizes=(12, 8, 3)), mapped, blobs[1], epochs=2, standardize=True,
                  memory_limit_bytes=limit, **quiet_fit)
    assert history.history["steps"] == [10.0, 10.0]  # 600 examples: 9 full batches and 24 left
    assert history.history["accuracy"][-1] > 0.8
    streamed = evaluate(MLP(sizes=(12, 8, 3)), history.state, mapped, blobs[1],
                        standardizer=history.standardizer, num_processes=1,
                        memory_limit_bytes=limit)
    whole = evaluate(MLP(sizes=(12, 8, 3)), history.state, history.standardizer(blobs[0]),
                     blobs[1], num_processes=1)
    np.testing.assert_allclose(streamed["probabilities"], whole["probabilities"], rtol=1e-5)


def test_standardization_uses_training_statistics(blobs, quiet_fit):
    x, y = blobs[0] * 50 + 7, blobs[1]
    history = fit(MLP(sizes=(12, 8, 3)), x, y, epochs=1, standardize=True,
                  validation_split=0.5, **quiet_fit)
    np.testing.assert_allclose(history.standardizer.mean, x.mean(axis=0), rtol=0.2)
    standardized = history.standardizer(x)
    assert abs(standardized.mean()) < 0.2 and standardized.std() == pytest.approx(1, abs=0.2)


@pytest.mark.parametrize("change, message", [
    (lambda x, y: (np.where(np.arange(600)[:, None] == 5, np.nan, x), y), "example 5 holds NaN"),
    (lambda x, y: (x, y[:-1]), "600 examples but 599 labels"),
    (lambda x, y: (x, np.where(np.arange(600) == 3, 7, y)), r"in \[0, 3\); label 3 is 7"),
    (lambda x, y: (x, y + 0.5), "label 0 is"),
    (lambda x, y: (x, np.where(y == 2, 1, y)), r"class\(es\) \[2\] have no example"),
])
def test_bad_data_fails_before_training_with_the_problem_named(blobs, quiet_fit, change, message,
                                                               live_children):
    x, y = change(*blobs)
    with pytest.raises(DataError, match=message):
        fit(MLP(sizes=(12, 8, 3)), x, y, epochs=1, **dict(quiet_fit, num_processes=2))
    assert not live_children()


def test_a_monitor_the_run_does_not_log_is_refused_up_front(blobs, quiet_fit):
    with pytest.raises(ValueError, match="EarlyStopping monitors 'val_loss'"):
        fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=1, callbacks=[EarlyStopping()], **quiet_fit)
    with pytest.raises(ValueError, match="grad_accum"):
        Trainer(MLP(sizes=(12, 8, 3)), grad_accum=0)
    with pytest.raises(ValueError, match="unknown loss"):
        Trainer(MLP(sizes=(12, 8, 3)), loss="hinge")
