"""The model contract is checked by a dry run in the parent before any worker starts: each
violation gets a clear error naming the method, the key, what was expected and what was found;
``rng`` and ``out`` are passed only to models that take them."""
import numpy as np
import pytest

from engine import EngineError, NetworkState, ParallelBatchProcessor
from engine.core.protocol import ModelContractError
from models import SoftmaxRegression

FEATURES, CLASSES = 4, 3


class ThreeArgumentModel:
    """Softmax regression written to the bare protocol: loss_and_grads(state, x, y), no rng."""

    input_shape, num_outputs = (FEATURES,), CLASSES

    def __init__(self):
        self._reference = SoftmaxRegression(input_dim=FEATURES, num_classes=CLASSES)

    def init_state(self, seed):
        return self._reference.init_state(seed)

    def loss_and_grads(self, state, x, y):
        return self._reference.loss_and_grads(state, x, y)

    def predict(self, state, x):
        return self._reference.predict(state, x)


class Broken(ThreeArgumentModel):
    """A model that breaks one rule of the contract, chosen by ``fault``."""

    def __init__(self, fault):
        super().__init__()
        self.fault = fault

    def loss_and_grads(self, state, x, y):
        loss, grads = super().loss_and_grads(state, x, y)
        name = sorted(grads)[0]
        if self.fault == "broadcast_shape":
            grads[name] = grads[name][:1]
        elif self.fault == "missing_key":
            del grads[name]
        elif self.fault == "extra_key":
            grads["surprise"] = np.zeros(1, np.float32)
        elif self.fault == "vector_loss":
            loss = np.full(len(x), loss)
        elif self.fault == "nan_loss":
            loss = float("nan")
        elif self.fault == "string_grad":
            grads[name] = np.array(["x"] * grads[name].size).reshape(grads[name].shape)
        elif self.fault == "not_a_tuple":
            return {"loss": loss}
        elif self.fault == "modifies_state":
            state.weights[name][...] += 1.0
        return loss, grads

    def predict(self, state, x):
        predictions = super().predict(state, x)
        return predictions[:1] if self.fault == "one_row_predict" else predictions


def _data(rows=30):
    rng = np.random.default_rng(0)
    return rng.normal(size=(rows, FEATURES)).astype(np.float32), rng.integers(0, CLASSES, rows)


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_a_three_argument_loss_and_grads_trains_on_any_process_count(num_processes):
    x, y = _data()
    model = ThreeArgumentModel()
    with ParallelBatchProcessor(model, num_processes=num_processes, batch_size=10,
                                optimizer="sgd") as processor:
        state, results = processor.run_parallel(x, y, model.init_state(0),
                                                {"learning_rate": 0.1})
    with ParallelBatchProcessor(model, num_processes=1, batch_size=10,
                                optimizer="sgd") as oracle:
        expected, _ = oracle.run_parallel(x, y, model.init_state(0), {"learning_rate": 0.1})
    np.testing.assert_allclose(state.buffer, expected.buffer, rtol=1e-4, atol=1e-6)
    assert len(results["loss"]) == 3


@pytest.mark.parametrize("fault,method,words", [
    ("broadcast_shape", "loss_and_grads", ["shape", "no broadcasting"]),
    ("missing_key", "loss_and_grads", ["Missing ["]),
    ("extra_key", "loss_and_grads", ["unexpected ['surprise']"]),
    ("vector_loss", "loss_and_grads", ["0-d array"]),
    ("nan_loss", "loss_and_grads", ["not finite"]),
    ("string_grad", "loss_and_grads", ["castable to float32"]),
    ("not_a_tuple", "loss_and_grads", ["(loss, grads)"]),
    ("modifies_state", "loss_and_grads", ["must not modify the state"]),
    ("one_row_predict", "predict", ["shape (2, 3)", "Found shape (1, 3)"]),
])
@pytest.mark.parametrize("num_processes", [1, 2])
def test_each_contract_violation_is_named_before_any_worker_starts(fault, method, words,
                                                                   num_processes, live_children):
    x, y = _data()
    model = Broken(fault)
    with ParallelBatchProcessor(model, num_processes=num_processes, batch_size=10) as processor:
        with pytest.raises(ModelContractError) as caught:
            processor.run_parallel(x, y, model.init_state(0), {"learning_rate": 0.1})
        assert processor.worker_pids == [] and not live_children()
    message = str(caught.value)
    assert message.startswith(f"{method}:") and "models/__init__.py" in message
    for word in words:
        assert word in message
    assert isinstance(caught.value, (TypeError, ValueError, EngineError))


def test_a_state_modified_by_the_dry_run_is_restored():
    x, y = _data()
    model = Broken("modifies_state")
    state = model.init_state(0)
    before = state.buffer.copy()
    with ParallelBatchProcessor(model, num_processes=1, batch_size=10) as processor:
        with pytest.raises(ModelContractError):
            processor.run_parallel(x, y, state, {"learning_rate": 0.1})
    np.testing.assert_array_equal(state.buffer, before)


class WritesIntoOut(ThreeArgumentModel):
    """Takes ``out=``: writes its gradients into the views it is given and returns them."""

    def __init__(self):
        super().__init__()
        self.calls_with_out = 0

    def loss_and_grads(self, state, x, y, *, rng=None, out=None):
        loss, grads = super().loss_and_grads(state, x, y)
        if out is None:
            return loss, grads
        for name, view in out.items():
            view[...] = grads[name]
        return loss, out


def test_out_and_rng_are_passed_only_to_models_that_take_them():
    from engine.core.protocol import loss_and_grads_options
    assert loss_and_grads_options(ThreeArgumentModel()) == (False, False)
    assert loss_and_grads_options(WritesIntoOut()) == (True, True)
    assert loss_and_grads_options(SoftmaxRegression(input_dim=4, num_classes=3))[0]


def test_a_model_writing_into_out_trains_like_one_that_returns_copies():
    x, y = _data()
    results = []
    for model in (ThreeArgumentModel(), WritesIntoOut()):
        with ParallelBatchProcessor(model, num_processes=2, batch_size=10,
                                    optimizer="sgd") as processor:
            state, _ = processor.run_parallel(x, y, model.init_state(0), {"learning_rate": 0.1})
        results.append(state.buffer)
    np.testing.assert_array_equal(results[0], results[1])
