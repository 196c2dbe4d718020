"""One run per folder (issue 10, items 2 and 3): a folder in use is refused at once, a folder
holding a run is refused unless --overwrite, a resumed run continues in the folder holding its
checkpoint (never a path read from the file), a failed resume changes nothing, and partial
checkpoint files left by a kill are removed at the next start."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import h5py
import pytest

from engine.cli.main import main
from engine.training.run_folder import LOCK_NAME, hold_run_folder, run_folder_of
from engine.training.trainer import fit
from models import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train(data_folder, out, *flags):
    return main(["train", "--data", str(data_folder), "--model", "mlp", "--model-arg",
                 "hidden=8", "--batch-size", "32", "--workers", "1", "--no-progress",
                 *(["--output-dir", str(out)] if out is not None else []), *flags])


def _files(folder):
    """Every file of a run folder (but the lock file) with its bytes."""
    found = {}
    for where, _, names in os.walk(folder):
        for name in names:
            if name != LOCK_NAME:
                path = os.path.join(where, name)
                with open(path, "rb") as f:
                    found[os.path.relpath(path, folder)] = f.read()
    return found


def test_a_folder_held_by_another_process_is_refused_at_once(data_folder, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {ROOT!r})
            from engine.training.run_folder import hold_run_folder
            with hold_run_folder({str(out)!r}):
                print("held", flush=True)
                sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _train(data_folder, out, "--epochs", "1") == 1
        error = capsys.readouterr().err
        assert f"is in use by another run (process {holder.pid})" in error
        assert error.count("\n") == 1 and os.listdir(out) == [LOCK_NAME]  # nothing written
        # At once: before the data is even looked at.
        assert main(["train", "--data", str(tmp_path / "no-such-data"), "--output-dir", str(out),
                     "--no-progress"]) == 1
        assert "is in use by another run" in capsys.readouterr().err
    finally:
        holder.communicate("done\n", timeout=30)
    assert _train(data_folder, out, "--epochs", "1") == 0  # the lock went with its holder


def test_a_folder_holding_a_run_is_refused_unless_overwrite(data_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data_folder, out, "--epochs", "1", "--checkpoint-every", "1") == 0
    before = _files(out)
    capsys.readouterr()
    assert _train(data_folder, out, "--epochs", "2") == 1
    error = capsys.readouterr().err
    assert "already holds a run" in error and "--overwrite" in error and error.count("\n") == 1
    assert _files(out) == before
    # --overwrite with data that fails its checks: refused before the old run is removed.
    assert _train(tmp_path / "no-such-data", out, "--epochs", "2", "--overwrite") == 1
    assert _files(out) == before
    (out / "notes.txt").write_text("mine")  # not a file of a run: --overwrite keeps it
    assert _train(data_folder, out, "--epochs", "2", "--overwrite") == 0
    assert not (out / "checkpoints" / "epoch_0001.h5").exists()  # the old run's files are gone
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_fit_refuses_an_output_dir_holding_a_run_unless_overwrite(blobs, tmp_path, quiet_fit):
    fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=1, output_dir=tmp_path, **quiet_fit)
    with pytest.raises(ValueError, match="already holds a run"):
        fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=1, output_dir=tmp_path, **quiet_fit)
    fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=1, output_dir=tmp_path, overwrite=True,
        **quiet_fit)


def test_the_lock_is_held_once_per_process_and_released(tmp_path):
    folder = str(tmp_path / "run")
    code = ("import sys; sys.path.insert(0, %r); from engine.training.run_folder import "
            "hold_run_folder, RunFolderError\ntry:\n    hold_run_folder(%r).__enter__()\n"
            "except RunFolderError as e: print('refused')" % (ROOT, folder))
    with hold_run_folder(folder):
        with hold_run_folder(folder):  # the CLI around the trainer: the same run
            pass
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert child.stdout.strip() == "refused", child.stderr  # still held after the inner exit
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.stdout.strip() == "", child.stderr


def test_resume_from_a_copied_folder_writes_only_into_the_copy(data_folder, tmp_path,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _train(data_folder, "original", "--epochs", "2") == 0  # relative, as users type it
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    before = _files(tmp_path / "original")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the stored relative path would now point elsewhere/original
    assert main(["train", "--resume", str(tmp_path / "copy" / "checkpoints" / "last.h5"),
                 "--epochs", "3", "--no-progress"]) == 0
    assert _files(tmp_path / "original") == before and os.listdir(elsewhere) == []
    rows = (tmp_path / "copy" / "history.csv").read_text().strip().splitlines()
    assert len(rows) == 4  # header and epochs 1-3


def test_a_path_stored_in_the_checkpoint_is_never_written(data_folder, tmp_path):
    assert _train(data_folder, tmp_path / "run", "--epochs", "1") == 0
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text("precious")
    last = tmp_path / "run" / "checkpoints" / "last.h5"
    with h5py.File(last, "a") as f:
        metadata = json.loads(f.attrs["metadata"])
        metadata["config"]["output_dir"] = str(victim)
        f.attrs["metadata"] = json.dumps(metadata)
    assert main(["train", "--resume", str(last), "--epochs", "2", "--no-progress"]) == 0
    assert os.listdir(victim) == ["config.json"] and (victim / "config.json").read_text() == \
        "precious"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 2


def test_a_failed_resume_changes_nothing_and_another_output_dir_is_refused(data_folder, tmp_path,
                                                                          capsys):
    out = tmp_path / "run"
    assert _train(data_folder, out, "--epochs", "1") == 0
    before = _files(out)
    last = str(out / "checkpoints" / "last.h5")
    capsys.readouterr()
    # Another model's layout: fails validation after the data and model are built.
    assert main(["train", "--resume", last, "--epochs", "2", "--model-arg", "hidden=9",
                 "--no-progress"]) == 1
    assert "does not match the expected layout" in capsys.readouterr().err
    assert _files(out) == before
    assert main(["train", "--resume", last, "--epochs", "2", "--output-dir",
                 str(tmp_path / "other"), "--no-progress"]) == 1
    assert "continues in the folder of its checkpoint" in capsys.readouterr().err
    assert _files(out) == before and not (tmp_path / "other").exists()


def test_partial_checkpoint_files_are_removed_at_the_next_resume(data_folder, tmp_path):
    out = tmp_path / "run"
    assert _train(data_folder, out, "--epochs", "1") == 0
    partials = [out / "checkpoints" / "last.h5.partial-4242", out / "model.h5.tmp-4242"]
    for partial in partials:
        partial.write_bytes(b"half a file")
    assert main(["train", "--resume", str(out / "checkpoints" / "last.h5"), "--epochs", "2",
                 "--no-progress"]) == 0
    assert not any(partial.exists() for partial in partials)


def test_run_folder_of_comes_from_the_checkpoints_location():
    assert run_folder_of("/a/run/checkpoints/last.h5") == "/a/run"
    assert run_folder_of("/a/run/model.h5") == "/a/run"
