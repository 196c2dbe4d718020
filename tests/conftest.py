"""Shared fixtures. Every test is checked for leaks: no engine segment left in /dev/shm (or in
ENGINE_SHM_DIR), no worker log folder left in the temporary directory, no child process left alive
(multiprocess's own long-lived helpers excepted)."""
import os
import sys
import tempfile

import numpy as np
import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from engine.parallel.shm import blocks_of  # noqa: E402

_HELPERS = ("resource_tracker", "forkserver")


def _log_folders():
    """This process's worker log folders (``engine_<pid>_[<namespace>_]logs_*``)."""
    prefix = f"engine_{os.getpid()}_"
    try:
        names = os.listdir(tempfile.gettempdir())
    except OSError:
        return set()
    return {name for name in names if name.startswith(prefix) and "_logs_" in name}


def _our_children():
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(helper in " ".join(child.cmdline()) for helper in _HELPERS):
                continue
        except psutil.NoSuchProcess:
            continue
        children.append(child)
    return children


@pytest.fixture(autouse=True, scope="session")
def session_cache_directory(tmp_path_factory):
    """Generated data sets (MNIST-1D) are cached in this session's temporary folder, not in the
    user's ~/.cache; set in the environment so the CLI tests' subprocesses use it too."""
    saved = os.environ.get("ENGINE_CACHE_DIR")
    os.environ["ENGINE_CACHE_DIR"] = str(tmp_path_factory.mktemp("engine_cache"))
    yield
    if saved is None:
        os.environ.pop("ENGINE_CACHE_DIR", None)
    else:
        os.environ["ENGINE_CACHE_DIR"] = saved


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves a shared-memory segment, a log folder or a live child behind."""
    before, logs_before = set(blocks_of(os.getpid())), _log_folders()
    yield
    left = sorted(set(blocks_of(os.getpid())) - before)
    logs_left = sorted(_log_folders() - logs_before)
    alive = _our_children()
    psutil.wait_procs(alive, timeout=5)
    alive = [child for child in alive if child.is_running() and
             child.status() != psutil.STATUS_ZOMBIE]
    for child in alive:
        child.kill()
    assert not left, f"shared-memory segments left in /dev/shm: {left}"
    assert not logs_left, f"worker log folders left in {tempfile.gettempdir()}: {logs_left}"
    assert not alive, f"child processes left alive: {[child.pid for child in alive]}"


@pytest.fixture
def live_children():
    """A function returning this test process's live children (multiprocess helpers excepted)."""
    return _our_children


@pytest.fixture
def max_processes():
    """The largest process count a test may use without oversubscribing this machine."""
    return max(1, min(3, os.cpu_count() or 1))


@pytest.fixture
def blobs():
    """A small 3-class problem: 600 examples of 12 features, float32, with integer labels."""
    rng = np.random.default_rng(7)
    centers = rng.normal(0, 3, size=(3, 12))
    labels = rng.integers(0, 3, size=600)
    examples = (centers[labels] + rng.normal(size=(600, 12))).astype(np.float32)
    return examples, labels
