"""get_model / available_models, and constructor argument validation with clear messages."""
import pytest

import models
from models import CNN1D, MLP, SoftmaxRegression, available_models, get_model


@pytest.mark.parametrize("name, kwargs, cls", [
    ("softmax_regression", {"input_dim": 40, "num_classes": 10}, SoftmaxRegression),
    ("mlp", {"sizes": (40, 32, 10), "dropout": 0.1, "batchnorm": True}, MLP),
    ("cnn1d", {}, CNN1D),
])
def test_get_model_builds_the_registered_class(name, kwargs, cls):
    model = get_model(name, **kwargs)
    assert type(model) is cls
    assert model.input_shape == (40,) and model.num_outputs == 10


def test_available_models_describes_every_registered_name_with_its_arguments():
    described = available_models()
    assert set(described) == set(models._REGISTRY) >= {
        "softmax_regression", "mlp", "cnn1d", "imu_cnn_bilstm", "lstm_attention",
        "cnn_bilstm_attention"}
    assert "sizes" in described["mlp"] and "dropout" in described["mlp"]
    assert "input_dim" in described["softmax_regression"]
    assert "channels" in described["cnn1d"]


def test_unknown_model_name_lists_the_known_names():
    with pytest.raises(ValueError, match=r"unknown model name 'resnet'.*'cnn1d', .*'mlp'"):
        get_model("resnet")


def test_unexpected_model_argument_shows_the_signature():
    with pytest.raises(TypeError, match=r"get_model\('mlp'\).*hidden.*MLP\(sizes"):
        get_model("mlp", sizes=(4, 2), hidden=3)


@pytest.mark.parametrize("build, match", [
    (lambda: MLP(sizes=(10,)), r"sizes must be.*Received: sizes=\(10,\)"),
    (lambda: MLP(sizes=(10, 0, 3)), r"Received: sizes=\(10, 0, 3\)"),
    (lambda: MLP(sizes="784,10"), "sizes must be"),
    (lambda: MLP(sizes=(10, 1)), r"num_classes must be an int >= 2. Received: num_classes=1"),
    (lambda: MLP(sizes=(10, 3), dropout=1.0), r"dropout must be .*Received: dropout=1.0"),
    (lambda: MLP(sizes=(10, 3), batchnorm="yes"), "batchnorm must be True or False"),
    (lambda: SoftmaxRegression(input_dim=0, num_classes=3), r"input_dim=0"),
    (lambda: SoftmaxRegression(input_dim=4, num_classes=1), r"num_classes=1"),
    (lambda: CNN1D(input_shape=(2,)), r"layer 1 \(Conv1D.*does not fit an input of length 2"),
    (lambda: CNN1D(input_shape=(40, 1, 1)), r"input_shape must be \(length,\)"),
    (lambda: CNN1D(kernel_sizes=(5, 3), strides=(2,)), "one entry per convolution"),
    (lambda: CNN1D(channels=-1), r"channels=-1"),
    (lambda: models.Sequential([], input_shape=(3,)), "non-empty list"),
])
def test_invalid_constructor_arguments_raise_value_error_naming_them(build, match):
    with pytest.raises(ValueError, match=match):
        build()
