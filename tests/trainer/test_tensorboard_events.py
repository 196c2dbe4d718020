"""The TensorBoard callback writes event files through tensorboardX that TensorBoard's own reader
loads back, without importing TensorFlow or torch into the training process."""
import json
import os
import subprocess
import sys

import pytest

from engine.training.callbacks import TensorBoard
from engine.training.trainer import fit
from models import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# TensorBoard's reader (it imports TensorFlow when installed: run it in a child, so this test
# process and the workers later forked from it stay free of it).
_READER = """
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
events = EventAccumulator(sys.argv[1]); events.Reload()
print(json.dumps({tag: [[e.step, e.value] for e in events.Scalars(tag)]
                  for tag in events.Tags()["scalars"]}))
"""


def _read_scalars(log_dir):
    pytest.importorskip("tensorboard")
    child = subprocess.run([sys.executable, "-c", _READER, str(log_dir)], capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


class _Trainer:
    epochs, initial_epoch = 2, 0


def test_scalars_read_back_with_tensorboards_event_reader(tmp_path):
    pytest.importorskip("tensorboardX")
    callback = TensorBoard(tmp_path / "tb")
    callback.trainer = _Trainer()
    callback.on_train_begin()
    logs = [{"loss": 0.75, "val_accuracy": 0.5, "note": "text", "flag": True},
            {"loss": 0.25, "val_accuracy": 0.875}]
    for epoch, values in enumerate(logs):
        callback.on_epoch_end(epoch, values)
    callback.on_train_end()
    callback.on_train_end()  # a second close is harmless
    assert _read_scalars(tmp_path / "tb") == {"loss": [[1, 0.75], [2, 0.25]],
                                              "val_accuracy": [[1, 0.5], [2, 0.875]]}


def test_fit_logs_every_epoch_and_a_resume_adds_a_second_event_file(tmp_path, blobs, quiet_fit):
    pytest.importorskip("tensorboardX")
    x, y = blobs
    log_dir, output = tmp_path / "tb", tmp_path / "run"
    history = fit(MLP(sizes=(12, 8, 3)), x, y, epochs=2, validation_split=0.2,
                  callbacks=[TensorBoard(log_dir)], output_dir=output, **quiet_fit)
    fit(MLP(sizes=(12, 8, 3)), x, y, epochs=3, validation_split=0.2, output_dir=output,
        callbacks=[TensorBoard(log_dir)], resume=output / "checkpoints" / "last.h5", **quiet_fit)
    assert len(os.listdir(log_dir)) == 2
    scalars = _read_scalars(log_dir)
    assert [step for step, _ in scalars["val_loss"]] == [1, 2, 3]
    assert [value for _, value in scalars["loss"][:2]] == pytest.approx(history.history["loss"])


def test_writing_events_imports_neither_tensorflow_nor_torch(tmp_path):
    pytest.importorskip("tensorboardX")
    code = ("import sys; from engine.training.callbacks import TensorBoard\n"
            "class T: epochs, initial_epoch = 1, 0\n"
            "callback = TensorBoard(sys.argv[1]); callback.trainer = T(); "
            "callback.on_train_begin(); callback.on_epoch_end(0, {'loss': 1.0}); "
            "callback.on_train_end(); print('tensorflow' in sys.modules, 'torch' in sys.modules)")
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "False False"
    assert len(os.listdir(tmp_path)) == 1


def test_a_user_who_imported_torch_keeps_it(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("tensorboardX")
    code = ("import sys, torch; from engine.training.callbacks import TensorBoard; "
            "TensorBoard(sys.argv[1]); import tensorboardX.writer as w; "
            "print(sys.modules['torch'] is torch, w.numpy_compatible is torch.Tensor)")
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "True True"


def test_without_tensorboardx_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ImportError, match="pip install tensorboardX"):
        TensorBoard(tmp_path)
    assert "torch" not in sys.modules or sys.modules["torch"] is not None  # never left hidden
