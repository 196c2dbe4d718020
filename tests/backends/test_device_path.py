"""Which path trains a model (engine on the CPU, or tf.distribute on GPUs), and why."""
import functools

import pytest

from engine import ParallelBatchProcessor
from engine.backends import KerasModel, describe_device_path, make_processor, visible_gpus
from keras_oracle import conv_lstm
from models import MLP


@pytest.fixture
def keras_model():
    return KerasModel(functools.partial(conv_lstm))  # never built: the path needs no weights


def test_cpu_request_and_numpy_models_take_the_engine(keras_model):
    assert describe_device_path(keras_model, "cpu")["path"] == "engine"
    described = describe_device_path(MLP(sizes=(4, 8, 3)))
    assert described["path"] == "engine" and "not a Keras model" in described["reason"]
    with pytest.raises(ValueError, match='device="gpu" runs Keras models'):
        describe_device_path(MLP(sizes=(4, 8, 3)), "gpu")


@pytest.mark.skipif(bool(visible_gpus()), reason="this machine has a GPU")
def test_without_a_gpu_auto_takes_the_engine_and_gpu_is_refused(keras_model):
    described = describe_device_path(keras_model)
    assert described["path"] == "engine" and described["gpus"] == []
    assert "no GPU" in described["reason"] and described["tensorflow"]
    with pytest.raises(ValueError, match="sees no GPU"):
        describe_device_path(keras_model, "gpu")
    processor = make_processor(keras_model, device="auto", num_processes=2, batch_size=8)
    assert isinstance(processor, ParallelBatchProcessor)
    processor.close()


@pytest.mark.gpu
@pytest.mark.skipif(not visible_gpus(), reason="TensorFlow sees no GPU here")
def test_with_a_gpu_auto_takes_tf_distribute(keras_model):
    described = describe_device_path(keras_model)
    assert described["path"] == "tf_distribute" and described["gpus"]


def test_bad_device_and_states_mode_on_the_gpu_path_are_refused(keras_model):
    with pytest.raises(ValueError, match="device must be one of"):
        describe_device_path(keras_model, "tpu")
    with pytest.raises(ValueError, match='sync="gradients" mode only'):
        make_processor(keras_model, devices=["/cpu:0"], sync="states")
