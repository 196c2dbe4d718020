"""Phase plans: frozen weights per phase, the phase in history and checkpoints, and a resume
that continues in the right phase, bitwise."""
import csv

import numpy as np
import pytest

from engine.training.callbacks import Callback
from engine.training.checkpoint import load_checkpoint
from engine.training.trainer import fit
from models import CNN1D

PHASES = [dict(epochs=2, freeze=["conv*"], learning_rate=0.02),
          dict(epochs=2, freeze=["conv1d_1/*"], learning_rate=0.005)]


def _model():
    return CNN1D(input_shape=(12,), num_classes=3, channels=4, batchnorm=True)


class _States(Callback):
    """Keeps a copy of the state after every epoch."""

    def __init__(self):
        self.states = []

    def on_epoch_end(self, epoch, logs):
        self.states.append(self.trainer.state.copy())


class _CrashAfter(Callback):
    """Raise once epoch ``epoch`` (1-based) is done, before the trainer's last.h5 of it."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_commit(self, epoch, logs):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt("simulated crash")


def _options(sync="gradients"):
    return dict(batch_size=50, num_processes=2, sync=sync, update_interval=2, seed=3,
                validation_split=0.2, verbose=False)


def test_each_phase_freezes_its_weights_and_history_and_checkpoints_record_it(blobs, tmp_path):
    model = _model()
    start = model.init_state(seed=3)
    states = _States()
    history = fit(model, *blobs, phases=PHASES, output_dir=tmp_path / "run", callbacks=[states],
                  **_options())
    assert history.epoch == [1, 2, 3, 4] and history.history["phase"] == [1, 1, 2, 2]
    assert history.history["learning_rate"] == [0.02, 0.02, 0.005, 0.005]
    for state in states.states[:2]:   # phase 1: every convolution fixed, the head trains
        for name in ("conv1d_1/kernel", "conv1d_4/bias", "conv1d_7/kernel"):
            assert np.array_equal(state.weights[name], start.weights[name]), name
        assert not np.array_equal(state.weights["dense_11/kernel"], start.weights["dense_11/kernel"])
    for state in states.states[2:]:   # phase 2: only the first convolution stays
        assert np.array_equal(state.weights["conv1d_1/kernel"], start.weights["conv1d_1/kernel"])
        assert not np.array_equal(state.weights["conv1d_7/kernel"],
                                  start.weights["conv1d_7/kernel"])
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert [row["phase"] for row in rows] == ["1", "1", "2", "2"]
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.h5")
    assert checkpoint.trainer["phase"] == 2 and checkpoint.metadata["phase"] == 2
    assert checkpoint.metadata["freeze"] == ["conv1d_1/*"]
    assert [p["freeze"] for p in checkpoint.trainer["phases"]] == [["conv*"], ["conv1d_1/*"]]


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["gradients", "states"])
@pytest.mark.parametrize("crash_at", [1, 2, 3])   # inside phase 1, at its end, inside phase 2
def test_an_interrupted_two_phase_run_resumed_equals_the_uninterrupted_run(blobs, tmp_path, sync,
                                                                           crash_at):
    model = _model()

    def run(output, crash=None, resume=None):
        return fit(model, *blobs, phases=PHASES, output_dir=output, resume=resume,
                   callbacks=[_CrashAfter(crash)] if crash else [], **_options(sync))

    uninterrupted = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash=crash_at + 1)
    last = tmp_path / "b" / "checkpoints" / "last.h5"
    saved = load_checkpoint(last)
    assert saved.trainer["epoch"] == crash_at and saved.trainer["phase"] == (1 if crash_at <= 2
                                                                              else 2)
    resumed = run(tmp_path / "b", resume=last)
    np.testing.assert_array_equal(resumed.state.buffer, uninterrupted.state.buffer)
    assert resumed.history["phase"] == [1, 1, 2, 2]
    for key in ("loss", "val_loss", "learning_rate"):
        assert resumed.history[key] == uninterrupted.history[key], key


def test_a_phase_without_reset_keeps_the_optimizer_and_differs_from_one_with_it(blobs):
    model = _model()
    finals = []
    for reset in (True, False):
        phases = [PHASES[0], {**PHASES[1], "reset_optimizer": reset}]
        finals.append(fit(model, *blobs, phases=phases, **_options()).state)
    assert not np.array_equal(finals[0].buffer, finals[1].buffer)


def test_epochs_may_stop_inside_the_plan_and_a_resume_finishes_it(blobs, tmp_path):
    model = _model()
    uninterrupted = fit(model, *blobs, phases=PHASES, **_options())
    first = fit(model, *blobs, phases=PHASES, epochs=3, output_dir=tmp_path / "b", **_options())
    assert first.history["phase"] == [1, 1, 2]
    resumed = fit(model, *blobs, phases=PHASES, output_dir=tmp_path / "b",
                  resume=tmp_path / "b" / "checkpoints" / "last.h5", **_options())
    np.testing.assert_array_equal(resumed.state.buffer, uninterrupted.state.buffer)


def test_freeze_without_phases_fixes_the_weights_for_the_whole_run(blobs):
    model = _model()
    start = model.init_state(seed=3)
    history = fit(model, *blobs, epochs=2, freeze="batchnorm_*", **_options())
    for name in ("batchnorm_2/gamma", "batchnorm_8/beta"):
        assert np.array_equal(history.state.weights[name], start.weights[name])
    assert history.history["phase"] == [1, 1]


@pytest.mark.parametrize("options,error,match", [
    (dict(phases=PHASES, freeze=["conv*"]), ValueError, "not both"),
    (dict(phases=[dict(epochs=0)]), ValueError, r"phase 1\): epochs must be a positive int"),
    (dict(phases=[dict(epochs=2, lr=0.1)]), ValueError, r"unknown keys \['lr'\]"),
    (dict(phases=[]), ValueError, "phases is empty"),
    (dict(phases=PHASES, epochs=5), ValueError, "past the end of the phases"),
    (dict(phases=[dict(epochs=1), dict(epochs=1, freeze=["head*"])]), ValueError,
     r"'head\*' matches no weight.*dense_11/kernel"),
    (dict(phases=[dict(epochs=1, reset_optimizer="yes")]), TypeError, "reset_optimizer"),
])
def test_bad_phase_plans_are_refused_before_any_worker_starts(blobs, live_children, options,
                                                             error, match):
    with pytest.raises(error, match=match):
        fit(_model(), *blobs, **{**_options(), **options})
    assert not live_children()
