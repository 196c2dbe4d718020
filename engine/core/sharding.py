"""Who does what: how a batch is split into shards and which slice of the state each worker owns.

Both splits are contiguous and deterministic, so a step's result depends only on the batch, the
state and the number of workers, never on timing.
"""
import math

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


# -- frozen weights -------------------------------------------------------------------------------
# Freezing reorders nothing: the state keeps its layout, and the values that take part in a step's
# sync (the trainable weights, then theta) are numbered 0 .. size-1 in buffer order, skipping the
# frozen weights. ``partition`` splits that *compact* numbering among the workers; each worker's
# compact slice maps back to a few buffer ranges (``TrainableMap.pieces``). In sync="gradients"
# mode the gradient slots hold only the compact values, so a frozen weight takes no slot, no
# averaging and no optimizer update.


def match_frozen(weight_names, patterns, theta_names=()):
    """The weight names matched by fnmatch ``patterns`` (in buffer order).

    Args:
        weight_names: the state's weight names, in buffer order. theta_names: its theta names
            (never frozen: theta is averaged at every synchronisation; named in the error only).
        patterns: a string or a sequence of strings such as "conv1d_1/*"; None or () freezes none.
    Returns:
        a tuple of the frozen weight names.
    Raises:
        TypeError: a pattern is not a non-empty string. ValueError: a pattern matches no weight.
    """
    import fnmatch
    if patterns is None:
        return ()
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"freeze takes fnmatch patterns of weight names (non-empty strings). "
                            f"Received: {pattern!r} in freeze={list(patterns)!r}.")
    weight_names = list(weight_names)
    for pattern in patterns:
        if not fnmatch.filter(weight_names, pattern):
            theta = fnmatch.filter(list(theta_names), pattern)
            hint = (f" It matches theta {theta}, which is not trainable (theta is averaged, never "
                    "stepped)." if theta else "")
            raise ValueError(f"freeze pattern {pattern!r} matches no weight of the model.{hint} "
                             f"Known weight names: {weight_names}. Patterns are fnmatch patterns, "
                             "e.g. 'conv1d_1/*' or 'conv*'.")
    return tuple(name for name in weight_names
                 if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns))


class TrainableMap:
    """Which values of a flat state buffer take part in sync, and their compact numbering.

    ``weight_ranges`` are the buffer ranges of the trainable weights (ascending, merged); theta,
    at ``[num_weights, num_values)``, always takes part. The compact vector holds the trainable
    weights in buffer order, then theta: ``size`` values, ``num_trainable`` of them weights.
    Plain, picklable data (workers rebuild it from the workspace spec).
    """

    def __init__(self, weight_ranges, num_weights, num_values):
        self.weight_ranges = tuple((int(a), int(b)) for a, b in weight_ranges if b > a)
        self.num_weights, self.num_values = int(num_weights), int(num_values)
        self.num_trainable = sum(b - a for a, b in self.weight_ranges)
        self.size = self.num_trainable + self.num_values - self.num_weights
        # (compact_start, buffer_start, length) of every contiguous run, theta last
        self._runs, cursor = [], 0
        for start, stop in self.weight_ranges:
            self._runs.append((cursor, start, stop - start))
            cursor += stop - start
        if self.num_values > self.num_weights:
            self._runs.append((cursor, self.num_weights, self.num_values - self.num_weights))

    @classmethod
    def of(cls, layout, frozen=()):
        """The map of a StateLayout with the weights named in ``frozen`` left out."""
        frozen, ranges, offset = set(frozen), [], 0
        for name, shape in layout.weight_shapes:
            count = math.prod(map(int, shape))
            if name not in frozen and count:
                if ranges and ranges[-1][1] == offset:
                    ranges[-1][1] = offset + count
                else:
                    ranges.append([offset, offset + count])
            offset += count
        return cls(ranges, layout.num_weights, layout.size)

    @property
    def is_full(self):
        """True when nothing is frozen (compact and buffer numbering coincide)."""
        return self.num_trainable == self.num_weights

    @property
    def frozen_ranges(self):
        """Buffer ranges of the frozen weights."""
        ranges, cursor = [], 0
        for start, stop in self.weight_ranges + ((self.num_weights, self.num_weights),):
            if start > cursor:
                ranges.append((cursor, start))
            cursor = stop
        return tuple(ranges)

    def pieces(self, start, stop):
        """Buffer ranges of compact values ``[start, stop)``: ``[(buffer_start, buffer_stop,
        compact_start), ...]`` in ascending order."""
        pieces = []
        for compact, buffer, length in self._runs:
            low, high = max(start, compact), min(stop, compact + length)
            if high > low:
                pieces.append((buffer + low - compact, buffer + high - compact, low))
        return pieces

    def compact_views(self, layout, compact):
        """``(weights, theta)`` dicts of views into a compact vector: trainable weights and theta
        only (frozen weights have no place in it)."""
        weights, offset, cursor = {}, 0, 0
        trainable = [(a, b) for a, b in self.weight_ranges]
        for name, shape in layout.weight_shapes:
            count = math.prod(map(int, shape))
            if any(a <= offset and offset + count <= b for a, b in trainable) and count:
                weights[name] = compact[cursor:cursor + count].reshape(shape)
                cursor += count
            offset += count
        theta, cursor = {}, self.num_trainable
        for name, shape in layout.theta_shapes:
            count = math.prod(map(int, shape))
            theta[name] = compact[cursor:cursor + count].reshape(shape)
            cursor += count
        return weights, theta

    def __eq__(self, other):
        return isinstance(other, TrainableMap) and (self.weight_ranges, self.num_weights,
                                                    self.num_values) == (
            other.weight_ranges, other.num_weights, other.num_values)

    def __hash__(self):
        return hash((self.weight_ranges, self.num_weights, self.num_values))

    def __repr__(self):
        return (f"TrainableMap({self.num_trainable} of {self.num_weights} weights trainable, "
                f"{self.num_values - self.num_weights} theta)")
