"""The leak fixture itself can fail: a log folder or a block left behind is reported."""
import importlib.util
import os
import tempfile

from engine.parallel.shm import SharedBlock, blocks_of, log_directory_prefix

# The root conftest by path (several conftest.py files share that module name).
_spec = importlib.util.spec_from_file_location(
    "root_conftest", os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py"))
conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conftest)


def test_the_fixture_sees_a_worker_log_folder_of_either_naming():
    before = conftest._log_folders()
    folders = [tempfile.mkdtemp(prefix=log_directory_prefix()),
               tempfile.mkdtemp(prefix=f"engine_{os.getpid()}_logs_")]
    try:
        assert conftest._log_folders() - before == {os.path.basename(f) for f in folders}
    finally:
        for folder in folders:
            os.rmdir(folder)
    assert conftest._log_folders() == before


def test_the_fixture_sees_a_block_in_engine_shm_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_SHM_DIR", str(tmp_path))
    block = SharedBlock.create("test", 64)
    try:
        assert block.name in blocks_of(os.getpid()) and block.name.startswith(str(tmp_path))
    finally:
        block.close()
    assert blocks_of(os.getpid()) == []
