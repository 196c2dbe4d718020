"""ParallelBatchProcessor: what each sync mode promises, checked against in-process oracles."""
import os

import numpy as np
import pytest

from engine import SGD, NetworkState, ParallelBatchProcessor
from engine.core.sharding import split_batch
from models import CNN1D, MLP

# Sharding changes only the order of float32 sums, so the states agree to float32 rounding.
RTOL, ATOL = 1e-4, 1e-6


def _single_process_step(model, state, x, y, optimizer, learning_rate=0.05, **params):
    with ParallelBatchProcessor(model, num_processes=1, batch_size=len(x), optimizer=optimizer) as p:
        return p.process_batch(x, y, state, {"learning_rate": learning_rate, **params})


@pytest.mark.parametrize("num_processes", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [50, 7])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", SGD(momentum=0.9)])
def test_gradient_sync_matches_single_process_large_batch(blobs, num_processes, batch_size,
                                                          optimizer):
    x, y = blobs[0][:batch_size], blobs[1][:batch_size]
    model = MLP(sizes=(12, 16, 3))
    state = model.init_state(seed=1)
    expected, expected_results = _single_process_step(model, state, x, y, optimizer)
    with ParallelBatchProcessor(model, num_processes=num_processes, batch_size=batch_size,
                                optimizer=optimizer) as processor:
        new_state, results = processor.process_batch(x, y, state, {"learning_rate": 0.05})
    np.testing.assert_allclose(new_state.buffer, expected.buffer, rtol=RTOL, atol=ATOL)
    assert results["loss"] == pytest.approx(expected_results["loss"], rel=1e-5)
    assert not np.array_equal(new_state.buffer, state.buffer)


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_gradient_sync_is_the_same_under_every_start_method(blobs, start_method):
    x, y = blobs[0][:64], blobs[1][:64]
    model = CNN1D(input_shape=(12,), num_classes=3, channels=4)
    state = model.init_state(seed=3)
    expected, _ = _single_process_step(model, state, x, y, "adam")
    with ParallelBatchProcessor(model, num_processes=2, batch_size=64, optimizer="adam",
                                start_method=start_method) as processor:
        new_state, _ = processor.process_batch(x, y, state, {"learning_rate": 0.05})
    np.testing.assert_allclose(new_state.buffer, expected.buffer, rtol=RTOL, atol=ATOL)


def test_an_epoch_of_gradient_sync_matches_the_in_process_epoch(blobs):
    x, y = blobs
    model = MLP(sizes=(12, 32, 3))
    state = model.init_state(seed=0)
    finals = []
    for num_processes in (1, 2):
        with ParallelBatchProcessor(model, num_processes=num_processes, batch_size=64,
                                    optimizer="adam", seed=5) as processor:
            final, results = processor.run_parallel(x, y, state, {"learning_rate": 0.01})
            finals.append(final)
    assert results["loss"].shape == (10,) and results["examples"].sum() == 600
    np.testing.assert_allclose(finals[1].buffer, finals[0].buffer, rtol=1e-3, atol=1e-5)


def test_results_report_losses_timings_and_peak_memory_of_every_worker(blobs):
    x, y = blobs
    model = MLP(sizes=(12, 8, 3))
    with ParallelBatchProcessor(model, num_processes=2, batch_size=100) as processor:
        _, results = processor.run_parallel(x, y, model.init_state(0), {"learning_rate": 0.01})
        pids = processor.worker_pids
    for key in ("loss", "compute_s", "sync_s", "wait_s", "wall_s", "grad_norm"):
        assert results[key].shape == (6,) and np.all(np.isfinite(results[key])), key
    assert np.all(results["compute_s"] > 0) and np.all(results["sync_s"] > 0)
    # Each worker's own compute; the step's compute_s is the slowest of them.
    assert results["worker_compute_s"].shape == (6, 2) and np.all(results["worker_compute_s"] > 0)
    np.testing.assert_array_equal(results["worker_compute_s"].max(axis=1), results["compute_s"])
    assert len(pids) == 2 and results["peak_rss_bytes"].shape == (2,)
    assert np.all(results["peak_rss_bytes"] > 10 << 20)


def test_evaluation_changes_nothing_and_returns_predictions_in_input_order(blobs):
    x, y = blobs
    model = MLP(sizes=(12, 8, 3))
    state = model.init_state(0)
    with ParallelBatchProcessor(model, num_processes=2, batch_size=64) as processor:
        returned, results = processor.run_parallel(x, y, state, {"update_weights": False})
    np.testing.assert_array_equal(returned.buffer, state.buffer)
    np.testing.assert_allclose(results["predictions"], model.predict(state, x), rtol=1e-5,
                               atol=1e-6)
    assert results["mean_loss"] == pytest.approx(model.loss(state, x, y), rel=1e-5)


def test_states_mode_with_interval_one_and_plain_sgd_equals_gradient_mode(blobs):
    x, y = blobs[0][:90], blobs[1][:90]
    model = MLP(sizes=(12, 16, 3))
    state = model.init_state(2)
    finals = []
    for sync in ("gradients", "states"):
        with ParallelBatchProcessor(model, num_processes=2, batch_size=30, sync=sync,
                                    optimizer="sgd", seed=9) as processor:
            finals.append(processor.run_parallel(x, y, state, {"learning_rate": 0.1})[0])
    np.testing.assert_allclose(finals[1].buffer, finals[0].buffer, rtol=RTOL, atol=ATOL)


def test_states_mode_averages_local_sgd_states_every_interval(blobs):
    """Oracle: local SGD simulated by hand, one state per worker, averaged every 2 steps. Between
    averages, process_batch returns the example-weighted mean of the local states."""
    x, y = blobs[0][:200], blobs[1][:200]
    model = MLP(sizes=(12, 16, 3))
    start = model.init_state(4)
    batches = [(x[i:i + 41], y[i:i + 41]) for i in range(0, 164, 41)]  # 4 steps of 41 examples
    locals_ = [start.copy(), start.copy()]
    counts = np.zeros(2)
    expected = []
    for step, (bx, by) in enumerate(batches):
        bounds = split_batch(len(bx), 2)
        for w in range(2):
            a, b = bounds[w], bounds[w + 1]
            _, grads = model.loss_and_grads(locals_[w], bx[a:b], by[a:b])[:2]
            for name, grad in grads.items():
                locals_[w].weights[name] -= np.float32(0.1) * grad
            counts[w] += b - a
        expected.append(NetworkState.average(locals_, weights=counts))
        if step % 2 == 1:
            locals_, counts = [expected[-1].copy(), expected[-1].copy()], np.zeros(2)
    with ParallelBatchProcessor(model, num_processes=2, batch_size=41, sync="states",
                                update_interval=2, optimizer="sgd") as processor:
        state = start
        for (bx, by), want in zip(batches, expected):
            state, _ = processor.process_batch(bx, by, state, {"learning_rate": 0.1})
            np.testing.assert_allclose(state.buffer, want.buffer, rtol=RTOL, atol=ATOL)


def test_theta_is_averaged_weighted_by_shard_size_in_gradient_mode(blobs):
    x, y = blobs[0][:33], blobs[1][:33]
    model = MLP(sizes=(12, 8, 3), batchnorm=True)
    state = model.init_state(0)
    bounds = split_batch(33, 2)
    thetas = [model.loss_and_grads(state, x[a:b], y[a:b])[2] for a, b in zip(bounds, bounds[1:])]
    with ParallelBatchProcessor(model, num_processes=2, batch_size=33, optimizer="sgd") as p:
        new_state, _ = p.process_batch(x, y, state, {"learning_rate": 0.1})
    for name in state.theta:
        expected = (17 * thetas[0][name] + 16 * thetas[1][name]) / 33
        np.testing.assert_allclose(new_state.theta[name], expected, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_limits_the_update_to_the_clip_norm(blobs):
    x, y = blobs[0][:40], blobs[1][:40]
    model = MLP(sizes=(12, 8, 3))
    state = model.init_state(0)
    with ParallelBatchProcessor(model, num_processes=2, batch_size=40, optimizer="sgd") as p:
        clipped, results = p.process_batch(x, y, state, {"learning_rate": 1.0, "clip_norm": 1e-3})
    step = np.linalg.norm(clipped.buffer - state.buffer)
    assert results["grad_norm"] > 1e-3 and step == pytest.approx(1e-3, rel=1e-3)


def test_optimizer_state_persists_across_calls_until_reset(blobs):
    x, y = blobs[0][:20], blobs[1][:20]
    model = MLP(sizes=(12, 4, 3))
    state = model.init_state(0)
    with ParallelBatchProcessor(model, num_processes=1, batch_size=20,
                                optimizer=SGD(momentum=0.9)) as p:
        first, _ = p.process_batch(x, y, state, {"learning_rate": 0.01})
        second, _ = p.process_batch(x, y, state, {"learning_rate": 0.01})
        p.reset_optimizer()
        third, _ = p.process_batch(x, y, state, {"learning_rate": 0.01})
    assert not np.allclose(first.buffer, second.buffer)
    np.testing.assert_array_equal(first.buffer, third.buffer)


def test_processor_is_a_context_manager_whose_close_is_idempotent(blobs):
    import psutil
    model = MLP(sizes=(12, 4, 3))
    processor = ParallelBatchProcessor(model, num_processes=2, batch_size=20)
    processor.process_batch(blobs[0][:20], blobs[1][:20], model.init_state(0),
                            {"learning_rate": 0.01})
    pids = processor.worker_pids
    assert all(psutil.pid_exists(pid) for pid in pids)
    processor.close()
    processor.close()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in pids)


def test_default_uses_one_process_per_usable_core():
    from engine import usable_cores
    processor = ParallelBatchProcessor(MLP(sizes=(4, 2)), batch_size=64)
    assert processor.num_processes == usable_cores() <= (os.cpu_count() or 1)
    assert processor.threads_per_process == max(1, usable_cores() // processor.num_processes)


@pytest.mark.parametrize("sync", ["gradients", "states"])
def test_micro_batches_give_the_same_step_as_whole_shards(blobs, sync):
    x, y = blobs[0][:90], blobs[1][:90]
    model = MLP(sizes=(12, 16, 3))
    state = model.init_state(0)
    finals = []
    for micro_batch_size in (None, 7):
        with ParallelBatchProcessor(model, num_processes=2, batch_size=90, sync=sync,
                                    optimizer="sgd", micro_batch_size=micro_batch_size) as p:
            finals.append(p.process_batch(x, y, state, {"learning_rate": 0.1}))
    np.testing.assert_allclose(finals[1][0].buffer, finals[0][0].buffer, rtol=RTOL, atol=ATOL)
    assert finals[1][1]["loss"] == pytest.approx(finals[0][1]["loss"], rel=1e-5)


def test_training_state_lets_a_new_processor_resume_bitwise(blobs):
    model = MLP(sizes=(12, 16, 3))
    start = model.init_state(0)
    options = dict(num_processes=2, batch_size=64, optimizer="adam", seed=3)
    with ParallelBatchProcessor(model, **options) as processor:
        state = start
        for _ in range(2):
            state, _ = processor.run_parallel(*blobs, state, {"learning_rate": 0.01})
        uninterrupted = state
    with ParallelBatchProcessor(model, **options) as processor:
        halfway, _ = processor.run_parallel(*blobs, start, {"learning_rate": 0.01})
        saved = processor.training_state()
    with ParallelBatchProcessor(model, **options) as processor:
        processor.load_training_state(saved)
        resumed, _ = processor.run_parallel(*blobs, halfway, {"learning_rate": 0.01})
    np.testing.assert_array_equal(resumed.buffer, uninterrupted.buffer)


def test_states_mode_process_batch_with_one_process_returns_the_local_state(blobs):
    x, y = blobs[0][:40], blobs[1][:40]
    model = MLP(sizes=(12, 8, 3))
    start = model.init_state(0)
    expected, _ = _single_process_step(model, start, x, y, "sgd", learning_rate=0.1)
    with ParallelBatchProcessor(model, num_processes=1, batch_size=40, sync="states",
                                update_interval=5, optimizer="sgd") as processor:
        state, _ = processor.process_batch(x, y, start, {"learning_rate": 0.1})
    np.testing.assert_allclose(state.buffer, expected.buffer, rtol=RTOL, atol=ATOL)


def test_a_learning_rate_function_is_evaluated_at_every_optimizer_step(blobs):
    model = MLP(sizes=(12, 8, 3))
    start = model.init_state(0)
    schedule = lambda step: 0.1 * (step + 1)  # noqa: E731 - a per-step warmup
    with ParallelBatchProcessor(model, num_processes=2, batch_size=200, optimizer="sgd") as p:
        state, results = p.run_parallel(*blobs, start, {"learning_rate": schedule})
        _, more = p.run_parallel(*blobs, state, {"learning_rate": schedule})
    np.testing.assert_allclose(results["learning_rate"], [0.1, 0.2, 0.3])
    np.testing.assert_allclose(more["learning_rate"], [0.4, 0.5, 0.6])  # the step count goes on
    with ParallelBatchProcessor(model, num_processes=1, batch_size=200, optimizer="sgd") as p:
        with pytest.raises(ValueError, match="schedule for step 0"):
            p.run_parallel(*blobs, start, {"learning_rate": lambda step: float("nan")})


@pytest.mark.parametrize("num_processes", [1, 2])
def test_optimizer_state_outlives_close_so_a_restarted_pool_goes_on_bitwise(blobs, num_processes):
    model = MLP(sizes=(12, 16, 3))
    options = dict(num_processes=num_processes, batch_size=64, optimizer="adam", seed=4)
    with ParallelBatchProcessor(model, **options) as processor:
        state = model.init_state(0)
        for _ in range(2):
            state, _ = processor.run_parallel(*blobs, state, {"learning_rate": 0.01})
    uninterrupted = state
    with ParallelBatchProcessor(model, **options) as processor:
        state, _ = processor.run_parallel(*blobs, model.init_state(0), {"learning_rate": 0.01})
        processor.close()  # as a failure does: the next call starts a fresh pool
        state, _ = processor.run_parallel(*blobs, state, {"learning_rate": 0.01})
    np.testing.assert_array_equal(state.buffer, uninterrupted.buffer)
