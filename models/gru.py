"""GRUClassifier: a (bidirectional) GRU over a sequence, every timestep's state into one Dense."""
import numpy as np

from models.layers import Dense, Flatten, Reshape
from models.layers.base import check_num_classes, check_positive_int, is_positive_int
from models.layers.recurrent import GRU, Bidirectional
from models.sequential import Sequential


class GRUClassifier(Sequential):
    """GRU(units, sequences) [bidirectional] -> Flatten -> Dense(num_classes) logits.

    The defaults are the MNIST-1D paper's GRU baseline (Greydanus, 2020): a bidirectional GRU with
    6 units over the 40 positions of a one-channel signal, all 40 x 12 states into one linear layer
    (5,134 weights). The GRU is Keras's (``reset_after=True``, as PyTorch's).

    Args:
        input_shape: ``(timesteps,)`` for one channel or ``(timesteps, features)``.
        num_classes: number of classes (>= 2).
        units: GRU units per direction.
        bidirectional: add a time-reversed GRU and concatenate the two.
    """

    def __init__(self, input_shape=(40,), num_classes=10, units=6, *, bidirectional=True):
        if isinstance(input_shape, (int, np.integer)):
            input_shape = (input_shape,)
        if (not isinstance(input_shape, (tuple, list)) or len(input_shape) not in (1, 2)
                or not all(is_positive_int(d) for d in input_shape)):
            raise ValueError(f"input_shape must be (timesteps,) or (timesteps, features) of "
                             f"positive ints. Received: input_shape={input_shape!r}.")
        if not isinstance(bidirectional, (bool, np.bool_)):
            raise ValueError(f"bidirectional must be True or False. Received: "
                             f"bidirectional={bidirectional!r}.")
        input_shape = tuple(int(d) for d in input_shape)
        self.units, self.bidirectional = check_positive_int(units, "units"), bool(bidirectional)
        recurrent = GRU(self.units, return_sequences=True)
        layers = [Reshape(input_shape + (1,))] if len(input_shape) == 1 else []
        layers += [Bidirectional(recurrent) if self.bidirectional else recurrent, Flatten(),
                   Dense(check_num_classes(num_classes), init="glorot")]
        super().__init__(layers, input_shape=input_shape)

    def __repr__(self):
        return (f"GRUClassifier(input_shape={self.input_shape!r}, num_classes={self.num_outputs}, "
                f"units={self.units}, bidirectional={self.bidirectional!r})")
