"""Memory planning: a run that cannot fit is refused before anything starts; low memory during a
run shrinks micro-batches without changing the maths."""
import numpy as np
import pytest

import engine.parallel.memory
from engine import InsufficientMemoryError, ParallelBatchProcessor
from models import MLP


def test_a_run_that_cannot_fit_is_refused_with_the_numbers(blobs, monkeypatch, live_children):
    monkeypatch.setattr(engine.parallel.memory, "available_memory_bytes", lambda: 10 << 20)
    model = MLP(sizes=(12, 8, 3))
    with ParallelBatchProcessor(model, num_processes=2, batch_size=50) as processor:
        with pytest.raises(InsufficientMemoryError, match=r"needs at least .* GiB .* 2 workers"):
            processor.run_parallel(*blobs, model.init_state(0), {"learning_rate": 0.1})
        assert not live_children()


def test_estimate_counts_shared_blocks_and_each_worker():
    one = engine.parallel.memory.estimate_run_bytes(1000, 1, 400)
    two = engine.parallel.memory.estimate_run_bytes(1000, 2, 400)
    assert two - one == engine.parallel.memory.WORKER_BASELINE_BYTES + 4 * 400
    assert one > 1000


def _passes(processor, blobs, state, count):
    changes = []
    for _ in range(count):
        state, results = processor.run_parallel(*blobs, state, {"learning_rate": 0.1})
        changes += results["micro_batch_changes"]
    return state, changes


def test_low_memory_halves_the_micro_batch_and_keeps_the_result(blobs, monkeypatch):
    # The owner checks memory at the start of every pass (and every half second within one).
    model = MLP(sizes=(12, 16, 3))
    start = model.init_state(0)
    options = dict(num_processes=2, batch_size=100, optimizer="sgd", seed=2)
    with ParallelBatchProcessor(model, **options) as processor:
        expected, _ = _passes(processor, blobs, start, 7)
    calls = iter([1 << 40] * 2 + [1 << 20] * 1000)  # plenty at first, then almost nothing
    monkeypatch.setattr(engine.parallel.memory, "available_memory_bytes", lambda: next(calls))
    with ParallelBatchProcessor(model, **options) as processor:
        processor._governor.interval_s = 0.0
        with pytest.warns(RuntimeWarning, match="micro-batches of 25"):
            state, changes = _passes(processor, blobs, start, 7)
    sizes = [change["micro_batch_size"] for change in changes]
    assert sizes[:3] == [25, 12, 6] and sizes[-1] == 1
    np.testing.assert_allclose(state.buffer, expected.buffer, rtol=1e-4, atol=1e-6)
