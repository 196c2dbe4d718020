"""Native models write their gradients into the engine's slot when given ``out=``: the same
values as returned gradients, in the given arrays, with Dense writing from its matrix product."""
import numpy as np
import pytest

from engine.core.protocol import loss_and_grads_options
from models import CNN1D, MLP


@pytest.mark.parametrize("model", [MLP(sizes=(12, 16, 8, 3), dropout=0.2),
                                   MLP(sizes=(12, 16, 3), batchnorm=True),
                                   CNN1D(input_shape=(40,), num_classes=10, channels=4)],
                         ids=["mlp-dropout", "mlp-batchnorm", "cnn1d"])
def test_gradients_written_into_out_equal_the_returned_ones(model):
    rng = np.random.default_rng(0)
    state = model.init_state(0)
    x = rng.normal(size=(9, *model.input_shape)).astype(np.float32)
    y = rng.integers(0, model.num_outputs, size=9)
    expected = model.loss_and_grads(state, x, y, rng=np.random.default_rng(1))
    out = {name: np.full(view.shape, np.nan, np.float32) for name, view in state.weights.items()}
    got = model.loss_and_grads(state, x, y, rng=np.random.default_rng(1), out=out)
    assert got[0] == expected[0]
    assert all(got[1][name] is out[name] for name in out)
    for name in out:
        np.testing.assert_array_equal(out[name], expected[1][name])
    assert loss_and_grads_options(model) == (True, True)
