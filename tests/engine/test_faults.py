"""Fault injection (engine.parallel.faults): workers die, segfault or hang mid-run; training goes on, and in
gradients mode the final state is bitwise the state of a run without the fault."""
import signal

import numpy as np
import pytest

from engine import ParallelBatchProcessor, WorkerCrashedError, WorkerTimeoutError
from models import MLP

MODEL = MLP(sizes=(12, 16, 3))


def _train(blobs, epochs=2, **options):
    options = dict(dict(num_processes=2, batch_size=100, optimizer="adam", seed=1), **options)
    state, restarts = MODEL.init_state(0), []
    with ParallelBatchProcessor(MODEL, **options) as processor:
        for _ in range(epochs):
            state, results = processor.run_parallel(*blobs, state, {"learning_rate": 0.01})
            restarts += results["restarts"]
    return state, restarts


@pytest.fixture(scope="module")
def fault_free_state():
    rng = np.random.default_rng(7)
    centers = rng.normal(0, 3, size=(3, 12))
    labels = rng.integers(0, 3, size=600)
    examples = (centers[labels] + rng.normal(size=(600, 12))).astype(np.float32)
    return _train((examples, labels))[0]


@pytest.mark.parametrize("faults,worker,step", [
    ("kill@1:2", 1, 2),
    ("kill@0:7:compute", 0, 7),
    ("segv@1:3", 1, 3),
    ("exit@0:4:reduce", 0, 4),
    ("kill@1:5:reduce_mid", 1, 5),   # dies with its slice half averaged (Adam: half updated)
    ("kill@0:8:update_mid", 0, 8),   # dies with its slice of the new state half written
])
def test_a_dead_worker_is_replaced_and_the_result_is_identical(blobs, monkeypatch, faults, worker,
                                                               step, fault_free_state):
    monkeypatch.setenv("ENGINE_TEST_FAULTS", faults)
    state, restarts = _train(blobs)
    np.testing.assert_array_equal(state.buffer, fault_free_state.buffer)
    assert [(r["worker"], r["step"], r["reason"]) for r in restarts] == [(worker, step, "died")]


def test_a_hung_worker_is_killed_after_timeout_and_replaced(blobs, monkeypatch, fault_free_state):
    monkeypatch.setenv("ENGINE_TEST_FAULTS", "hang@1:6:update")
    state, restarts = _train(blobs, timeout_s=2.0)
    np.testing.assert_array_equal(state.buffer, fault_free_state.buffer)
    # On a busy machine a healthy worker may also overrun 2 s and be replaced (harmlessly: the
    # result is still bitwise identical); the hung worker must be among the replaced.
    assert (1, 6, "timeout") in [(r["worker"], r["step"], r["reason"]) for r in restarts]
    assert {r["reason"] for r in restarts} == {"timeout"}


@pytest.mark.timeout(120)  # without the fix both workers wait forever: fail instead of hanging
def test_a_worker_stopped_while_flagged_asleep_at_a_passed_barrier_is_replaced(
        blobs, monkeypatch, fault_free_state):
    # Worker 1 SIGSTOPs itself at step 4's COMPUTED barrier after it passed, still flagged asleep;
    # worker 0 then really waits for it at UPDATED. The stopped worker waits for nobody (the
    # arrival counters say so), so it must count as hung and be SIGKILLed and replaced.
    monkeypatch.setenv("ENGINE_TEST_FAULTS", "stop_asleep@1:4:compute")
    state, restarts = _train(blobs, timeout_s=2.0)
    np.testing.assert_array_equal(state.buffer, fault_free_state.buffer)
    # As in the hang test, a healthy worker overrunning 2 s on a busy machine may be replaced too.
    replaced = [(r["worker"], r["step"], r["reason"], r["exitcode"]) for r in restarts]
    assert (1, 4, "timeout", -signal.SIGKILL) in replaced
    assert {r["reason"] for r in restarts} == {"timeout"}


def test_faults_in_both_workers_of_one_run_are_all_survived(blobs, monkeypatch,
                                                             fault_free_state):
    # A fault plan arms only a worker's first incarnation: one fatal fault per worker.
    monkeypatch.setenv("ENGINE_TEST_FAULTS", "kill@0:1:reduce;segv@1:9:update")
    state, restarts = _train(blobs)
    np.testing.assert_array_equal(state.buffer, fault_free_state.buffer)
    assert [(r["worker"], r["step"]) for r in restarts] == [(0, 1), (1, 9)]


def test_past_max_restarts_the_error_names_the_worker_exit_code_and_stderr(blobs, monkeypatch):
    monkeypatch.setenv("ENGINE_TEST_FAULTS", "segv@1:2")
    with pytest.raises(WorkerCrashedError, match="worker 1 died") as caught:
        _train(blobs, max_restarts=0)
    assert caught.value.worker_id == 1 and caught.value.exitcode == -11
    assert "Segmentation fault" in caught.value.stderr_tail


def test_past_max_restarts_a_hang_raises_timeout(blobs, monkeypatch):
    monkeypatch.setenv("ENGINE_TEST_FAULTS", "hang@0:1")
    with pytest.raises(WorkerTimeoutError, match=r"worker\(s\) \[.*0.*\]") as caught:
        _train(blobs, max_restarts=0, timeout_s=1.0)
    assert 0 in caught.value.worker_ids  # worker 1 may also be late on a busy machine


def test_states_mode_survives_a_dead_worker(blobs, monkeypatch):
    monkeypatch.setenv("ENGINE_TEST_FAULTS", "kill@1:4:local_step;kill@0:5:average")
    state, restarts = _train(blobs, sync="states", update_interval=3, optimizer="sgd")
    assert len(restarts) == 2 and np.all(np.isfinite(state.buffer))


def test_faults_in_evaluation_are_survived(blobs, monkeypatch):
    monkeypatch.setenv("ENGINE_TEST_FAULTS", "kill@1:0:evaluate")
    state = MODEL.init_state(0)
    with ParallelBatchProcessor(MODEL, num_processes=2, batch_size=100) as processor:
        _, results = processor.run_parallel(*blobs, state, {"update_weights": False})
    np.testing.assert_allclose(results["predictions"], MODEL.predict(state, blobs[0]), rtol=1e-5,
                               atol=1e-6)
    assert len(results["restarts"]) == 1


def test_a_malformed_fault_plan_is_rejected(monkeypatch, blobs):
    monkeypatch.setenv("ENGINE_TEST_FAULTS", "explode@1")
    with pytest.raises(ValueError, match="KIND@WORKER:STEP"):
        _train(blobs, epochs=1)
