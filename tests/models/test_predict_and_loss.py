"""predict_and_loss: one forward pass giving exactly what predict and loss give separately."""
import numpy as np

from models import CNN1D, MLP


def test_predict_and_loss_equals_predict_and_loss_called_apart():
    rng = np.random.default_rng(0)
    for model, x in ((MLP(sizes=(6, 5, 3), batchnorm=True), rng.normal(size=(9, 6))),
                     (CNN1D(input_shape=(12,), num_classes=3, channels=2), rng.normal(size=(9, 12)))):
        x = x.astype(np.float32)
        y = rng.integers(0, 3, size=9)
        state = model.init_state(1)
        predictions, loss = model.predict_and_loss(state, x, y)
        np.testing.assert_array_equal(predictions, model.predict(state, x))
        assert loss == model.loss(state, x, y)
