"""Whether a call passes the same data set as the last one, so its copy in shared memory is reused.

Apart from the processor because it is one self-contained rule (the objects themselves, weakly,
their memory, shape and dtype, and a fingerprint of rows), documented in ``run_parallel``.
"""
import weakref

import numpy as np

_FINGERPRINT_ROWS = 64


def data_key(examples, labels):
    """What identifies a data set between calls: the array objects themselves (weakly), their
    memory, shape and dtype, and the bytes of a fingerprint of rows spread over them."""
    if not (isinstance(examples, np.ndarray) and isinstance(labels, np.ndarray)) or \
            examples.ndim == 0 or labels.ndim != 1 or len(examples) == 0 or \
            len(labels) != len(examples):
        return None  # not reusable: check_data says what is wrong
    rows = np.unique(np.linspace(0, len(examples) - 1, _FINGERPRINT_ROWS).astype(np.int64))
    fingerprint = hash(np.ascontiguousarray(examples[rows]).tobytes() +
                       np.ascontiguousarray(labels[rows % len(labels)]).tobytes())
    return (_Same(examples), _Same(labels), examples.shape, examples.dtype.str,
            examples.__array_interface__["data"][0], labels.shape, labels.dtype.str,
            labels.__array_interface__["data"][0], fingerprint)


class _Same:
    """Equal only to a key of the very same (still living) object."""

    def __init__(self, obj):
        self._ref = weakref.ref(obj)

    def __eq__(self, other):
        return isinstance(other, _Same) and self._ref() is not None and self._ref() is other._ref()

    def __hash__(self):
        return id(self._ref())
