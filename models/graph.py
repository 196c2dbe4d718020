"""Graph: layers wired as a directed acyclic graph (branches, skips, merges), next to Sequential.

Nodes are listed in order, each naming the nodes it reads ("input" is the model's input), so a run
is one pass down the list and the backward pass one pass up it. A node read by several others
(a branch point) receives the sum of their gradients. It implements the model protocol of
``models/__init__.py`` with the same loss handling as ``Sequential`` (``models.sequential``).
"""
import numpy as np

from engine.core.state import NetworkState
from models.layers.base import Layer, MergeLayer
from models.sequential import LayerModel, check_input_shape, check_loss_fn

INPUT = "input"


class Graph(LayerModel):
    """A graph of layers ending in logits, trained with mean softmax cross-entropy (or ``loss_fn``).

    Parameters are named ``"{node}/{local name}"``: ``"conv1/kernel"``, ``"conv_bn/running_mean"``.

    Args:
        nodes: ``(name, layer, inputs)`` triples in an order where every node comes after the nodes
            it reads; ``inputs`` is a node name (``"input"`` for the model's input) or, for a
            ``MergeLayer`` (Add, Concatenate), a list of names.
        input_shape: shape of one example, without the batch axis.
        output: the node whose output is the logits (default: the last one).
        loss_fn: None (softmax cross-entropy) or a loss from ``models.losses``.

    Raises:
        ValueError: for a repeated or malformed name, an input not defined before its node, a node
            the output does not depend on, or a layer that does not fit its input shapes.
    """

    def __init__(self, nodes, input_shape, *, output=None, loss_fn=None):
        self.input_shape = check_input_shape(input_shape)
        self.loss_fn = check_loss_fn(loss_fn)
        self.nodes = [self._check_node(node) for node in nodes]
        if not self.nodes:
            raise ValueError("nodes must hold at least one (name, layer, inputs) triple.")
        self.output = self.nodes[-1][0] if output is None else output
        shapes = {INPUT: self.input_shape}
        self.weight_shapes, self.theta_shapes = {}, {}
        self._names = {}  # node -> ([(local, full name)] of weights, the same of theta)
        self._uses_rng = False
        for name, layer, inputs in self.nodes:
            if name in shapes:
                raise ValueError(f"node names must be unique and not {INPUT!r}. Received {name!r} "
                                 "twice.")
            missing = [i for i in inputs if i not in shapes]
            if missing:
                raise ValueError(f"node {name!r} reads {missing}, not defined before it. List the "
                                 f"nodes so that each comes after its inputs (defined: "
                                 f"{list(shapes)}).")
            in_shapes = [shapes[i] for i in inputs]
            in_shape = in_shapes if isinstance(layer, MergeLayer) else in_shapes[0]
            try:
                shapes[name] = tuple(layer.output_shape(in_shape))
            except ValueError as error:
                raise ValueError(f"node {name!r} ({layer!r}): {error}") from None
            names = []
            for table, local_shapes in ((self.weight_shapes, layer.weight_shapes(in_shape)),
                                        (self.theta_shapes, layer.theta_shapes(in_shape))):
                names.append([(local, f"{name}/{local}") for local in local_shapes])
                table.update({f"{name}/{local}": tuple(s) for local, s in local_shapes.items()})
            self._names[name] = names
            self._uses_rng |= layer.uses_rng
        if self.output not in shapes or self.output == INPUT:
            raise ValueError(f"output must name a node. Received: output={self.output!r}.")
        if len(shapes[self.output]) != 1:
            raise ValueError(f"the output node must give (n, num_outputs) logits. Received output "
                             f"shape {shapes[self.output]} per example from {self.output!r}.")
        self.num_outputs = shapes[self.output][0]
        self._shapes = shapes
        used = self._ancestors(self.output)
        unused = [name for name, _, _ in self.nodes if name not in used]
        if unused:
            raise ValueError(f"nodes {unused} do not lead to the output {self.output!r}. Remove "
                             "them or make the output depend on them.")
        # A node needs its output gradient when it, or a node it reads from, has weights.
        self._needs_grad = {INPUT: False}
        for name, layer, inputs in self.nodes:
            self._needs_grad[name] = (bool(self._names[name][0])
                                      or any(self._needs_grad[i] for i in inputs))

    @staticmethod
    def _check_node(node):
        if not isinstance(node, (tuple, list)) or len(node) != 3:
            raise ValueError(f"each node is a (name, layer, inputs) triple. Received: {node!r}.")
        name, layer, inputs = node
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"a node name is a non-empty str without '/'. Received: {name!r}.")
        if not isinstance(layer, Layer):
            raise ValueError(f"node {name!r}: the layer must be a models.layers.Layer. Received: "
                             f"{layer!r}.")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        merge = isinstance(layer, MergeLayer)
        if not all(isinstance(i, str) for i in inputs) or (len(inputs) != 1 and not merge) or (
                merge and len(inputs) < 2):
            raise ValueError(f"node {name!r}: inputs must be one node name, or a list of two or "
                             f"more for a merge layer (Add, Concatenate). Received: {inputs!r}.")
        return name, layer, inputs

    def _ancestors(self, name):
        reads = {node: inputs for node, _, inputs in self.nodes}
        seen, todo = set(), [name]
        while todo:
            current = todo.pop()
            if current in seen or current == INPUT:
                continue
            seen.add(current)
            todo.extend(reads[current])
        return seen

    def _local(self, table, name, kind=0):
        """The node's arrays by local name: weights (kind 0) or theta (kind 1)."""
        return {local: table[full] for local, full in self._names[name][kind]}

    def _in_shape(self, layer, inputs):
        shapes = [self._shapes[i] for i in inputs]
        return shapes if isinstance(layer, MergeLayer) else shapes[0]

    def init_state(self, seed):
        """A new ``NetworkState``; the same ``seed`` always gives the same float32 values."""
        rng = np.random.default_rng(seed)
        weights, theta = {}, {}
        for name, layer, inputs in self.nodes:
            shape = self._in_shape(layer, inputs)
            weights.update({f"{name}/{k}": v for k, v in layer.init_weights(shape, rng).items()})
            theta.update({f"{name}/{k}": v for k, v in layer.init_theta(shape).items()})
        return NetworkState(weights, theta)

    def logits(self, weights, theta, x, *, training=False, rng=None):
        """The output node's values for ``x``, from plain dicts of arrays, in ``x``'s dtype."""
        return self._forward(weights, theta, x, training=training, rng=rng)[0]

    def _forward(self, weights, theta, x, *, training, rng):
        values, caches = {INPUT: x}, {}
        for name, layer, inputs in self.nodes:
            xs = [values[i] for i in inputs]
            values[name], caches[name] = layer.forward(
                xs if isinstance(layer, MergeLayer) else xs[0], self._local(weights, name),
                self._local(theta, name, 1), training=training, rng=rng)
        return values[self.output], caches

    def forward_backward(self, weights, theta, x, y, *, rng=None):
        """The dtype-generic core of ``loss_and_grads`` on plain dicts of arrays, unchecked.

        Returns ``(loss, grads, new_theta)``; runs in float64 when given float64 arrays.
        """
        if rng is None and self._uses_rng:
            rng = np.random.default_rng()
        logits, caches = self._forward(weights, theta, x, training=True, rng=rng)
        loss, gradient = self._value_and_grad(logits, y)
        pending, grads = {self.output: gradient}, {}
        for name, layer, inputs in reversed(self.nodes):
            if name not in pending:  # nothing upstream of it has weights
                continue
            need_input = any(self._needs_grad[i] for i in inputs)
            dxs, layer_grads = layer.backward(self._local(weights, name), caches[name],
                                              pending.pop(name), need_input_grad=need_input)
            grads.update({f"{name}/{k}": v for k, v in layer_grads.items()})
            if not need_input:
                continue
            dxs = dxs if isinstance(layer, MergeLayer) else [dxs]
            for source, dx in zip(inputs, dxs):
                if self._needs_grad[source]:
                    # A new array, never +=: a layer may hand back views of its dy (Add does).
                    pending[source] = pending[source] + dx if source in pending else dx
        new_theta = {}
        for name, layer, _ in self.nodes:
            local = self._local(theta, name, 1)
            if local:
                new_theta.update({f"{name}/{k}": v
                                  for k, v in layer.updated_theta(local, caches[name]).items()})
        return loss, {key: grads[key] for key in self.weight_shapes}, new_theta

    def __repr__(self):
        loss = "" if self.loss_fn is None else f", loss_fn={self.loss_fn!r}"
        return (f"Graph({self.nodes!r}, input_shape={self.input_shape!r}, "
                f"output={self.output!r}{loss})")
