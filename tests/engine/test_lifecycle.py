"""Process lifecycle: thread limits in workers, Ctrl-C and exit clean up everything."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from engine import ParallelBatchProcessor
from engine.parallel.shm import blocks_of
from models import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _ChecksItsThreadLimit(MLP):
    """Raises inside the worker unless every BLAS/OpenMP pool there has ``expected`` threads."""

    def __init__(self, sizes, expected):
        super().__init__(sizes)
        self.expected, self.owner = expected, os.getpid()

    def loss_and_grads(self, state, x, y, *, rng=None):
        from threadpoolctl import threadpool_info
        counts = [pool["num_threads"] for pool in threadpool_info()]
        in_worker = os.getpid() != self.owner  # the owner's contract dry run is not limited
        if in_worker and any(count != self.expected for count in counts):
            raise AssertionError(f"thread pools {counts}, expected {self.expected} each")
        return super().loss_and_grads(state, x, y, rng=rng)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_limit_blas_threads_to_their_share_of_the_cores(blobs, start_method):
    from engine import usable_cores
    processes = min(2, usable_cores())
    model = _ChecksItsThreadLimit((12, 8, 3), expected=max(1, usable_cores() // processes))
    with ParallelBatchProcessor(model, num_processes=processes, batch_size=20,
                                start_method=start_method) as processor:
        if processes == 1:
            pytest.skip("one usable core: no worker processes to check")
        processor.process_batch(blobs[0][:20], blobs[1][:20], model.init_state(0),
                                {"learning_rate": 0.1})


_TRAIN_FOREVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import numpy as np
    from engine import ParallelBatchProcessor
    from models import MLP
    x = np.random.default_rng(0).normal(size=(4000, 64)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, size=4000)
    model = MLP(sizes=(64, 256, 10))
    state = model.init_state(0)
    with ParallelBatchProcessor(model, num_processes=2, batch_size=64) as processor:
        print("workers", *processor.worker_pids or [], flush=True)
        while True:
            state, _ = processor.run_parallel(x, y, state, {{"learning_rate": 1e-3}})
            print("workers", *processor.worker_pids, flush=True)
""")


def _start_training_script():
    script = subprocess.Popen([sys.executable, "-c", _TRAIN_FOREVER.format(root=ROOT)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = script.stdout.readline()
        pids = [int(p) for p in line.split()[1:]]
        if len(pids) == 2:
            return script, pids
    script.kill()
    raise AssertionError(f"the script never started its workers: {script.stderr.read()}")


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_unlinks_shared_memory():
    script, workers = _start_training_script()
    assert blocks_of(script.pid)
    script.send_signal(signal.SIGINT)
    _, stderr = script.communicate(timeout=30)
    assert "KeyboardInterrupt" in stderr
    assert blocks_of(script.pid) == []
    assert not [pid for pid in workers if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_workers_exit_by_themselves_when_the_owner_is_killed():
    script, workers = _start_training_script()
    script.kill()
    script.wait()
    gone, alive = psutil.wait_procs([psutil.Process(pid) for pid in workers if
                                     psutil.pid_exists(pid)], timeout=10)
    assert not alive
    from engine.parallel.shm import sweep_orphaned_blocks
    sweep_orphaned_blocks()  # what the next engine start does
    assert blocks_of(script.pid) == []
    import glob
    import tempfile
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"engine_{script.pid}_*logs_*"))


def test_workers_keep_their_state_between_calls_without_restarting(blobs):
    model = MLP(sizes=(12, 8, 3))
    with ParallelBatchProcessor(model, num_processes=2, batch_size=50) as processor:
        state = model.init_state(0)
        state, _ = processor.run_parallel(*blobs, state, {"learning_rate": 0.01})
        pids = processor.worker_pids
        state, _ = processor.run_parallel(*blobs, state, {"learning_rate": 0.01})
        assert processor.worker_pids == pids
    assert np.all(np.isfinite(state.buffer))


def test_worker_start_time_is_reported_for_a_pool_and_none_in_process(blobs):
    model = MLP(sizes=(12, 8, 3))
    state = model.init_state(0)
    with ParallelBatchProcessor(model, num_processes=1, batch_size=50) as processor:
        processor.run_parallel(*blobs, state, {"learning_rate": 0.01})
        assert processor.worker_start_s is None
    with ParallelBatchProcessor(model, num_processes=2, batch_size=50) as processor:
        assert processor.worker_start_s is None  # workers start with the first call
        began = time.perf_counter()
        processor.run_parallel(*blobs, state, {"learning_rate": 0.01})
        assert 0.0 < processor.worker_start_s < time.perf_counter() - began


@pytest.mark.slow
def test_sigterm_unwinds_through_cleanup_and_exits_143():
    script, workers = _start_training_script()
    script.send_signal(signal.SIGTERM)
    script.communicate(timeout=30)
    assert script.returncode == 143
    assert blocks_of(script.pid) == []
    assert not [pid for pid in workers if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_sigterm_handler_is_restored_when_the_processor_closes(blobs):
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with ParallelBatchProcessor(MLP(sizes=(12, 4, 3)), num_processes=2, batch_size=20) as p:
        p.process_batch(blobs[0][:20], blobs[1][:20], p.model.init_state(0),
                        {"learning_rate": 0.1})
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_zombie_owner_counts_as_gone():
    from engine.parallel.barrier import owner_pid_alive
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and \
            time.monotonic() < deadline:
        time.sleep(0.05)  # exited, not yet reaped: a zombie
    assert not owner_pid_alive(child.pid)
    child.wait()
    assert not owner_pid_alive(child.pid)
    assert owner_pid_alive(os.getpid())


def test_an_in_process_run_reuses_freed_memory_instead_of_faulting_it_in_again():
    # A fresh interpreter has glibc's defaults: freeing a step's 16 MB of temporaries trims the
    # heap, so the next step faults them in again (~4,000 page faults). After a num_processes=1
    # run, freed memory is kept, as in a worker.
    script = textwrap.dedent("""
        import resource
        import numpy as np
        from engine import ParallelBatchProcessor
        from models import MLP

        def faults_per_step():
            def step():
                temporaries = [np.ones(1 << 20, np.float32) for _ in range(4)]
                del temporaries
            step(), step()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(10):
                step()
            return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

        before = faults_per_step()
        with ParallelBatchProcessor(MLP((4, 3)), num_processes=1, batch_size=4) as processor:
            processor.run_parallel(np.zeros((8, 4), np.float32), np.zeros(8, np.int64),
                                   MLP((4, 3)).init_state(seed=0), {"learning_rate": 0.1})
        print(before, faults_per_step())
    """)
    finished = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    before, after = (float(v) for v in finished.stdout.split())
    assert before > 1000, f"the baseline should fault the freed temporaries in ({before})"
    assert after < 50, f"{after} page faults per step after an in-process run"
