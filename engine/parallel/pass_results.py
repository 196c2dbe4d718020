"""A pass's results from the workers' records, and its per-step learning rates.

Plain functions of arrays, apart from the processor so that the one results builder (what
``run_parallel`` and ``process_batch`` return, per step) reads in one place.
"""
import numpy as np

from engine.core.validation import check_learning_rate
from engine.parallel import workspace as ws


def step_learning_rates(learning_rate, base, num_steps):
    """The rate of each step of the pass: a number as it is, or a schedule of the global step
    called once per step (each value checked)."""
    if not callable(learning_rate):
        return learning_rate
    return [check_learning_rate(learning_rate(base + k), base + k) for k in range(num_steps)]


def collect_results(records, learning_rates, kind, sync, began, ended):
    """Per-step results from the workers' records (steps x workers x fields)."""
    counts = records[:, :, ws.R_COUNT]
    examples = counts.sum(axis=1)
    loss = (counts * records[:, :, ws.R_LOSS]).sum(axis=1) / np.maximum(examples, 1)
    # The step waits for its slowest worker; each worker's own compute shows the imbalance.
    worker_compute_s = records[:, :, ws.R_COMPUTE_S].copy()
    compute_s = worker_compute_s.max(axis=1)
    started = records[:, 0, ws.R_STARTED]
    if kind == ws.TRAIN and sync == "gradients":
        computed, finished = records[:, 0, ws.R_COMPUTED], records[:, 0, ws.R_ENDED]
        # A step lasts from its start to the next one's (the work between steps counts too).
        wall_s = np.diff(np.append(started, finished[-1:]))
        sync_s = finished - computed
        wait_s = np.maximum(0.0, (computed - started) - compute_s)
        grad_norm = np.sqrt(records[:, :, ws.R_SUM_SQUARES].sum(axis=1))
    else:  # no barrier per step: a step lasts until the next one starts
        wall_s = np.diff(np.append(started, ended))
        sync_s = np.maximum(0.0, wall_s - compute_s)
        wait_s = np.zeros(len(records))
        grad_norm = np.full(len(records), np.nan)
    results = dict(loss=loss, examples=examples.astype(np.int64), compute_s=compute_s,
                   sync_s=sync_s, wait_s=wait_s, wall_s=wall_s, grad_norm=grad_norm,
                   learning_rate=np.array(learning_rates, dtype=np.float64).copy()
                   if kind == ws.TRAIN else np.full(len(records), np.nan),
                   worker_compute_s=worker_compute_s)
    results["mean_loss"] = float(np.dot(loss, examples) / max(1, examples.sum()))
    return results
