"""Recovery is exact, not merely finite: a worker that dies during a states-mode average leaves
the same average; a failed call rolls the optimizer back with the weights; a start that fails
half way leaves the processor usable; states mode goes on from a copy of the state it returned."""
import numpy as np
import pytest

import engine.parallel.processor_setup
from engine import ParallelBatchProcessor, WorkerError
from models import MLP

MODEL = MLP(sizes=(12, 16, 3))
STATES = dict(num_processes=2, batch_size=100, sync="states", update_interval=3, optimizer="sgd",
              seed=1)


def _states_run(blobs, epochs=2):
    state, restarts = MODEL.init_state(0), []
    with ParallelBatchProcessor(MODEL, **STATES) as processor:
        for _ in range(epochs):
            state, results = processor.run_parallel(*blobs, state, {"learning_rate": 0.05})
            restarts += results["restarts"]
    return state, restarts


@pytest.mark.parametrize("faults", ["kill@0:5:average", "kill@1:2:average", "kill@1:4:local_step"])
def test_states_mode_ends_exactly_as_without_a_worker_dying_outside_its_update(blobs, monkeypatch,
                                                                                faults):
    expected, _ = _states_run(blobs)
    monkeypatch.setenv("ENGINE_TEST_FAULTS", faults)
    state, restarts = _states_run(blobs)
    assert len(restarts) == 1
    np.testing.assert_array_equal(state.buffer, expected.buffer)


def test_a_failed_call_rolls_the_optimizer_back_with_the_weights(blobs, monkeypatch):
    options = dict(num_processes=2, batch_size=50, optimizer="adam", seed=3)
    with ParallelBatchProcessor(MODEL, **options) as processor:
        clean, _ = processor.run_parallel(*blobs, MODEL.init_state(0), {"learning_rate": 0.01})
        clean_step = processor.training_state()["step"]
    monkeypatch.setenv("ENGINE_TEST_FAULTS", "raise@1:10")
    with ParallelBatchProcessor(MODEL, **options) as processor:
        with pytest.raises(WorkerError, match="injected fault at step 10"):
            processor.run_parallel(*blobs, MODEL.init_state(0), {"learning_rate": 0.01})
        monkeypatch.delenv("ENGINE_TEST_FAULTS")
        processor._rng = np.random.default_rng(options["seed"])  # replay the same shuffle
        retried, _ = processor.run_parallel(*blobs, MODEL.init_state(0), {"learning_rate": 0.01})
        assert processor.training_state()["step"] == clean_step
    np.testing.assert_array_equal(retried.buffer, clean.buffer)


def test_a_start_that_fails_half_way_leaves_the_processor_usable(blobs, monkeypatch,
                                                                 live_children):
    real_pool, calls = engine.parallel.processor_setup.WorkerPool, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("no more processes (injected)")
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(engine.parallel.processor_setup, "WorkerPool", failing_once)
    with ParallelBatchProcessor(MODEL, num_processes=2, batch_size=50) as processor:
        with pytest.raises(OSError, match="injected"):
            processor.run_parallel(*blobs, MODEL.init_state(0), {"learning_rate": 0.01})
        assert not live_children()
        state, _ = processor.run_parallel(*blobs, MODEL.init_state(0), {"learning_rate": 0.01})
    assert np.all(np.isfinite(state.buffer))


def test_states_mode_goes_on_from_a_copy_of_the_state_it_returned(blobs):
    x, y = blobs[0][:100], blobs[1][:100]
    finals = []
    for copy in (False, True):
        with ParallelBatchProcessor(MODEL, **STATES) as processor:
            state = MODEL.init_state(0)
            for _ in range(2):  # between averages: the returned state is the mean of local states
                state, _ = processor.process_batch(x, y, state.copy() if copy else state,
                                                   {"learning_rate": 0.05})
            finals.append(state.buffer)
    np.testing.assert_array_equal(finals[0], finals[1])


def test_a_states_mode_run_resumes_on_another_worker_count(blobs):
    options = dict(STATES, optimizer="adam")
    with ParallelBatchProcessor(MODEL, **dict(options, num_processes=2)) as processor:
        state, _ = processor.run_parallel(*blobs, MODEL.init_state(0), {"learning_rate": 0.05})
        saved = processor.training_state()
    assert saved["optimizer"].shape[0] == 2 and np.any(saved["optimizer"] != 0)
    with ParallelBatchProcessor(MODEL, **dict(options, num_processes=1)) as processor:
        processor.load_training_state(saved)
        resumed, _ = processor.run_parallel(*blobs, state, {"learning_rate": 0.05})
        assert processor.training_state()["step"] == 2 * saved["step"]
        optimizer = processor.training_state()["optimizer"]
    assert optimizer.shape[0] == 1 and np.all(np.isfinite(optimizer))
    assert np.all(np.isfinite(resumed.buffer))
