"""Sanity check that training actually learns: plain gradient descent on a separable problem."""
import numpy as np

from models import MLP


def test_mlp_learns_a_separable_problem_with_plain_gradient_descent():
    # Three classes in 10-D, labelled by which of three fixed directions a point projects on most:
    # separable, but not linearly by a single threshold, so the hidden layer has to do some work.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 10)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((10, 3)), axis=1)
    model = MLP(sizes=(10, 32, 3))
    state = model.init_state(seed=0)
    initial = model.loss(state, x, y)
    for _ in range(200):
        _, grads = model.loss_and_grads(state, x, y)
        for name, grad in grads.items():
            state.weights[name] -= np.float32(0.5) * grad
    assert model.loss(state, x, y) < 0.2 * initial
    assert np.mean(model.predict(state, x).argmax(axis=1) == y) > 0.95
