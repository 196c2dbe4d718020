"""SIGHUP (the terminal or SSH session closing) unwinds like SIGTERM while workers run: exit 129,
workers stopped, shared memory unlinked at once, not at the next start (issue 10, item 9)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from engine import ParallelBatchProcessor
from engine.parallel.shm import blocks_of
from models import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TRAIN_FOREVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import numpy as np
    from engine import ParallelBatchProcessor
    from models import MLP
    x = np.random.default_rng(0).normal(size=(2000, 16)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, size=2000)
    model = MLP(sizes=(16, 32, 3))
    state = model.init_state(0)
    with ParallelBatchProcessor(model, num_processes=2, batch_size=64) as processor:
        while True:
            state, _ = processor.run_parallel(x, y, state, {{"learning_rate": 1e-3}})
            print("workers", *processor.worker_pids, flush=True)
""")


def _default_hangup():
    """The script starts with SIGHUP's default action, as in a terminal, even when the tests
    themselves run under nohup (which ignores it, and an ignored SIGHUP is left ignored)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_hangup_and_terminate_unwind_through_cleanup(signum):
    script = subprocess.Popen([sys.executable, "-c", _TRAIN_FOREVER.format(root=ROOT)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=_default_hangup)
    try:
        deadline, workers = time.monotonic() + 60, []
        while time.monotonic() < deadline and len(workers) != 2:
            workers = [int(p) for p in script.stdout.readline().split()[1:]]
        assert len(workers) == 2, script.stderr.read()
        assert blocks_of(script.pid)
        script.send_signal(signum)
        script.communicate(timeout=30)
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
    assert script.returncode == 128 + signum
    assert blocks_of(script.pid) == []  # unlinked on the way out, no sweep needed
    assert not [pid for pid in workers if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_handlers_are_restored_and_an_ignored_hangup_is_left_ignored(blobs):
    previous_terminate = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # whatever the runner set
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with ParallelBatchProcessor(MLP(sizes=(12, 4, 3)), num_processes=2, batch_size=20) as p:
            p.process_batch(blobs[0][:20], blobs[1][:20], p.model.init_state(0),
                            {"learning_rate": 0.1})
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal
        with ParallelBatchProcessor(MLP(sizes=(12, 4, 3)), num_processes=2, batch_size=20) as p:
            p.process_batch(blobs[0][:20], blobs[1][:20], p.model.init_state(0),
                            {"learning_rate": 0.1})
            assert signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)
        signal.signal(signal.SIGTERM, previous_terminate)
