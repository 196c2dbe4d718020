"""Resume: 4 epochs, stop, 4 more gives bitwise the state of 8 uninterrupted epochs.

Bitwise because every step is deterministic: the same shards in the same order, the same float32
kernels, dropout masks keyed by (seed, worker, step) and the shuffle stream restored exactly.
"""
import csv
import os

import numpy as np
import pytest

from engine.training.callbacks import Callback, EarlyStopping
from engine.training.checkpoint import load_checkpoint
from engine.training.schedules import ReduceLROnPlateau, WarmupCosine
from engine.training.trainer import fit
from models import MLP, FocalLoss


class _CrashAfter(Callback):
    """Raise once epoch ``epoch`` is done, after the CSV row and before last.h5 is written (user
    callbacks commit before the trainer's own checkpoint): the worst moment to die."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_commit(self, epoch, logs):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt("simulated crash")


def _options(sync, schedule):
    return dict(batch_size=64, num_processes=2, sync=sync, update_interval=3, learning_rate=0.02,
                validation_split=0.2, standardize=True, seed=5, verbose=False,
                loss=FocalLoss(gamma=1.0, class_weight="balanced"),
                schedule=schedule())


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["gradients", "states"])
def test_crash_and_resume_gives_the_uninterrupted_state_bitwise(blobs, tmp_path, sync):
    model = MLP(sizes=(12, 16, 3), dropout=0.2)

    def schedule():
        return WarmupCosine(0.02, total_epochs=8, warmup_epochs=2)

    def run(output, crash_at, resume=None):
        return fit(model, *blobs, epochs=8, output_dir=output, resume=resume,
                   callbacks=[EarlyStopping(patience=50), _CrashAfter(crash_at)],
                   **_options(sync, schedule))

    uninterrupted = run(tmp_path / "a", crash_at=None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=5)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.h5").trainer["epoch"] == 4
    resumed = run(tmp_path / "b", crash_at=None, resume=tmp_path / "b" / "checkpoints" / "last.h5")
    np.testing.assert_array_equal(resumed.state.buffer, uninterrupted.state.buffer)
    assert resumed.epoch == list(range(1, 9))
    for key in ("loss", "val_loss", "learning_rate"):
        assert resumed.history[key] == uninterrupted.history[key], key
    # The CSV had epoch 5's row before the crash; resuming rewrote it rather than duplicating it.
    rows = list(csv.DictReader(open(tmp_path / "b" / "history.csv")))
    assert [row["epoch"] for row in rows] == [str(e) for e in range(1, 9)]


@pytest.mark.slow
def test_training_4_epochs_then_4_more_matches_8_with_a_plateau_schedule(blobs, tmp_path):
    model = MLP(sizes=(12, 16, 3))

    def schedule():
        return ReduceLROnPlateau(0.05, monitor="loss", patience=1, factor=0.5)

    def run(epochs, output, resume=None):
        return fit(model, *blobs, epochs=epochs, output_dir=output, resume=resume,
                   **_options("gradients", schedule))

    uninterrupted = run(8, tmp_path / "a")
    run(4, tmp_path / "b")
    resumed = run(8, tmp_path / "b", resume=tmp_path / "b" / "checkpoints" / "last.h5")
    np.testing.assert_array_equal(resumed.state.buffer, uninterrupted.state.buffer)
    assert resumed.history["learning_rate"] == uninterrupted.history["learning_rate"]
    assert len(set(uninterrupted.history["learning_rate"])) > 1  # the plateau did reduce


def test_early_stoppings_best_state_survives_a_resume(blobs, tmp_path, quiet_fit):
    from engine.training.callbacks import ModelCheckpoint

    def run(crash_at, resume=None):
        # min_delta so large that epoch 1 stays the best: the result must be epoch 1's state,
        # which the resumed run only has from the checkpoint.
        stopper = EarlyStopping(patience=100, min_delta=1e9, restore_best_weights=True)
        every = ModelCheckpoint(str(tmp_path / "epoch_{epoch}.h5"))
        return fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=4, validation_split=0.2,
                   output_dir=tmp_path, resume=resume,
                   callbacks=[stopper, every, _CrashAfter(crash_at)], **quiet_fit)

    with pytest.raises(KeyboardInterrupt):
        run(crash_at=3)
    resumed = run(crash_at=None, resume=tmp_path / "checkpoints" / "last.h5")
    assert resumed.epoch == [1, 2, 3, 4]
    first = load_checkpoint(tmp_path / "epoch_1.h5").state
    np.testing.assert_array_equal(resumed.state.buffer, first.buffer)


def test_resume_refuses_another_models_checkpoint_and_a_bare_state(blobs, tmp_path, quiet_fit):
    fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=1, output_dir=tmp_path, **quiet_fit)
    last = tmp_path / "checkpoints" / "last.h5"
    with pytest.raises(ValueError, match="does not match the expected layout"):
        fit(MLP(sizes=(12, 9, 3)), *blobs, epochs=2, resume=last, **quiet_fit)
    MLP(sizes=(12, 8, 3)).init_state(0).save(tmp_path / "bare.h5")
    with pytest.raises(ValueError, match="no training progress"):
        fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=2, resume=tmp_path / "bare.h5", **quiet_fit)
    with pytest.warns(RuntimeWarning, match="different settings.*batch_size"):
        fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=2, resume=last,
            **dict(quiet_fit, batch_size=32))
    with pytest.warns(RuntimeWarning, match="already trained 1 epochs"):
        done = fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=1, resume=last, **quiet_fit)
    np.testing.assert_array_equal(done.state.buffer, load_checkpoint(last).state.buffer)
    assert os.path.exists(tmp_path / "model.h5")
