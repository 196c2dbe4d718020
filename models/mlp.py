"""MLP: fully connected ReLU network with optional BatchNorm and Dropout."""
import numbers

import numpy as np

from models.layers.base import check_num_classes, is_positive_int
from models.layers import BatchNorm, Dense, Dropout, ReLU
from models.sequential import Sequential


class MLP(Sequential):
    """Dense -> [BatchNorm] -> ReLU -> [Dropout] per hidden layer, then Dense to the logits.

    Args:
        sizes: ``(input_dim, hidden..., num_classes)``, e.g. ``(784, 1024, 512, 10)``; two sizes
            give softmax regression.
        dropout: rate of the Dropout after each hidden ReLU, in [0, 1); 0 adds no Dropout layer.
        batchnorm: add a BatchNorm after each hidden Dense (its running statistics are theta).
    """

    def __init__(self, sizes, *, dropout=0.0, batchnorm=False):
        if (not isinstance(sizes, (tuple, list)) or len(sizes) < 2
                or not all(is_positive_int(size) for size in sizes)):
            raise ValueError(f"sizes must be a tuple of at least 2 positive ints: (input_dim, "
                             f"hidden..., num_classes). Received: sizes={sizes!r}. "
                             "Example: MLP(sizes=(784, 256, 10)).")
        check_num_classes(sizes[-1])
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a float in [0, 1). Received: dropout={dropout!r}. "
                             "Use dropout=0.0 for no dropout.")
        if not isinstance(batchnorm, (bool, np.bool_)):
            raise ValueError(f"batchnorm must be True or False. Received: batchnorm={batchnorm!r}.")
        self.sizes = tuple(int(s) for s in sizes)
        self.dropout, self.batchnorm = float(dropout), bool(batchnorm)
        layers = []
        for width in self.sizes[1:-1]:
            layers.append(Dense(width))
            if self.batchnorm:
                layers.append(BatchNorm())
            layers.append(ReLU())
            if self.dropout:
                layers.append(Dropout(self.dropout))
        layers.append(Dense(self.sizes[-1], init="glorot"))
        super().__init__(layers, input_shape=(self.sizes[0],))

    def __repr__(self):
        return f"MLP(sizes={self.sizes!r}, dropout={self.dropout!r}, batchnorm={self.batchnorm!r})"
