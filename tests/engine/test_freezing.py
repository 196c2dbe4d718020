"""Frozen weights: no gradient slot, no averaging, no optimizer update; checked against the
one-process run with the same freezing and against NumPy twins of Adam."""
import numpy as np
import pytest

from engine import ParallelBatchProcessor
from engine.core.kernels import adam_ref
from engine.core.sharding import TrainableMap, match_frozen
from models import CNN1D

# Sharding changes only the order of float32 sums, so the states agree to float32 rounding.
RTOL, ATOL = 1e-4, 1e-6
ADAM = dict(beta1=0.9, beta2=0.999, epsilon=1e-7, weight_decay=0.0, scale=1.0)


def _model(batchnorm=False):
    return CNN1D(input_shape=(12,), num_classes=3, channels=4, batchnorm=batchnorm)


def _frozen_mask(state, names):
    mask = np.zeros(state.layout.size, bool)
    weights, _ = state.layout.views(mask)
    for name in names:
        weights[name][...] = True
    return mask


def _steps(model, state, x, y, num_processes, freeze, sync="gradients", steps=3, **params):
    """``steps`` process_batch calls on (x, y); returns the states and the optimizer buffers."""
    with ParallelBatchProcessor(model, num_processes=num_processes, batch_size=len(x), sync=sync,
                                optimizer="adam", freeze=freeze) as processor:
        for _ in range(steps):
            state, _ = processor.process_batch(x, y, state, {"learning_rate": 0.02, **params})
        return state, processor.training_state()["optimizer"], processor.frozen


@pytest.mark.parametrize("sync", ["gradients", "states"])
@pytest.mark.parametrize("num_processes", [1, 2])
@pytest.mark.parametrize("freeze", [["conv1d_4/*"], ["conv*", "batchnorm_8/*"]])
def test_frozen_weights_stay_bitwise_unchanged_and_their_adam_moments_zero(
        blobs, sync, num_processes, freeze):
    model = _model(batchnorm=True)
    start = model.init_state(seed=2)
    x, y = blobs[0][:576], blobs[1][:576]   # 9 steps: an odd count ends on the second version
    with ParallelBatchProcessor(model, num_processes=num_processes, batch_size=64, sync=sync,
                                update_interval=2, freeze=freeze) as processor:
        state, _ = processor.run_parallel(x, y, start, {"learning_rate": 0.02})
        optimizer = processor.training_state()["optimizer"]
        names = processor.frozen
    mask = _frozen_mask(start, names)
    assert names and mask.any()
    assert np.array_equal(state.buffer[mask].view(np.uint32), start.buffer[mask].view(np.uint32))
    trainable = ~mask[:start.layout.num_weights]
    weights = slice(0, start.layout.num_weights)
    assert not np.array_equal(state.buffer[weights][trainable], start.buffer[weights][trainable])
    frozen_weights = mask[weights]
    assert np.all(optimizer[..., frozen_weights] == 0.0)       # (copies, buffers, weights)
    assert np.any(optimizer[..., trainable] != 0.0)
    assert not np.array_equal(state.theta["batchnorm_8/running_mean"],
                              start.theta["batchnorm_8/running_mean"])  # theta is never frozen


@pytest.mark.parametrize("num_processes,batch_size", [(2, 50), (2, 7), (3, 50), (3, 10)])
@pytest.mark.parametrize("freeze", [["conv1d_3/*"], ["conv*"], ["dense_8/kernel"]])
@pytest.mark.parametrize("clip_norm", [None, 0.05])
def test_gradient_sync_with_frozen_weights_matches_one_process_with_the_same_freezing(
        blobs, max_processes, num_processes, batch_size, freeze, clip_norm):
    if num_processes > max_processes:
        pytest.skip(f"needs {num_processes} cores")
    model = _model()
    start = model.init_state(seed=1)
    x, y = blobs[0][:batch_size], blobs[1][:batch_size]
    expected, expected_optimizer, _ = _steps(model, start, x, y, 1, freeze, clip_norm=clip_norm)
    state, optimizer, names = _steps(model, start, x, y, num_processes, freeze,
                                     clip_norm=clip_norm)
    np.testing.assert_allclose(state.buffer, expected.buffer, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(optimizer, expected_optimizer, rtol=RTOL, atol=ATOL)
    mask = _frozen_mask(start, names)
    assert np.array_equal(state.buffer[mask], start.buffer[mask])
    assert not np.array_equal(state.buffer[~mask], start.buffer[~mask])


@pytest.mark.parametrize("num_processes", [1, 2])
def test_one_step_with_frozen_weights_is_adam_on_the_trainable_weights_only(blobs,
                                                                             num_processes):
    """NumPy twin: the full-batch gradient of the in-process model, Adam (kernels.adam_ref) on
    the trainable arrays, the frozen ones left as they are."""
    model = _model()
    start = model.init_state(seed=4)
    x, y = blobs[0][:45], blobs[1][:45]
    state, _, names = _steps(model, start, x, y, num_processes, ["conv1d_1/*", "conv1d_5/*"],
                             steps=1)
    _, grads = model.loss_and_grads(start, x, y)[:2]
    for name, before in start.weights.items():
        if name in names:
            assert np.array_equal(state.weights[name], before), name
        else:
            zero = np.zeros_like(before)
            expected, _, _ = adam_ref(before, zero, zero, grads[name], 0.02, step=1, **ADAM)
            np.testing.assert_allclose(state.weights[name], expected, rtol=RTOL, atol=ATOL,
                                       err_msg=name)


def test_states_sync_with_frozen_weights_averages_local_adam_steps_of_the_trainable_ones(blobs):
    """NumPy twin of one states-mode step on 2 workers: each steps its shard with fresh Adam
    moments on the trainable arrays, then the two states are averaged weighted by shard size."""
    model = _model()
    start = model.init_state(seed=5)
    x, y = blobs[0][:41], blobs[1][:41]          # shards of 21 and 20
    state, _, names = _steps(model, start, x, y, 2, ["conv1d_3/*"], sync="states", steps=1)
    shards = [(0, 21), (21, 41)]
    locals_ = []
    for low, high in shards:
        _, grads = model.loss_and_grads(start, x[low:high], y[low:high])[:2]
        local = {}
        for name, before in start.weights.items():
            zero = np.zeros_like(before)
            local[name] = before if name in names else adam_ref(before, zero, zero, grads[name],
                                                                0.02, step=1, **ADAM)[0]
        locals_.append(local)
    for name, before in start.weights.items():
        expected = (21 * locals_[0][name].astype(np.float64) +
                    20 * locals_[1][name].astype(np.float64)) / 41
        if name in names:
            assert np.array_equal(state.weights[name], before), name
        else:
            np.testing.assert_allclose(state.weights[name], expected, rtol=RTOL, atol=ATOL,
                                       err_msg=name)


@pytest.mark.parametrize("sync", ["gradients", "states"])
def test_changing_the_frozen_set_restarts_the_workers_and_keeps_the_optimizer(blobs, sync):
    """Phase 1 with the convolutions frozen, phase 2 with everything trainable: the same as the
    one-process run of both phases (gradients mode), and frozen values untouched in phase 1."""
    model = _model()
    start = model.init_state(seed=6)
    x, y = blobs
    finals = {}
    for num_processes in (1, 2):
        with ParallelBatchProcessor(model, num_processes=num_processes, batch_size=55, sync=sync,
                                    seed=3, freeze="conv*") as processor:  # 11 steps a pass
            first, _ = processor.run_parallel(x, y, start, {"learning_rate": 0.01})
            pids = processor.worker_pids
            mask = _frozen_mask(start, processor.frozen)
            assert np.array_equal(first.buffer[mask], start.buffer[mask])
            steps = processor.training_state()["step"]
            assert processor.set_frozen([]) == ()
            second, _ = processor.run_parallel(x, y, first, {"learning_rate": 0.01})
            assert processor.training_state()["step"] == steps + 11
            assert not np.array_equal(second.buffer[mask], first.buffer[mask])
            if num_processes > 1:
                assert set(processor.worker_pids).isdisjoint(pids)  # restarted
            finals[num_processes] = second
    if sync == "gradients":
        np.testing.assert_allclose(finals[2].buffer, finals[1].buffer, rtol=1e-3, atol=1e-5)


def test_an_empty_frozen_set_is_bitwise_the_unfrozen_run(blobs):
    model = _model()
    start = model.init_state(seed=7)
    x, y = blobs
    states = []
    for freeze in (None, []):
        with ParallelBatchProcessor(model, num_processes=2, batch_size=64, seed=1,
                                    freeze=freeze) as processor:
            states.append(processor.run_parallel(x, y, start, {"learning_rate": 0.01})[0])
    assert np.array_equal(states[0].buffer.view(np.uint32), states[1].buffer.view(np.uint32))


def test_frozen_weights_take_no_gradient_slot(blobs):
    model = _model(batchnorm=True)
    start = model.init_state(seed=0)
    x, y = blobs
    with ParallelBatchProcessor(model, num_processes=2, batch_size=64,
                                freeze=["conv*"]) as processor:
        processor.run_parallel(x, y, start, {"learning_rate": 0.01})
        slots = processor._work.slots.shape
        expected = TrainableMap.of(start.layout, processor.frozen).size
    frozen = sum(start.weights[name].size for name in processor.frozen)
    assert slots == (2, expected) and expected == start.layout.size - frozen


def test_a_freeze_pattern_that_matches_nothing_names_the_weights():
    model = _model(batchnorm=True)
    with pytest.raises(ValueError, match=r"'conv9\*' matches no weight.*conv1d_1/kernel"):
        ParallelBatchProcessor(model, num_processes=1, batch_size=8, freeze=["conv9*"])
    with pytest.raises(ValueError, match="theta.*not trainable"):
        ParallelBatchProcessor(model, num_processes=1, batch_size=8, freeze="*running_mean")
    with pytest.raises(TypeError, match="non-empty strings"):
        ParallelBatchProcessor(model, num_processes=1, batch_size=8, freeze=["conv*", 3])
    with pytest.raises(ValueError, match="needs a model"):
        ParallelBatchProcessor(None, num_processes=1, batch_size=8, freeze="conv*")


def test_trainable_map_pieces_cover_the_compact_numbering_once():
    layout = _model(batchnorm=True).init_state(0).layout
    names = match_frozen([n for n, _ in layout.weight_shapes], ["conv1d_4/*", "dense_11/bias"])
    trainable = TrainableMap.of(layout, names)
    covered = np.zeros(layout.size, np.int64)
    compact = []
    for start, stop in [(0, 5), (5, 100), (100, trainable.size)]:
        for low, high, first in trainable.pieces(start, stop):
            covered[low:high] += 1
            compact.extend(range(first, first + high - low))
    assert compact == list(range(trainable.size))
    frozen = np.zeros(layout.size, np.int64)
    for low, high in trainable.frozen_ranges:
        frozen[low:high] = 1
    assert np.array_equal(covered + frozen, np.ones(layout.size, np.int64))


def test_freezing_later_keeps_the_frozen_weights_optimizer_entries_as_they_were(blobs):
    """Trained, then frozen: the frozen weights' Adam moments stay bitwise what they were after
    any number of steps (each version of the optimizer state holds them)."""
    model = _model()
    start = model.init_state(seed=8)
    x, y = blobs[0][:550], blobs[1][:550]   # 11 steps a pass
    with ParallelBatchProcessor(model, num_processes=2, batch_size=50) as processor:
        first, _ = processor.run_parallel(x, y, start, {"learning_rate": 0.01})
        before = processor.training_state()["optimizer"]
        processor.set_frozen(["conv1d_1/*", "dense_8/*"])
        second, _ = processor.run_parallel(x, y, first, {"learning_rate": 0.01})
        after = processor.training_state()["optimizer"]
        mask = _frozen_mask(start, processor.frozen)
    weights = mask[:start.layout.num_weights]
    assert np.any(before[..., weights] != 0.0)
    assert np.array_equal(after[..., weights], before[..., weights])
    assert not np.array_equal(after[..., ~weights], before[..., ~weights])
    assert np.array_equal(second.buffer[mask], first.buffer[mask])


@pytest.mark.parametrize("sync,faults", [
    ("gradients", "kill@1:3"), ("gradients", "kill@0:4:reduce_mid"),
    ("gradients", "kill@1:5:update_mid"), ("gradients", "kill@0:6:update_mid"),
    ("states", "kill@1:3:average"), ("states", "kill@0:4:local_step")])
def test_a_worker_dying_with_frozen_weights_ends_bitwise_as_without_the_fault(blobs, monkeypatch,
                                                                              sync, faults):
    model = _model()
    start = model.init_state(seed=9)
    x, y = blobs[0][:495], blobs[1][:495]   # 9 steps

    def run():
        with ParallelBatchProcessor(model, num_processes=2, batch_size=55, sync=sync,
                                    update_interval=2, freeze=["conv1d_3/*", "dense_8/bias"],
                                    seed=2) as processor:
            state, results = processor.run_parallel(x, y, start, {"learning_rate": 0.01})
            return state, results["restarts"], processor.frozen

    expected, _, names = run()
    monkeypatch.setenv("ENGINE_TEST_FAULTS", faults)
    state, restarts, _ = run()
    assert len(restarts) == 1
    np.testing.assert_array_equal(state.buffer, expected.buffer)
    mask = _frozen_mask(start, names)
    assert np.array_equal(state.buffer[mask], start.buffer[mask])


@pytest.mark.parametrize("batch_size", [41, 7])
def test_states_sync_with_plain_sgd_and_frozen_weights_matches_one_process(blobs, batch_size):
    """Averaging local plain-SGD steps weighted by shard size is one SGD step on the whole batch
    (the update is linear in the gradient), so with update_interval=1 states mode on 2 processes
    equals the one-process run with the same freezing, uneven shards included."""
    model = _model()
    start = model.init_state(seed=10)
    x, y = blobs[0][:batch_size], blobs[1][:batch_size]
    states = []
    for num_processes in (1, 2):
        with ParallelBatchProcessor(model, num_processes=num_processes, batch_size=batch_size,
                                    sync="states", optimizer="sgd",
                                    freeze=["conv1d_1/*", "dense_8/kernel"]) as processor:
            state = start
            for _ in range(3):
                state, _ = processor.process_batch(x, y, state, {"learning_rate": 0.05})
            states.append(state)
            mask = _frozen_mask(start, processor.frozen)
    np.testing.assert_allclose(states[1].buffer, states[0].buffer, rtol=RTOL, atol=ATOL)
    assert np.array_equal(states[1].buffer[mask], start.buffer[mask])
