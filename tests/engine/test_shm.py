"""Shared-memory blocks: naming, permissions, cleanup, sweeping only blocks provably ours whose
owner is gone, a small /dev/shm refused with the fixes, and file-backed blocks."""
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

from engine.parallel.shm import (SHM_DIRECTORY, SharedBlock, blocks_of, namespace_token,
                                 sweep_orphaned_blocks)


def test_block_is_named_after_its_owner_and_private_to_it():
    block = SharedBlock.create("test", 1024)
    try:
        assert block.name.startswith(f"engine_{os.getpid()}_")
        mode = stat.S_IMODE(os.stat(os.path.join(SHM_DIRECTORY, block.name)).st_mode)
        assert mode == 0o600
    finally:
        block.close()


def test_close_unlinks_and_is_safe_to_call_twice():
    block = SharedBlock.create("test", 64)
    name = block.name
    block.close()
    block.close()
    assert name not in blocks_of(os.getpid())


def test_attached_view_sees_the_owners_writes():
    owner = SharedBlock.create("test", 80)
    reader = SharedBlock.attach(owner.name, 80)
    try:
        owner.array((10,), np.float64)[:] = np.arange(10)
        np.testing.assert_array_equal(reader.array((10,), np.float64), np.arange(10))
    finally:
        reader.close()
        owner.close()
    assert owner.name not in blocks_of()


def test_sweep_removes_blocks_of_a_dead_owner_and_keeps_live_ones():
    code = ("import sys; sys.path.insert(0, %r); from engine.parallel.shm import SharedBlock; "
            "b = SharedBlock.create('orphan', 64); print(b.name); import os; os._exit(0)"
            % os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    orphan = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    mine = SharedBlock.create("alive", 64)
    try:
        assert orphan in blocks_of()
        removed = sweep_orphaned_blocks()
        assert orphan in removed and orphan not in blocks_of()
        assert mine.name in blocks_of()
    finally:
        mine.close()


# -- a small /dev/shm (issue 10, item 1) ----------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _can_make_private_mounts():
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


needs_root_namespaces = pytest.mark.skipif(
    not _can_make_private_mounts(),
    reason="needs root and unshare(1) to mount a small tmpfs on /dev/shm in a private mount "
           "namespace (the host's /dev/shm is never shrunk)")


def _in_small_shm(script, size="8m", env=None):
    """Run ``sh -c script`` with an 8 MB tmpfs on /dev/shm in a private mount namespace."""
    shell = f"mount -t tmpfs -o size={size} tmpfs /dev/shm && {script}"
    return subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ, **(env or {})))


@needs_root_namespaces
def test_a_block_larger_than_free_shared_memory_is_refused_at_creation_and_leaves_nothing(
        tmp_path):
    script = tmp_path / "blocks.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        from engine.parallel.shm import SharedBlock, SharedMemoryFullError
        from engine.parallel.shm import check_shared_memory_space
        try:
            check_shared_memory_space(4 << 20, 6 << 20)
        except SharedMemoryFullError as error:
            print("check:", error)
        small = SharedBlock.create("small", 6 << 20)   # fits: all of its pages are reserved now
        try:
            SharedBlock.create("big", 4 << 20)         # would SIGBUS later without the reserve
        except SharedMemoryFullError as error:
            print("create:", error)
        small.array((6 << 20,), "u1")[:] = 1           # touching reserved pages is safe
        small.close()
        print("left:", os.listdir("/dev/shm"))
    """))
    child = _in_small_shm(f"{sys.executable} {script}")
    assert child.returncode == 0, child.stderr
    lines = child.stdout.splitlines()
    assert lines[0].startswith("check: shared memory is too small: this run needs 10.0 MiB in "
                               "/dev/shm but only 8.0 MiB is free")
    assert "--shm-size=" in lines[0] and "ENGINE_SHM_DIR" in lines[0]
    assert lines[1].startswith("create: shared memory is too small")
    assert lines[2] == "left: []"


@needs_root_namespaces
def test_training_on_a_small_dev_shm_exits_with_the_fixes_instead_of_a_bus_error(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    np.save(folder / "features.npy", rng.normal(size=(50_000, 100)).astype(np.float32))  # 20 MB
    np.save(folder / "labels.npy", rng.integers(0, 3, size=50_000))
    train = (f"{sys.executable} -m engine train --data {folder} --workers 2 --model mlp "
             f"--model-arg hidden=8 --epochs 1 --batch-size 1000 --no-progress --output-dir "
             f"{tmp_path / 'run'}; echo exit=$?; ls -A /dev/shm | wc -l; ls -A {tmp_path / 'shm'}"
             " | wc -l")
    (tmp_path / "shm").mkdir()
    child = _in_small_shm(train)
    assert "Bus error" not in child.stderr
    lines = child.stdout.splitlines()
    assert lines[-3:] == ["exit=1", "0", "0"], (child.stdout, child.stderr)
    assert "shared memory is too small" in child.stderr and "--shm-size=" in child.stderr
    # One line of error (a host's own warnings, such as held-back BLAS kernels, aside).
    errors = [line for line in child.stderr.splitlines()
              if not line.startswith("engine train: warning:")]
    assert len(errors) == 1 and "--shm-dir" in errors[0], child.stderr
    # The second fix the message names: blocks in a directory on a larger file system.
    child = _in_small_shm(train.replace("--no-progress", f"--no-progress --shm-dir "
                                        f"{tmp_path / 'shm'} --overwrite"))
    assert child.stdout.splitlines()[-3:] == ["exit=0", "0", "0"], (child.stdout, child.stderr)
    assert "test accuracy" in child.stdout


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_file_backed_blocks_in_engine_shm_dir_serve_every_start_method(tmp_path, monkeypatch,
                                                                      blobs, start_method):
    from engine import ParallelBatchProcessor
    from models import MLP
    monkeypatch.setenv("ENGINE_SHM_DIR", str(tmp_path))
    model = MLP(sizes=(12, 8, 3))
    state = model.init_state(0)
    expected, _ = ParallelBatchProcessor(model, num_processes=1, batch_size=100).run_parallel(
        *blobs, state, {"learning_rate": 0.01})
    with ParallelBatchProcessor(model, num_processes=2, batch_size=100,
                                start_method=start_method) as processor:
        trained, _ = processor.run_parallel(*blobs, state, {"learning_rate": 0.01})
        files = sorted(os.listdir(tmp_path))
        assert files and all(name.startswith(f"engine_{os.getpid()}_") for name in files)
        assert not blocks_of_in_dev_shm(os.getpid())
    np.testing.assert_allclose(trained.buffer, expected.buffer, rtol=1e-4, atol=1e-6)
    assert os.listdir(tmp_path) == []


def blocks_of_in_dev_shm(pid):
    return [name for name in os.listdir(SHM_DIRECTORY) if name.startswith(f"engine_{pid}_")]


def test_engine_shm_dir_that_does_not_exist_is_refused_with_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_SHM_DIR", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="ENGINE_SHM_DIR must name an existing directory.*missing"):
        SharedBlock.create("test", 64)


# -- the start-up sweep touches only what is provably ours (issue 10, item 4) --------------------
def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _fake_block(name, uid=None):
    path = os.path.join(SHM_DIRECTORY, name)
    with open(path, "wb") as f:
        f.write(b"x")
    os.chmod(path, 0o600)
    if uid is not None:
        os.chown(path, uid, -1)
    return name


def test_sweep_skips_other_namespaces_other_names_and_errors(monkeypatch):
    dead, token = _dead_pid(), namespace_token()
    other_token = "0" * 8 if token != "0" * 8 else "1" * 8
    ours = _fake_block(f"engine_{dead}_{token}_0badcafe_data")
    kept = [_fake_block(f"engine_{dead}_{other_token}_0badcafe_data"),  # another container/boot
            _fake_block(f"engine_{dead}_0badcafe_data"),                # the old naming
            _fake_block(f"engine_{dead}_{token}_0badcafe_data.bak"),    # not our exact pattern
            _fake_block(f"engine_{os.getpid()}_{token}_0badcafe_data")]  # alive: this process
    try:
        real_unlink = os.unlink

        def refuse(path, *args, **kwargs):
            if path.endswith(ours):
                raise PermissionError(1, "Operation not permitted", path)
            return real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", refuse)
        assert ours not in sweep_orphaned_blocks()  # an OSError is skipped, never raised
        monkeypatch.undo()
        assert ours in sweep_orphaned_blocks() and ours not in blocks_of()
        assert all(name in blocks_of() for name in kept)
    finally:
        for name in kept + [ours]:
            if os.path.exists(os.path.join(SHM_DIRECTORY, name)):
                os.unlink(os.path.join(SHM_DIRECTORY, name))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a file owned by another uid")
def test_sweep_as_root_leaves_other_users_blocks_and_log_folders_alone():
    dead, token = _dead_pid(), namespace_token()
    theirs = _fake_block(f"engine_{dead}_{token}_0badcafe_data", uid=12345)
    folder = tempfile.mkdtemp(prefix=f"engine_{dead}_{token}_logs_")
    os.chown(folder, 12345, -1)
    try:
        sweep_orphaned_blocks()
        assert theirs in blocks_of() and os.path.isdir(folder)
        os.chown(folder, os.geteuid(), -1)
        sweep_orphaned_blocks()
        assert not os.path.exists(folder)  # ours, owner dead, our namespace: swept
    finally:
        os.unlink(os.path.join(SHM_DIRECTORY, theirs))
        shutil.rmtree(folder, ignore_errors=True)


def _can_make_pid_namespaces():
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-p", "-f", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_make_pid_namespaces(),
                    reason="needs root and unshare(1) to start an engine in another PID namespace")
def test_an_engine_in_another_pid_namespace_never_sweeps_a_live_runs_blocks():
    # The container case: /dev/shm shared, PIDs not. Our PID looks dead from inside.
    mine = SharedBlock.create("alive", 64)
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); "
            "from engine.parallel.shm import sweep_orphaned_blocks, SharedBlock; "
            "print(sweep_orphaned_blocks()); b = SharedBlock.create('inner', 64); print(b.name); "
            "import os; os._exit(0)")
    try:
        child = subprocess.run(["unshare", "-p", "-f", sys.executable, "-c", code],
                               capture_output=True, text=True, timeout=60)
        assert child.returncode == 0, child.stderr
        removed, inner = child.stdout.splitlines()
        assert mine.name in blocks_of() and removed == "[]"
        # ... and the host does not sweep the inner engine's block either: its PID is not ours.
        assert inner not in sweep_orphaned_blocks() and inner in blocks_of()
    finally:
        mine.close()
        for name in blocks_of():
            if name.endswith("_inner"):
                os.unlink(os.path.join(SHM_DIRECTORY, name))
