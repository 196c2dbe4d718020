"""Hang detection is on by default in fit and the CLI (issue 10, item 5): 300 s in the first epoch
(warm-up), then the larger of 60 s and 20x the median step time; ``--timeout`` sets it, and a
worker stopped with SIGSTOP is killed and replaced instead of stalling the run forever."""
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

from engine.training.callbacks import Callback
from engine.training.trainer import (HANG_TIMEOUT_FLOOR_S, WARM_UP_TIMEOUT_S, Trainer, fit)
from models import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _RecordTimeout(Callback):
    def __init__(self):
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(self.trainer._processor.timeout_s)


def test_fit_detects_hangs_by_default_warm_up_first_then_from_step_times(blobs, quiet_fit):
    record = _RecordTimeout()
    fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=3, callbacks=[record],
        **dict(quiet_fit, num_processes=2))
    # Steps of this tiny model take milliseconds: 20x their median is below the 60 s floor.
    assert record.seen == [WARM_UP_TIMEOUT_S, HANG_TIMEOUT_FLOOR_S, HANG_TIMEOUT_FLOOR_S]


def test_the_timeout_is_20x_the_median_step_time_when_that_exceeds_60_s():
    trainer = Trainer(MLP(sizes=(12, 8, 3)))
    trainer._processor = SimpleNamespace(timeout_s=WARM_UP_TIMEOUT_S)
    trainer._update_timeout([4.0, 5.0, 5.0, 90.0, 6.0])  # one slow step does not move a median
    assert trainer._processor.timeout_s == 100.0
    trainer._update_timeout([0.2] * 10)
    assert trainer._processor.timeout_s == HANG_TIMEOUT_FLOOR_S
    fixed = Trainer(MLP(sizes=(12, 8, 3)), timeout_s=7)
    fixed._processor = SimpleNamespace(timeout_s=7)
    fixed._update_timeout([30.0] * 5)
    assert fixed._processor.timeout_s == 7 and fixed.processor_options["timeout_s"] == 7
    assert Trainer(MLP(sizes=(12, 8, 3)), timeout_s=None).processor_options["timeout_s"] is None


def _rows(path):
    try:
        with open(path) as f:
            return max(0, len(f.read().strip().splitlines()) - 1)
    except OSError:
        return 0


def _wait_for(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_stopped_worker_does_not_stall_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "engine", "train", "--data",
                            str(tmp_path / "data.npz"), "--model", "mlp", "--epochs", "100000",
                            "--batch-size", "32", "--workers", "2", "--timeout", "3",
                            "--output-dir", str(out), "--no-progress"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        _wait_for(lambda: _rows(out / "history.csv") >= 1, 120, "the first epoch")
        owner = psutil.Process(run.pid)
        # Forked workers carry the owner's command line; anything else (resource tracker, a
        # short-lived `uname` run by the platform module) is not a worker. A subprocess the owner
        # starts carries that command line too for the moment between its fork and its exec
        # (seen in CI as a third "worker"), so look until only the two workers match.
        def workers():
            found = []
            for child in owner.children():
                try:
                    if child.cmdline() == owner.cmdline():
                        found.append(child)
                except psutil.NoSuchProcess:  # a short-lived child that has just exited
                    pass
            return found
        _wait_for(lambda: len(workers()) == 2, 30, "exactly the two workers")
        workers = workers()
        assert len(workers) == 2
        stopped = workers[1]
        stopped.send_signal(signal.SIGSTOP)
        rows_when_stopped = _rows(out / "history.csv")
        # Killed after --timeout 3 s (plus a busy machine's slack), replaced, and training goes on.
        _wait_for(lambda: not stopped.is_running() or
                  stopped.status() == psutil.STATUS_ZOMBIE, 60, "the stopped worker's end")
        _wait_for(lambda: _rows(out / "history.csv") >= rows_when_stopped + 2, 60,
                  "epochs after the replacement")
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=60)
        assert run.returncode == 143, stderr
    finally:
        if stopped is not None and stopped.is_running():
            stopped.kill()
        if run.poll() is None:
            run.kill()
            run.communicate()
