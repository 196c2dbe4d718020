"""Every callback: what it writes or decides each epoch, on a stub trainer or in a real fit."""
import csv
import io
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from engine.training.callbacks import CSVLogger, EarlyStopping, ModelCheckpoint, ProgressBar, TensorBoard
from engine.training.checkpoint import load_checkpoint
from engine.training.history import History
from engine.training.trainer import fit
from models import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _StubTrainer:
    """What callbacks see of a Trainer: a state per epoch, a history, save_checkpoint."""

    def __init__(self, epochs=5):
        self.state = MLP(sizes=(2, 2)).init_state(0)
        self.history, self.saved, self.stop_training = History(), [], False
        self.epochs, self.initial_epoch = epochs, 0

    def save_checkpoint(self, path):
        self.saved.append(path)


def _run(callback, logs_per_epoch, trainer=None):
    trainer = trainer or _StubTrainer(len(logs_per_epoch))
    callback.trainer = trainer
    callback.on_train_begin()
    for epoch, logs in enumerate(logs_per_epoch):
        trainer.state = trainer.state.copy()
        trainer.state.buffer[:] = epoch  # state of epoch e is all e's
        callback.on_epoch_begin(epoch, {"learning_rate": 0.1})
        trainer.history.append(epoch + 1, logs)
        callback.on_epoch_end(epoch, logs)
        callback.on_epoch_commit(epoch, logs)
        if trainer.stop_training:
            break
    callback.on_train_end()
    return trainer


LOSSES = [{"val_loss": v, "val_accuracy": a} for v, a in
          [(1.0, 0.5), (0.8, 0.6), (0.9, 0.55), (0.7, 0.7), (0.75, 0.65)]]


def test_model_checkpoint_saves_only_improvements_of_the_monitored_metric():
    trainer = _run(ModelCheckpoint("best_{epoch}_{val_loss:.2f}.h5", save_best_only=True), LOSSES)
    assert trainer.saved == ["best_1_1.00.h5", "best_2_0.80.h5", "best_4_0.70.h5"]
    trainer = _run(ModelCheckpoint("b.h5", monitor="val_accuracy", save_best_only=True), LOSSES)
    assert len(trainer.saved) == 3  # "auto" watches accuracy upwards: epochs 1, 2, 4


def test_model_checkpoint_every_n_epochs():
    trainer = _run(ModelCheckpoint("epoch_{epoch:03d}.h5", every_n_epochs=2), LOSSES)
    assert trainer.saved == ["epoch_002.h5", "epoch_004.h5"]
    with pytest.raises(ValueError, match="every_n_epochs"):
        ModelCheckpoint("x.h5", every_n_epochs=0)


def test_early_stopping_waits_patience_epochs_and_restores_the_best_state():
    logs = [{"val_loss": v} for v in (1.0, 0.5, 0.6, 0.7, 0.4, 0.3)]
    callback = EarlyStopping(patience=2, restore_best_weights=True)
    trainer = _run(callback, logs)
    assert callback.stopped_epoch == 3 and callback.best_epoch == 1
    assert np.all(trainer.state.buffer == 1.0)  # the state of epoch index 1
    assert callback.get_state() == {"best": 0.5, "wait": 2, "best_epoch": 1}


def test_early_stopping_in_a_real_fit_returns_the_best_checkpointed_state(blobs, tmp_path,
                                                                          quiet_fit):
    # min_delta so large that only the first epoch counts as an improvement.
    stopper = EarlyStopping(monitor="val_loss", patience=2, min_delta=1e9,
                            restore_best_weights=True)
    every = ModelCheckpoint(str(tmp_path / "epoch_{epoch}.h5"))
    history = fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=10, validation_split=0.2,
                  callbacks=[stopper, every], **quiet_fit)
    assert history.epoch == [1, 2, 3]
    first = load_checkpoint(tmp_path / "epoch_1.h5").state
    np.testing.assert_array_equal(history.state.buffer, first.buffer)


def test_a_checkpoint_write_that_fails_mid_fit_keeps_the_previous_epochs_file(
        blobs, tmp_path, quiet_fit, monkeypatch):
    import h5py
    real, writes = h5py.Group.create_dataset, []

    def fail_during_the_second_save(self, name, *args, **kwargs):
        writes.append(name)
        if len(writes) == 10:  # the 2nd file has 4 state datasets, then optimizer, then arrays
            raise OSError("disk full")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_during_the_second_save)
    with pytest.raises(OSError, match="disk full"):
        fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=3, optimizer="sgd",
            callbacks=[ModelCheckpoint(tmp_path / "last.h5")], **quiet_fit)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.h5").trainer["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.h5"]


def test_csv_logger_writes_one_row_per_epoch_with_every_key(tmp_path):
    path = tmp_path / "logs" / "history.csv"
    _run(CSVLogger(path), LOSSES[:3])
    rows = list(csv.DictReader(open(path)))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert [float(row["val_loss"]) for row in rows] == [1.0, 0.8, 0.9]


def test_progress_bar_shows_epochs_loss_and_samples_per_second():
    out = io.StringIO()
    logs = [{"loss": 0.5, "val_accuracy": 0.9, "learning_rate": 0.1, "samples_per_s": 12345.0}] * 3
    _run(ProgressBar(file=out), logs)
    text = out.getvalue()
    assert "3/3" in text and "samples/s=12,345" in text and "loss=0.5" in text


def _read_events(path):
    """TFRecord framing: u64 length, u32 crc, payload, u32 crc; payloads are Event protos."""
    from tensorboard.compat.proto import event_pb2
    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
        offset += 12 + length + 4
    return events


def test_tensorboard_writes_a_scalar_per_log_key_per_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    _run(TensorBoard(tmp_path / "tb"), LOSSES[:2])
    (event_file,) = (tmp_path / "tb").iterdir()
    events = _read_events(event_file)
    assert events[0].file_version == "brain.Event:2"
    scalars = {(event.step, value.tag): value.simple_value for event in events
               for value in event.summary.value}
    assert scalars == pytest.approx({(1, "val_loss"): 1.0, (1, "val_accuracy"): 0.5,
                                     (2, "val_loss"): 0.8, (2, "val_accuracy"): 0.6})


def test_tensorboard_never_imports_tensorflow(tmp_path):
    pytest.importorskip("tensorboard")
    code = ("import sys; from engine.training.callbacks import TensorBoard; from engine.training.history import "
            "History\nclass T: history = History()\ncallback = TensorBoard(sys.argv[1]); "
            "callback.trainer = T(); callback.on_train_begin(); callback.on_epoch_end(0, "
            "{'loss': 1.0}); callback.on_train_end(); print('tensorflow' in sys.modules)")
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                           text=True, cwd=ROOT)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "False"


def test_tensorboard_without_the_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # the event writer it needs
    with pytest.raises(ImportError, match="pip install tensorboardX"):
        TensorBoard(tmp_path)
