"""Freezing a Keras model's layers by name in the engine: the frozen arrays stay bitwise, and one
plain-SGD step moves every other array as the unfrozen step does, to float32 rounding (a
gradient does not depend on which weights will be stepped), on 2 worker processes."""
import functools

import numpy as np
import pytest

from engine import ParallelBatchProcessor
from engine.backends import KerasModel
from keras_oracle import conv_lstm


@pytest.mark.slow
def test_a_frozen_keras_layer_stays_and_the_rest_steps_as_without_freezing():
    model = KerasModel(functools.partial(conv_lstm))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 12, 5)).astype(np.float32)
    y = rng.integers(0, 4, 16)
    states, frozen = [], None
    for freeze in (None, ["lstm/*"]):
        with ParallelBatchProcessor(model, num_processes=2, batch_size=16, optimizer="sgd",
                                    freeze=freeze) as processor:
            start = model.init_state(0)
            state, _ = processor.process_batch(x, y, start, {"learning_rate": 0.5})
            states.append(state)
            frozen = processor.frozen or frozen
    assert frozen and all(name.startswith("lstm/") for name in frozen)
    for name, before in start.weights.items():
        if name in frozen:
            assert np.array_equal(states[1].weights[name], before), name
            assert not np.array_equal(states[0].weights[name], before), name
        else:
            np.testing.assert_allclose(states[1].weights[name], states[0].weights[name],
                                       rtol=1e-6, atol=1e-7, err_msg=name)
