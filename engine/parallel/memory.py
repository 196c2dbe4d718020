"""Memory planning: refuse a run that cannot fit, and shrink micro-batches when memory runs low.

The estimate counts what the engine itself allocates: the shared workspace (state versions,
per-worker slots, the averaged vector, optimizer buffers), the shared data block, and per worker a
baseline plus a few state-sized private arrays. The baseline, 64 MiB, is a worker's unique memory
(psutil USS) measured after a step of a small MLP on this project's reference machine (54 MB) with
some headroom. Activations depend on the model and are not counted: the estimate is a floor, so a
refusal is certain to be right, and low memory during the run is handled by shrinking micro-batches.
"""
import warnings

import psutil

from engine.core.errors import InsufficientMemoryError
from engine.parallel.system import available_memory_bytes

WORKER_BASELINE_BYTES = 64 << 20
_PRIVATE_STATE_COPIES = 4  # gradient dict, flattened copy, local views, allocator slack


def low_memory_threshold_bytes():
    """Below this much available memory, workers shrink their micro-batches."""
    return max(512 << 20, psutil.virtual_memory().total // 20)


def estimate_run_bytes(shared_bytes, num_workers, state_bytes):
    return shared_bytes + num_workers * (WORKER_BASELINE_BYTES + _PRIVATE_STATE_COPIES * state_bytes)


def check_fits(shared_bytes, num_workers, state_bytes):
    """Raise InsufficientMemoryError when the run's floor estimate exceeds available memory."""
    needed = estimate_run_bytes(shared_bytes, num_workers, state_bytes)
    available = available_memory_bytes()
    if needed > available:
        raise InsufficientMemoryError(needed, available, num_workers)
    return needed


class MicroBatchGovernor:
    """Halves the per-worker micro-batch when available memory drops below the threshold.

    Gradients of the chunks are accumulated, so the global batch and the maths stay the same; only
    peak activation memory shrinks. Checks at most every ``interval_s`` seconds (a psutil call).
    """

    def __init__(self, interval_s=0.5):
        self.interval_s, self._last_check, self._warned = interval_s, float("-inf"), False

    def adjust(self, now, current_micro_batch, largest_shard):
        """Return the micro-batch to use from now on (0 means the whole shard)."""
        if now - self._last_check < self.interval_s:
            return current_micro_batch
        self._last_check = now
        if available_memory_bytes() >= low_memory_threshold_bytes():
            return current_micro_batch
        effective = current_micro_batch or largest_shard
        smaller = max(1, effective // 2)
        if smaller == effective:
            return current_micro_batch
        if not self._warned:
            self._warned = True
            warnings.warn(f"available memory is below {low_memory_threshold_bytes() >> 20} MiB: "
                          f"workers now process their shards in micro-batches of {smaller} "
                          "examples (gradients are accumulated, the maths is unchanged).",
                          RuntimeWarning, stacklevel=4)
        return smaller
