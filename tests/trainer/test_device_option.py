"""The device option of fit and the CLI: which path a model takes, and a clear refusal."""
import numpy as np
import pytest

from engine import fit
from engine.cli.main import main
from models import MLP


def test_a_native_model_refuses_the_gpu_path_with_what_to_do(blobs):
    with pytest.raises(ValueError, match='device="gpu" runs Keras models.*device="cpu"'):
        fit(MLP(sizes=(12, 4, 3)), *blobs, epochs=1, batch_size=50, num_processes=1,
            device="gpu", verbose=False)


def test_device_cpu_trains_on_the_engine(blobs):
    history = fit(MLP(sizes=(12, 4, 3)), *blobs, epochs=1, batch_size=50, num_processes=1,
                  device="cpu", verbose=False)
    assert np.all(np.isfinite(history.state.buffer))


def test_info_says_which_path_keras_models_take_and_why(capsys):
    main(["info", "--no-tensorflow"])
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("keras path")]
    assert line and ("the engine:" in line[0] or "tf.distribute:" in line[0])
