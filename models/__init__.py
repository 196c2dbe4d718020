"""Models for the engine: numpy layers, a Sequential container, and a registry of ready models.

The model protocol
------------------
The engine trains any picklable plain-Python object (no lambdas, no open files or sockets: it is
sent to every worker process) that has:

``input_shape``
    Shape of one example without the batch axis, e.g. ``(40,)``.
``num_outputs``
    Number of classes.
``init_state(seed) -> NetworkState``
    Fresh float32 weights (and theta, if any); the same seed must give the same state.
``loss_and_grads(state, x, y, *, rng=None) -> (loss, grads)`` or ``(loss, grads, theta)``
    In training mode (dropout active, BatchNorm on batch statistics). ``x`` is float32 of shape
    ``(n, *input_shape)``, ``y`` integer labels of shape ``(n,)``. ``loss`` is the MEAN over the
    n examples of a per-example loss (softmax cross-entropy unless the model carries another, see
    ``models.losses``) as a Python float; ``grads`` maps exactly the keys of
    ``state.weights`` to float32 arrays of the same shapes: the gradient of that mean. A model with
    theta (e.g. BatchNorm running statistics) also returns ``theta``: name -> values after this
    step. ``rng`` is an ``np.random.Generator`` for dropout (``np.random.default_rng()`` if None).
    Must not modify ``state``.
``predict(state, x) -> ndarray``
    Float32 class probabilities of shape ``(n, num_outputs)``, in inference mode.
``loss(state, x, y) -> float``
    The same mean loss in inference mode, for evaluation.
``predict_and_loss(state, x, y) -> (predictions, loss)`` (optional)
    Both of the above from one forward pass; the engine's evaluation uses it when present.

Because the loss is a mean, the gradients of shards of sizes n_i combine into the full-batch
gradient when weighted by n_i / sum(n_i). ``NetworkState`` (``engine.core.state``) keeps weights and
theta in one float32 buffer; ``state.weights[name]`` and ``state.theta[name]`` are views into it.
Work in float32 (float32 arrays, ``np.float32`` scalars): one float64 operand silently doubles the
cost.

The easy way to bring a model is ``Sequential(layers, input_shape)`` over ``models.layers`` (or
``Graph(nodes, input_shape)`` for branches); any other class works as long as it follows the
protocol above. ``from_keras(keras_model)`` gives the native ``(model, state)`` of a Keras model of
supported layers and ``model.to_keras(state)`` the way back (docs/models.md).
``model.with_loss(FocalLoss(gamma=2))`` gives a copy of a Sequential or Graph model that trains
with another loss (``models.losses``).

Example:
    from models import get_model
    model = get_model("mlp", sizes=(40, 256, 10), dropout=0.1)
    state = model.init_state(seed=0)
    loss, grads = model.loss_and_grads(state, x, y)
"""
import inspect

from models.cnn1d import CNN1D
from models.losses import CrossEntropy, FocalLoss
from models.mlp import MLP
from models.graph import Graph
from models.gru import GRUClassifier
from models.keras_interop import from_keras, to_keras
from models.sequential import Sequential
from models.softmax_regression import SoftmaxRegression
from models.zoo import cnn_bilstm_attention, imu_cnn_bilstm, lstm_attention

__all__ = ["Sequential", "Graph", "from_keras", "to_keras", "SoftmaxRegression", "MLP", "CNN1D",
           "GRUClassifier", "CrossEntropy", "FocalLoss", "get_model", "available_models", "model_signature"]

_REGISTRY = {"softmax_regression": SoftmaxRegression, "mlp": MLP, "cnn1d": CNN1D,
             "imu_cnn_bilstm": imu_cnn_bilstm, "lstm_attention": lstm_attention,
             "cnn_bilstm_attention": cnn_bilstm_attention,
             "gru": GRUClassifier}  # the MNIST-1D paper's (bidirectional) GRU baseline


def available_models():
    """Registered model names -> ``"Class(signature): summary"`` describing their arguments."""
    return {name: f"{cls.__name__}{inspect.signature(cls)}: {inspect.getdoc(cls).splitlines()[0]}"
            for name, cls in _REGISTRY.items()}


def model_signature(name):
    """The ``inspect.Signature`` of a registered model's constructor (its arguments and defaults)."""
    if name.startswith("keras:"):
        from models.keras_zoo import keras_model_signature
        return keras_model_signature(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}. Known names: {sorted(_REGISTRY)}. "
                         "See models.available_models() for their arguments.")
    return inspect.signature(_REGISTRY[name])


def get_model(name, **kwargs):
    """Build a registered model by name, e.g. ``get_model("mlp", sizes=(40, 256, 10))``.

    Raises:
        ValueError: for an unknown name (the message lists the known names) or invalid arguments.
        TypeError: for arguments the model does not take (the message shows its signature).
    """
    if name.startswith("keras:"):  # the Keras zoo, trained through engine.backends.KerasModel
        from models.keras_zoo import get_keras_model
        return get_keras_model(name, **kwargs)
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}. Known names: {sorted(_REGISTRY)}. "
                         "See models.available_models() for their arguments.")
    cls = _REGISTRY[name]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as error:
        raise TypeError(f"get_model({name!r}): {error}. Received: {kwargs!r}. Expected: "
                        f"{cls.__name__}{inspect.signature(cls)}.") from None
    return cls(**kwargs)
