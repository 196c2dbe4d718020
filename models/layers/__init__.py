"""Layers with a forward and a backward pass (float32, numpy BLAS plus numba kernels).

The layer contract (``forward``/``backward``/``updated_theta``) is documented in
``models.layers.base``; each module holds one family of layers (docs/models.md lists them).
"""
from models.layers.attention import AttentionPooling, MultiHeadSelfAttention
from models.layers.base import Layer, MergeLayer
from models.layers.basic import (BatchNorm, BinaryLogits, Dense, Dropout, Flatten, Identity, ReLU,
                                 Reshape, softmax, softmax_cross_entropy)
from models.layers.conv import Conv1D
from models.layers.merge import Add, Concatenate
from models.layers.norm import LayerNorm
from models.layers.pooling import GlobalAveragePooling1D, MaxPool1D
from models.layers.recurrent import GRU, LSTM, Bidirectional

__all__ = ["Layer", "MergeLayer", "Dense", "Identity", "ReLU", "Dropout", "Reshape", "Flatten",
           "BatchNorm", "BinaryLogits", "Conv1D", "MaxPool1D", "GlobalAveragePooling1D",
           "LayerNorm", "AttentionPooling", "MultiHeadSelfAttention", "LSTM", "GRU",
           "Bidirectional", "Add", "Concatenate", "softmax", "softmax_cross_entropy"]
