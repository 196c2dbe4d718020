"""train --freeze and --phases: the plan parsed, recorded in config.json and history.csv, and a
run stopped inside the plan resumed from its checkpoint to the uninterrupted state, bitwise."""
import csv
import json

import numpy as np
import pytest

from engine.cli.config import parse_phases
from engine.cli.main import main
from engine.core.state import NetworkState

PLAN = "epochs=2,freeze=conv1d_1/*|conv1d_3/*,lr=0.02; epochs=2,lr=0.005,freeze="


def _train(folder, out, *flags):
    return main(["train", "--data", str(folder), "--model", "cnn1d", "--model-arg", "channels=4",
                 "--batch-size", "32", "--workers", "2", "--output-dir", str(out), "--seed", "1",
                 "--no-progress", *flags])


def test_phases_parse_into_phase_dicts():
    assert parse_phases(PLAN) == [
        dict(epochs=2, freeze=["conv1d_1/*", "conv1d_3/*"], lr=0.02),
        dict(epochs=2, lr=0.005, freeze=[])]
    assert parse_phases("epochs=3,reset_optimizer=false;")[0]["reset_optimizer"] is False
    with pytest.raises(ValueError, match="phase 2 has 'learning_rate=1'.*keys"):
        parse_phases("epochs=1; epochs=2,learning_rate=1")
    with pytest.raises(ValueError, match="phase 1 .* names no epochs"):
        parse_phases("lr=0.1")
    with pytest.raises(ValueError, match="epochs='x' is not valid"):
        parse_phases("epochs=x")


@pytest.mark.slow
def test_a_phased_run_stopped_and_resumed_from_the_command_line_ends_bitwise_as_one_run(
        data_folder, tmp_path, capsys):
    assert _train(data_folder, tmp_path / "a", "--phases", PLAN) == 0
    assert "phase 1: 2 epochs, lr 0.02, frozen ['conv1d_1/*', 'conv1d_3/*']" in \
        capsys.readouterr().out
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["epochs"] == 4 and config["phases"][1] == dict(epochs=2, lr=0.005, freeze=[])
    rows = list(csv.DictReader(open(tmp_path / "a" / "history.csv")))
    assert [row["phase"] for row in rows] == ["1", "1", "2", "2"]
    assert [float(row["learning_rate"]) for row in rows] == [0.02, 0.02, 0.005, 0.005]

    assert _train(data_folder, tmp_path / "b", "--phases", PLAN, "--epochs", "3") == 0
    last = tmp_path / "b" / "checkpoints" / "last.h5"
    assert main(["train", "--resume", str(last), "--epochs", "4", "--no-progress"]) == 0
    resumed = NetworkState.load(tmp_path / "b" / "model.h5")
    uninterrupted = NetworkState.load(tmp_path / "a" / "model.h5")
    np.testing.assert_array_equal(resumed.buffer, uninterrupted.buffer)


def test_freeze_keeps_the_named_weights_and_a_bad_pattern_fails_in_one_line(data_folder, tmp_path,
                                                                             capsys):
    assert _train(data_folder, tmp_path / "a", "--epochs", "1", "--freeze", "conv1d_1/*",
                  "--freeze", "dense_*") == 0
    trained = NetworkState.load(tmp_path / "a" / "model.h5", return_metadata=True)
    state, metadata = trained
    from models import get_model
    start = get_model("cnn1d", input_shape=(12,), num_classes=3, channels=4).init_state(1)
    for name in ("conv1d_1/kernel", "dense_8/kernel", "dense_8/bias"):
        assert np.array_equal(state.weights[name], start.weights[name]), name
    assert not np.array_equal(state.weights["conv1d_3/kernel"], start.weights["conv1d_3/kernel"])
    assert metadata["freeze"] == ["conv1d_1/*", "dense_*"]
    capsys.readouterr()
    assert _train(data_folder, tmp_path / "b", "--epochs", "1", "--freeze", "head*") == 1
    error = capsys.readouterr().err
    assert "'head*' matches no weight" in error and "conv1d_1/kernel" in error
    assert _train(data_folder, tmp_path / "c", "--phases", "epochs=1", "--freeze", "conv*") == 1
    assert "do not combine" in capsys.readouterr().err


def test_init_from_takes_the_matching_arrays_and_keeps_a_new_head(data_folder, tmp_path, capsys):
    assert _train(data_folder, tmp_path / "base", "--epochs", "1") == 0
    base = NetworkState.load(tmp_path / "base" / "model.h5")
    x, y = np.load(data_folder / "features.npy"), np.load(data_folder / "labels.npy")
    keep = y < 2
    np.savez(tmp_path / "two.npz", x=x[keep], y=y[keep])
    capsys.readouterr()
    assert _train(tmp_path / "two.npz", tmp_path / "tuned", "--init-from",
                  str(tmp_path / "base" / "model.h5"), "--phases", "epochs=1,freeze=conv*") == 0
    assert "6 arrays taken, 2 kept at their initialisation: ['dense_8/kernel', 'dense_8/bias']" \
        in capsys.readouterr().out
    tuned = NetworkState.load(tmp_path / "tuned" / "model.h5")
    for name in ("conv1d_1/kernel", "conv1d_3/bias", "conv1d_5/kernel"):   # frozen base
        assert np.array_equal(tuned.weights[name], base.weights[name]), name
    assert tuned.weights["dense_8/kernel"].shape == (8, 2)
