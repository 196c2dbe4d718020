"""Trainer options are checked when given, naming what was received (issue 10, items 5 and 9)."""
import os

import pytest

from engine.cli.jobs import _timeout
from engine.training.trainer import Trainer
from models import MLP

MODEL = MLP(sizes=(12, 8, 3))


@pytest.mark.parametrize("clip_norm", [True, False, 0, -1.0, "1", float("nan")])
def test_a_clip_norm_that_is_not_a_positive_number_is_refused_at_once(clip_norm):
    with pytest.raises(ValueError, match=r"clip_norm must be a positive number or None\. "
                                         r"Received: clip_norm="):
        Trainer(MODEL, clip_norm=clip_norm)


@pytest.mark.parametrize("timeout_s", [True, 0, -5, "fast"])
def test_a_bad_timeout_is_refused_at_once(timeout_s):
    with pytest.raises(ValueError, match="timeout_s must be 'auto', a positive number"):
        Trainer(MODEL, timeout_s=timeout_s)


def test_the_cli_timeout_maps_to_the_trainer():
    assert _timeout({"timeout": None}) == "auto" and _timeout({}) == "auto"
    assert _timeout({"timeout": 0}) is None and _timeout({"timeout": 7}) == 7.0
    with pytest.raises(ValueError, match="--timeout -1"):
        _timeout({"timeout": -1})


def test_shm_dir_puts_the_blocks_there_for_this_command_only(data_folder, tmp_path, monkeypatch):
    from engine.cli.main import main
    from engine.parallel.shm import SharedBlock
    monkeypatch.delenv("ENGINE_SHM_DIR", raising=False)
    created, real_create = [], SharedBlock.create.__func__

    def recording_create(cls, purpose, size):
        block = real_create(cls, purpose, size)
        created.append(block.name)
        return block

    monkeypatch.setattr(SharedBlock, "create", classmethod(recording_create))
    shm = tmp_path / "shm"
    shm.mkdir()
    assert main(["train", "--data", str(data_folder), "--model", "mlp", "--epochs", "1",
                 "--workers", "2", "--batch-size", "32", "--no-progress", "--shm-dir", str(shm),
                 "--output-dir", str(tmp_path / "run")]) == 0
    assert created and all(name.startswith(str(shm) + "/engine_") for name in created)
    assert os.listdir(shm) == [] and "ENGINE_SHM_DIR" not in os.environ
