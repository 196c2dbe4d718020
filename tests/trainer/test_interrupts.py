"""SIGTERM and Ctrl-C during `engine train`: a resumable checkpoint is written first, nothing is
left behind, and --resume continues the run."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from engine.training.checkpoint import load_checkpoint
from engine.parallel.shm import blocks_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _epochs_logged(history_csv):
    try:
        with open(history_csv) as f:
            return max(0, len(f.read().strip().splitlines()) - 1)
    except OSError:
        return 0


def _checkpointed_epoch(path):
    try:
        return load_checkpoint(path).trainer["epoch"]
    except (OSError, ValueError, KeyError):
        return 0  # not written yet


@pytest.mark.slow
@pytest.mark.parametrize("signum,exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_run_checkpoints_first_and_resumes(tmp_path, signum, exit_code):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "engine", "train", "--data", str(tmp_path / "data.npz"),
               "--model", "mlp", "--epochs", "100000", "--batch-size", "32", "--workers", "2",
               "--output-dir", str(out), "--no-progress"]
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 120
    # The checkpoint of epoch 2 is written after its history row: wait for the file itself.
    while _checkpointed_epoch(out / "checkpoints" / "last.h5") < 2 and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.poll() is None, run.communicate()
    workers = [child.pid for child in psutil.Process(run.pid).children(recursive=True)]
    run.send_signal(signum)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == exit_code, stderr
    checkpoint = load_checkpoint(out / "checkpoints" / "last.h5")
    done = checkpoint.trainer["epoch"]
    assert done >= 2 and checkpoint.training_state is not None
    assert blocks_of(run.pid) == []
    assert not [pid for pid in workers if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    resumed = subprocess.run(command[:command.index("--epochs")] + [
        "--epochs", str(done + 1), "--resume", str(out / "checkpoints" / "last.h5"),
        "--output-dir", str(out), "--workers", "2", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out / "model.h5").trainer["epoch"] == done + 1
