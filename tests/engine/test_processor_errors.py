"""Bad input fails with a clear message before any worker starts; runtime failures tear down."""
import os

import numpy as np
import psutil
import pytest

import engine.parallel.processor
from engine import (NetworkState, NonFiniteLossError, ParallelBatchProcessor, WorkerError)
from engine.parallel.shm import blocks_of
from models import MLP


@pytest.fixture
def model():
    return MLP(sizes=(12, 8, 3))


@pytest.mark.parametrize("change,message", [
    (lambda x, y: (x, y[:-1]), "one label per example"),
    (lambda x, y: (np.where(np.arange(len(x))[:, None] == 5, np.nan, x), y), "NaN or infinite.*5"),
    (lambda x, y: (x, y + 0.5), "integer class indices"),
    (lambda x, y: (x, y - 1), r"labels must be in \[0, 3\)"),
    (lambda x, y: (x, y + 1), r"labels must be in \[0, 3\)"),
    (lambda x, y: (x[:, :10], y), r"feature shape \(10,\).*\(12,\)"),
    (lambda x, y: (x[:0], y[:0]), "at least one example"),
    (lambda x, y: (x.astype(object), y), "real numeric"),
])
def test_bad_data_is_rejected_before_any_worker_starts(blobs, model, change, message,
                                                       live_children):
    x, y = change(*blobs)
    with ParallelBatchProcessor(model, num_processes=2, batch_size=50) as processor:
        with pytest.raises(ValueError, match=message):
            processor.run_parallel(x, y, model.init_state(0), {"learning_rate": 0.1})
        assert processor.worker_pids == [] and not live_children()


class _NoShapeAttributes:
    """Follows the protocol without input_shape/num_outputs, so the engine learns them by a dry run."""

    def __init__(self):
        self.inner = MLP(sizes=(12, 8, 3))

    def init_state(self, seed):
        return self.inner.init_state(seed)

    def loss_and_grads(self, state, x, y, *, rng=None):
        return self.inner.loss_and_grads(state, x, y, rng=rng)

    def predict(self, state, x):
        return self.inner.predict(state, x)

    def loss(self, state, x, y):
        return self.inner.loss(state, x, y)


def test_a_dry_run_finds_a_feature_shape_the_model_does_not_take(blobs):
    model = _NoShapeAttributes()
    with ParallelBatchProcessor(model, num_processes=2, batch_size=50) as processor:
        with pytest.raises(ValueError, match=r"cannot take examples of feature shape \(7,\)"):
            processor.run_parallel(blobs[0][:, :7], blobs[1], model.init_state(0),
                                   {"learning_rate": 0.1})
        with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
            processor.run_parallel(blobs[0], blobs[1] + 3, model.init_state(0),
                                   {"learning_rate": 0.1})


@pytest.mark.parametrize("options,message", [
    (dict(num_processes=4, batch_size=3), "batch_size must be at least num_processes"),
    (dict(num_processes=0), "num_processes must be a positive int"),
    (dict(num_processes=-2), "num_processes must be a positive int"),
    (dict(sync="allreduce"), "sync must be one of"),
    (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop'"),
    (dict(update_interval=0), "update_interval must be a positive int"),
    (dict(timeout_s=0), "timeout_s must be a positive number"),
    (dict(start_method="thread"), "start_method must be one of"),
    (dict(seed=-1), "seed must be a non-negative int"),
])
def test_bad_options_are_rejected_when_the_processor_is_built(model, options, message):
    with pytest.raises(ValueError, match=message):
        ParallelBatchProcessor(model, **options)


def test_a_state_that_does_not_match_the_model_names_the_key(blobs, model, live_children):
    wrong = MLP(sizes=(12, 9, 3)).init_state(0)
    with ParallelBatchProcessor(model, num_processes=2, batch_size=50) as processor:
        with pytest.raises(ValueError, match=r"dense_0/kernel.*\(12, 8\).*\(12, 9\)"):
            processor.run_parallel(*blobs, wrong, {"learning_rate": 0.1})
        with pytest.raises(TypeError, match="must be a NetworkState"):
            processor.run_parallel(*blobs, {"w": 1}, {"learning_rate": 0.1})
        assert not live_children()


def test_missing_or_bad_params_are_rejected(blobs, model):
    with ParallelBatchProcessor(model, num_processes=1, batch_size=50) as processor:
        for params, message in (({}, "learning_rate"), ({"learning_rate": -1}, "learning_rate"),
                                ({"learning_rate": 0.1, "lr": 1}, "unknown params keys"),
                                ({"learning_rate": 0.1, "clip_norm": 0}, "clip_norm")):
            with pytest.raises(ValueError, match=message):
                processor.run_parallel(*blobs, model.init_state(0), params)


def test_a_missing_model_is_reported_with_what_to_pass(blobs, model):
    with pytest.raises(ValueError, match="a model is required"):
        ParallelBatchProcessor(batch_size=50).run_parallel(*blobs, model.init_state(0),
                                                           {"learning_rate": 0.1})


def test_more_processes_than_cores_warns_once(monkeypatch, model):
    monkeypatch.setattr(engine.parallel.processor, "_warned_oversubscription", False)
    monkeypatch.setattr(engine.parallel.processor, "usable_cores", lambda: 1)
    with pytest.warns(RuntimeWarning, match="more than the 1 usable cores"):
        ParallelBatchProcessor(model, num_processes=2, batch_size=50)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ParallelBatchProcessor(model, num_processes=2, batch_size=50)


class _FailsOnMarkedExamples(MLP):
    """Raises inside loss_and_grads when a shard holds an example whose first feature is 1e6."""

    def loss_and_grads(self, state, x, y, *, rng=None):
        if np.any(x[:, 0] == 1e6):
            raise ArithmeticError("marked example reached the model")
        return super().loss_and_grads(state, x, y, rng=rng)


def test_a_worker_exception_reaches_the_caller_with_its_traceback_and_tears_down(blobs):
    model = _FailsOnMarkedExamples(sizes=(12, 8, 3))
    x = blobs[0].copy()
    x[45, 0] = 1e6  # second shard of the first batch of 50 (unshuffled in process_batch)
    processor = ParallelBatchProcessor(model, num_processes=2, batch_size=50)
    processor.process_batch(x[:40], blobs[1][:40], model.init_state(0), {"learning_rate": 0.1})
    pids = processor.worker_pids
    with pytest.raises(WorkerError, match="worker 1 raised") as caught:
        processor.process_batch(x[:50], blobs[1][:50], model.init_state(0), {"learning_rate": 0.1})
    assert "ArithmeticError: marked example reached the model" in caught.value.remote_traceback
    assert "loss_and_grads" in caught.value.remote_traceback
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in pids)
    assert blocks_of(os.getpid()) == []  # released at once, not only at close()
    state, _ = processor.process_batch(x[:40], blobs[1][:40], model.init_state(0),
                                       {"learning_rate": 0.1})  # a fresh pool starts
    assert np.all(np.isfinite(state.buffer))
    processor.close()


class _NaNAfterFirstStep(MLP):
    """Returns a NaN loss once the weights have moved from their initial values."""

    def loss_and_grads(self, state, x, y, *, rng=None):
        loss, grads = super().loss_and_grads(state, x, y, rng=rng)
        moved = not np.array_equal(state.buffer, self.init_state(0).buffer)
        return (float("nan") if moved else loss), grads


@pytest.mark.parametrize("num_processes", [1, 2])
def test_a_non_finite_loss_raises_with_the_step_and_keeps_the_last_good_state(blobs,
                                                                              num_processes):
    model = _NaNAfterFirstStep(sizes=(12, 8, 3))
    start = model.init_state(0)
    with ParallelBatchProcessor(model, num_processes=num_processes, batch_size=100,
                                optimizer="sgd") as processor:
        with pytest.raises(NonFiniteLossError, match="not finite.*step 1") as caught:
            processor.run_parallel(*blobs, start, {"learning_rate": 0.1})
    good = caught.value.last_good_state
    assert isinstance(good, NetworkState) and np.all(np.isfinite(good.buffer))
    assert not np.array_equal(good.buffer, start.buffer)  # one good step was taken


@pytest.mark.parametrize("sync", ["gradients", "states"])
def test_an_update_that_overflows_the_parameters_is_refused_and_the_state_kept(blobs, sync):
    model = MLP(sizes=(12, 8, 3))
    start = model.init_state(0)
    with ParallelBatchProcessor(model, num_processes=2, batch_size=100, sync=sync,
                                optimizer="sgd") as processor:
        with pytest.raises(NonFiniteLossError, match="updated parameters are not finite.*step 0"):
            processor.process_batch(*blobs, start, {"learning_rate": 1e300})
        np.testing.assert_array_equal(processor._current_state().buffer, start.buffer)
