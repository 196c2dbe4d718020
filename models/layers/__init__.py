"""Layers with a forward and a backward pass (float32, numpy BLAS plus numba kernels).

The layer contract (``forward``/``backward``/``updated_theta``) is documented in
``models.layers.base``; each module holds one family of layers.
"""
from models.layers.base import Layer
from models.layers.basic import (BatchNorm, Dense, Dropout, Flatten, ReLU, Reshape, softmax,
                                 softmax_cross_entropy)
from models.layers.conv import Conv1D

__all__ = ["Layer", "Dense", "ReLU", "Dropout", "Reshape", "Flatten", "BatchNorm", "Conv1D",
           "softmax", "softmax_cross_entropy"]
