"""Crafted and damaged checkpoints and HDF5 data files are refused in one line naming the file,
before anything large is allocated; from the CLI, exit 1 and no traceback (issue 10, item 6)."""
import json
import os

import h5py
import numpy as np
import pytest

from engine.cli.main import main
from engine.training.checkpoint import load_checkpoint
from engine.training.datasets import DataError, load_dataset
from engine.training.trainer import fit
from models import MLP


@pytest.fixture
def last(blobs, tmp_path, quiet_fit):
    fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=1, output_dir=tmp_path / "run", **quiet_fit)
    return tmp_path / "run" / "checkpoints" / "last.h5"


def _edit(path, change):
    with h5py.File(path, "a") as f:
        change(f)


def _set_trainer(f, **changes):
    trainer = json.loads(f["checkpoint"].attrs["trainer"])
    for key, value in changes.items():
        if value is None:
            trainer.pop(key)
        else:
            trainer[key] = value
    f["checkpoint"].attrs["trainer"] = json.dumps(trainer)


@pytest.mark.parametrize("change, message", [
    (lambda f: _set_trainer(f, epoch=None), "'epoch' must be an int >= 0, found None"),
    (lambda f: _set_trainer(f, epoch=-3), "'epoch' must be an int >= 0, found -3"),
    (lambda f: _set_trainer(f, stream_rng=None), "'stream_rng'"),
    (lambda f: f["checkpoint/processor"].attrs.__setitem__("values", "{}"), "'step'"),
])
def test_a_checkpoint_missing_progress_is_refused_naming_what(blobs, last, quiet_fit, change,
                                                              message):
    _edit(last, change)
    with pytest.raises(ValueError, match=message) as caught:
        fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=2, resume=last, **quiet_fit)
    assert str(last) in str(caught.value) and "cannot resume" in str(caught.value)


@pytest.mark.parametrize("change, message", [
    (lambda f: f["checkpoint"].__delitem__("arrays"), "/checkpoint/arrays is missing"),
    (lambda f: f.__delitem__("weights"), "/weights is missing"),
    (lambda f: f["checkpoint/processor"].attrs.__setitem__("values", "[1,"), "not valid JSON"),
    (lambda f: f["checkpoint/arrays"].attrs.__setitem__("names", '["a", "b", "c"]'),
     "lists 3 names but holds"),
])
def test_a_damaged_checkpoint_is_refused_in_one_line(last, change, message):
    _edit(last, change)
    with pytest.raises(ValueError, match=message) as caught:
        load_checkpoint(last)
    assert str(last) in str(caught.value) and "\n" not in str(caught.value)


def test_external_storage_in_a_checkpoint_is_refused(last, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x00" * 64)

    def external(f):
        optimizer = f["checkpoint/processor/0"]
        shape = optimizer.shape
        del f["checkpoint/processor/0"]
        f["checkpoint/processor"].create_dataset("0", shape=shape, dtype="f4",
                                                 external=[(str(secret), 0, 4 * int(np.prod(
                                                     shape)))])
    _edit(last, external)
    with pytest.raises(ValueError, match="external file"):
        load_checkpoint(last)


def _crafted_data(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, (shape, dtype) in datasets.items():
            f.create_dataset(name, shape=shape, dtype=dtype)  # declared, never written
    return path


def test_a_small_data_file_declaring_terabytes_is_refused(tmp_path, capsys):
    path = _crafted_data(tmp_path / "data.h5", x=((10**6, 10**6), "f4"), y=((10**12,), "i8"))
    assert os.path.getsize(path) < 4096
    with pytest.raises(DataError, match=r"declares shape \(1000000, 1000000\)"):
        load_dataset(path)
    assert main(["train", "--data", str(path), "--output-dir", str(tmp_path / "run"),
                 "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert "data.h5" in error and "declares shape" in error and error.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_data_file_reading_another_file_or_linking_out_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(40, dtype=np.float32).tobytes())
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", shape=(10, 4), dtype="f4", external=[(str(secret), 0, 160)])
        f["y"] = np.arange(10) % 2
    with pytest.raises(DataError, match="external file"):
        load_dataset(path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.ones((10, 4), np.float32)
    with h5py.File(path, "w") as f:
        f["x"] = h5py.ExternalLink(str(other), "/x")
        f["y"] = np.arange(10) % 2
    with pytest.raises(DataError, match="/x is a ExternalLink"):
        load_dataset(path)


def test_a_genuine_compressed_data_file_still_loads(tmp_path):
    path = tmp_path / "data.h5"
    x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, compression="gzip", shuffle=True)
        f.create_dataset("y", data=np.arange(200) % 3, compression="lzf")
    data = load_dataset(path)
    np.testing.assert_array_equal(data.x[:], x)
    assert data.y.tolist() == (np.arange(200) % 3).tolist()
