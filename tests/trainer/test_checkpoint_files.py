"""Checkpoint files: round trip, compatibility with NetworkState, atomic writes, safe reads."""
import json
import os

import h5py
import numpy as np
import pytest

from engine import NetworkState
from engine.training.checkpoint import load_checkpoint, save_checkpoint
from models import MLP


def _training_state(state, seed=0):
    rng = np.random.default_rng(seed)
    return {"optimizer": rng.standard_normal((2, state.num_trainable)).astype(np.float32),
            "step": 17, "shuffle_rng": np.random.default_rng(seed).bit_generator.state}


def _write(path, seed=0):
    state = MLP(sizes=(4, 5, 3)).init_state(seed)
    save_checkpoint(path, state, metadata={"config": {"epochs": 3}},
                    training_state=_training_state(state, seed),
                    trainer={"epoch": 2, "history": {"epoch": [1, 2]}},
                    arrays={"standardize/mean": np.arange(4.0)})
    return state


def test_everything_saved_comes_back(tmp_path):
    path = tmp_path / "run" / "ckpt.h5"  # the folder is created
    state = _write(path)
    checkpoint = load_checkpoint(path)
    np.testing.assert_array_equal(checkpoint.state.buffer, state.buffer)
    assert checkpoint.metadata == {"config": {"epochs": 3}}
    expected = _training_state(state)
    np.testing.assert_array_equal(checkpoint.training_state["optimizer"], expected["optimizer"])
    assert checkpoint.training_state["step"] == 17
    assert checkpoint.training_state["shuffle_rng"] == expected["shuffle_rng"]
    assert checkpoint.trainer == {"epoch": 2, "history": {"epoch": [1, 2]}}
    np.testing.assert_array_equal(checkpoint.arrays["standardize/mean"], np.arange(4.0))


def test_a_checkpoint_is_a_network_state_file_and_a_state_file_is_a_checkpoint(tmp_path):
    state = _write(tmp_path / "ckpt.h5")
    np.testing.assert_array_equal(NetworkState.load(tmp_path / "ckpt.h5").buffer, state.buffer)
    state.save(tmp_path / "plain.h5", metadata={"note": 1})
    plain = load_checkpoint(tmp_path / "plain.h5")
    assert plain.training_state is None and plain.trainer == {} and plain.metadata == {"note": 1}


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_a_write_interrupted_midway_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch,
                                                                            failure):
    path = tmp_path / "last.h5"
    good = _write(path, seed=0)
    before = path.read_bytes()
    real, calls = h5py.Group.create_dataset, []

    def failing_create_dataset(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 5:  # after the weights, in the middle of the file
            raise failure("interrupted mid-write")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing_create_dataset)
    with pytest.raises(failure, match="mid-write"):
        _write(path, seed=1)
    monkeypatch.undo()
    assert path.read_bytes() == before
    np.testing.assert_array_equal(load_checkpoint(path).state.buffer, good.buffer)
    assert os.listdir(tmp_path) == ["last.h5"]  # no partial file left behind


def test_unserialisable_progress_fails_before_touching_the_file(tmp_path):
    path = tmp_path / "last.h5"
    _write(path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_checkpoint(path, MLP(sizes=(4, 3)).init_state(0), trainer={"bad": object()})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.h5"]


def test_reading_refuses_non_numeric_datasets_and_newer_formats(tmp_path):
    path = tmp_path / "ckpt.h5"
    _write(path)
    with h5py.File(path, "a") as f:
        arrays = f["checkpoint/arrays"]
        arrays.attrs["names"] = json.dumps(["standardize/mean", "evil"])
        arrays.create_dataset("1", data=np.array([b"cos\nsystem\n"]))
    with pytest.raises(ValueError, match="only numeric arrays"):
        load_checkpoint(path)
    with h5py.File(path, "a") as f:
        f["checkpoint"].attrs["format_version"] = 99
    with pytest.raises(ValueError, match="format_version 99"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.h5")
