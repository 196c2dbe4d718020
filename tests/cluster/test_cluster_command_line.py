"""``python -m engine train --cluster mpi`` on two ranks: rank 0 writes the run folder and prints,
and a resume on one node (another node count) continues to the state an uninterrupted one-node
run of two workers reaches (rtol 1e-4: 2 nodes x 1 worker equal 1 node x 2 workers)."""
import csv
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import pytest

from engine.training.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = ["--model", "mlp", "--model-arg", "hidden=16", "--batch-size", "32", "--no-progress",
         "--lr", "0.02", "--seed", "0"]


def _engine(*arguments):
    return subprocess.run([sys.executable, "-m", "engine", "train", *arguments],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_train_on_two_ranks_then_resume_on_one_node(run_mpi, blobs, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "features.npy", blobs[0])
    np.save(data / "labels.npy", blobs[1])
    run_dir = tmp_path / "run"
    scratch_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "engine_rank1_*")))
    run = run_mpi(["-m", "engine", "train"], "--cluster", "mpi", "--data", data, "--workers", 1,
                  "--epochs", 2, "--output-dir", run_dir, *TRAIN, timeout_s=300)
    assert run.returncode == 0, run.describe()
    assert run.stdout.count("test accuracy") == 1, run.describe()  # rank 0 alone prints
    assert {"config.json", "history.csv", "model.h5", "results.json"} <= set(os.listdir(run_dir))
    # rank 1 ran in a private scratch folder, removed at its end
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "engine_rank1_*"))) <= scratch_before

    resumed = _engine("--resume", run_dir / "checkpoints" / "last.h5", "--epochs", "3",
                      "--workers", "2", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(run_dir / "history.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2", "3"]

    one_node = tmp_path / "one_node"
    alone = _engine("--data", str(data), "--workers", "2", "--epochs", "3", "--output-dir",
                    str(one_node), *TRAIN)
    assert alone.returncode == 0, alone.stderr[-3000:]
    np.testing.assert_allclose(load_checkpoint(str(run_dir / "model.h5")).state.buffer,
                               load_checkpoint(str(one_node / "model.h5")).state.buffer,
                               rtol=1e-4, atol=1e-6)


def _rank_process(launcher, rank):
    """The process of MPI rank ``rank`` among the launcher's descendants (by its environment)."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("OMPI_COMM_WORLD_RANK") == str(rank) and \
                    "engine" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_killed_rank_fails_the_run_with_the_last_checkpoint_intact_and_resume_continues(
        mpi_command, blobs, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "features.npy", blobs[0])
    np.save(data / "labels.npy", blobs[1])
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.h5"
    scratch_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "engine_rank1_*")))
    command, env = mpi_command(["-m", "engine", "train"], "--cluster", "mpi", "--data", data,
                               "--workers", 1, "--epochs", 400, "--output-dir", run_dir,
                               "--timeout", 20, *TRAIN)
    launcher = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.1)
        assert last.exists(), "no checkpoint within 120 s"
        victim = _rank_process(launcher, 1)
        assert victim is not None
        killed_at = time.monotonic()
        victim.kill()
        stdout, stderr = launcher.communicate(timeout=60)
        stopped_s = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
        # A SIGKILLed rank cannot remove its scratch folder (a few report files in /tmp).
        for folder in set(glob.glob(os.path.join(tempfile.gettempdir(), "engine_rank1_*"))) - \
                scratch_before:
            shutil.rmtree(folder, ignore_errors=True)
    assert launcher.returncode != 0, stdout[-2000:] + stderr[-2000:]
    assert "rank 1" in stderr and stopped_s < 20, (stopped_s, stderr[-2000:])
    done = load_checkpoint(str(last)).trainer["epoch"]  # intact: it loads
    assert 1 <= done < 400
    resumed = _engine("--resume", str(last), "--epochs", str(done + 2), "--workers", "2",
                      "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(run_dir / "history.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)][-1] == done + 2
