"""CNN1D: strided 1-D convolutions then one Dense layer; by default the MNIST-1D paper's ConvBase."""
import numpy as np

from models.layers.base import check_num_classes, check_positive_int, is_positive_int
from models.layers import BatchNorm, Conv1D, Dense, Flatten, Identity, ReLU, Reshape
from models.sequential import Sequential


class CNN1D(Sequential):
    """Conv1D -> [BatchNorm] -> ReLU per kernel size, then Flatten and Dense to the logits.

    The defaults are ConvBase from the MNIST-1D paper (Greydanus, 2020): three convolutions with 25
    channels (kernel 5, 3, 3; stride 2; padding 1) and Dense(125 -> 10), 5,210 weights for inputs
    of length 40. Inputs are channels-last, so the Dense kernel's rows are in (position, channel)
    order where PyTorch's ConvBase flattens (channel, position): same model, rows permuted.

    Args:
        input_shape: ``(length,)`` for one channel or ``(length, channels)``.
        num_classes: number of classes (>= 2).
        channels: filters of every convolution.
        kernel_sizes, strides: one entry per convolution.
        padding: zeros added on each side of every convolution's input.
        batchnorm: add a BatchNorm after each convolution (its running statistics are theta).
    """

    def __init__(self, input_shape=(40,), num_classes=10, channels=25, *, kernel_sizes=(5, 3, 3),
                 strides=(2, 2, 2), padding=1, batchnorm=False):
        if isinstance(input_shape, (int, np.integer)):
            input_shape = (input_shape,)
        if (not isinstance(input_shape, (tuple, list)) or len(input_shape) not in (1, 2)
                or not all(is_positive_int(d) for d in input_shape)):
            raise ValueError(f"input_shape must be (length,) or (length, channels) of positive ints. "
                             f"Received: input_shape={input_shape!r}.")
        input_shape = tuple(int(d) for d in input_shape)
        if (not isinstance(kernel_sizes, (tuple, list)) or not isinstance(strides, (tuple, list))
                or not kernel_sizes or len(kernel_sizes) != len(strides)):
            raise ValueError(f"kernel_sizes and strides need one entry per convolution, at least "
                             f"one. Received: kernel_sizes={kernel_sizes!r}, strides={strides!r}.")
        if not isinstance(batchnorm, (bool, np.bool_)):
            raise ValueError(f"batchnorm must be True or False. Received: batchnorm={batchnorm!r}.")
        self.channels = check_positive_int(channels, "channels")
        self.kernel_sizes, self.strides, self.padding = tuple(kernel_sizes), tuple(strides), padding
        self.batchnorm = bool(batchnorm)
        layers = [Reshape(input_shape + (1,))] if len(input_shape) == 1 else []
        for kernel_size, stride in zip(kernel_sizes, strides):
            if self.batchnorm:
                layers += [Conv1D(self.channels, kernel_size, stride=stride, padding=padding),
                           BatchNorm(), ReLU()]
            else:
                # The ReLU runs fused in the convolution's bias pass (one pass over the output
                # instead of three); Identity keeps its place, so the parameter names
                # (conv1d_0, conv1d_2, ..., dense_7) and older checkpoints stay valid.
                layers += [Conv1D(self.channels, kernel_size, stride=stride, padding=padding,
                                  activation="relu"), Identity()]
        layers += [Flatten(), Dense(check_num_classes(num_classes), init="glorot")]
        super().__init__(layers, input_shape=input_shape)

    def __repr__(self):
        return (f"CNN1D(input_shape={self.input_shape!r}, num_classes={self.num_outputs}, "
                f"channels={self.channels}, kernel_sizes={self.kernel_sizes!r}, "
                f"strides={self.strides!r}, padding={self.padding!r}, batchnorm={self.batchnorm!r})")
