"""Who does what: how a batch is split into shards and which slice of the state each worker owns.

Both splits are contiguous and deterministic, so a step's result depends only on the batch, the
state and the number of workers, never on timing.
"""
import numpy as np

# Slices of the state start on 64-byte boundaries (16 float32) so two workers never write the same
# cache line during the reduce-scatter.
_ALIGN = 16


def split_batch(batch_size, num_workers):
    """Shard bounds (num_workers + 1,) of a batch: sizes differ by at most one, larger ones first."""
    base, extra = divmod(batch_size, num_workers)
    sizes = [base + (1 if i < extra else 0) for i in range(num_workers)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def partition(length, num_workers):
    """Slice bounds (num_workers + 1,) of a buffer of ``length`` values, aligned to 16 values."""
    chunk = -(-length // num_workers)
    chunk = -(-chunk // _ALIGN) * _ALIGN
    bounds = np.minimum(np.arange(num_workers + 1, dtype=np.int64) * chunk, length)
    bounds[-1] = length
    return bounds


def shard_coefficients(counts):
    """Weights of each worker's contribution: its number of examples over the total."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("cannot average over shards holding no examples.")
    return counts / total
