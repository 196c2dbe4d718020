"""Layers that merge branches of a ``models.Graph``: Add and Concatenate."""
import numpy as np

from models.layers.base import MergeLayer


def _check_inputs(input_shapes, name):
    if len(input_shapes) < 2:
        raise ValueError(f"{name} merges at least two inputs. Received {len(input_shapes)}.")


class Add(MergeLayer):
    """Element-wise sum of inputs of one shape (a skip connection)."""

    kind = "add"

    def output_shape(self, input_shapes):
        _check_inputs(input_shapes, "Add")
        shapes = {tuple(shape) for shape in input_shapes}
        if len(shapes) != 1:
            raise ValueError(f"Add needs inputs of one shape. Received shapes {list(input_shapes)}.")
        return tuple(input_shapes[0])

    def forward(self, xs, weights, theta, *, training=False, rng=None):
        y = xs[0] + xs[1]
        for x in xs[2:]:
            y += x
        return y, len(xs)

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        return [dy if need_input_grad else None] * cache, {}


class Concatenate(MergeLayer):
    """Join inputs along the last axis; the other axes must agree."""

    kind = "concatenate"

    def output_shape(self, input_shapes):
        _check_inputs(input_shapes, "Concatenate")
        if len({tuple(shape[:-1]) for shape in input_shapes}) != 1:
            raise ValueError(f"Concatenate joins the last axis; the others must agree. Received "
                             f"shapes {list(input_shapes)}.")
        return tuple(input_shapes[0][:-1]) + (sum(shape[-1] for shape in input_shapes),)

    def forward(self, xs, weights, theta, *, training=False, rng=None):
        return np.concatenate(xs, axis=-1), np.cumsum([x.shape[-1] for x in xs])[:-1]

    def backward(self, weights, cache, dy, *, need_input_grad=True):
        if not need_input_grad:
            return [None] * (len(cache) + 1), {}
        return np.split(dy, cache, axis=-1), {}
