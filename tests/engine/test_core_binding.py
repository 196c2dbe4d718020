"""Workers are bound to disjoint cores when they fit in the owner's affinity, and left to the
kernel when they do not (or when bind_cores=False); they run as SCHED_BATCH jobs."""
import os

import psutil
import pytest

from engine import ParallelBatchProcessor
from engine.parallel.system import worker_core_sets
from models import MLP

MODEL = MLP(sizes=(12, 8, 3))


def _affinities(blobs, **options):
    with ParallelBatchProcessor(MODEL, batch_size=20, **options) as processor:
        processor.process_batch(blobs[0][:20], blobs[1][:20], MODEL.init_state(0),
                                {"learning_rate": 0.1})
        return [set(psutil.Process(pid).cpu_affinity()) for pid in processor.worker_pids]


def test_core_sets_are_disjoint_and_none_when_oversubscribed():
    cores = sorted(os.sched_getaffinity(0))
    sets = worker_core_sets(len(cores), 1)
    assert [sorted(s) for s in sets] == [[c] for c in cores]
    assert worker_core_sets(len(cores) + 1, 1) is None
    assert worker_core_sets(1, len(cores)) == [set(cores)]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_two_workers_run_on_two_different_cores(blobs):
    first, second = _affinities(blobs, num_processes=2)
    assert len(first) == len(second) == len(os.sched_getaffinity(0)) // 2
    assert not first & second


def test_unbound_workers_keep_the_owners_affinity(blobs):
    owner = set(os.sched_getaffinity(0))
    processes = min(2, len(owner))
    assert all(cores == owner for cores in _affinities(blobs, num_processes=processes,
                                                        bind_cores=False))
    assert all(cores == owner for cores in _affinities(blobs, num_processes=len(owner) + 1))


def _thread_policies(pid):
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.parametrize("threads, start_method", [(1, "fork"), (2, "fork"), (2, "spawn")])
def test_workers_run_as_batch_jobs_and_the_owner_does_not(blobs, threads, start_method):
    # SCHED_BATCH: a worker woken by the owner's pipe write waits for the owner's turn to end
    # instead of preempting it, so the owner wakes every worker before any starts computing.
    # Every thread of the worker (its BLAS pool too); a policy other than the default is kept.
    owner_policy = os.sched_getscheduler(0)
    with ParallelBatchProcessor(MODEL, batch_size=20, num_processes=2,
                                start_method=start_method) as processor:
        processor.threads_per_process = threads  # read when the workers start (2: a BLAS pool)
        processor.process_batch(blobs[0][:20], blobs[1][:20], MODEL.init_state(0),
                                {"learning_rate": 0.1})
        policies = [_thread_policies(pid) for pid in processor.worker_pids]
    expected = os.SCHED_BATCH if owner_policy == os.SCHED_OTHER else owner_policy
    assert policies == [{expected}, {expected}]
    assert os.sched_getscheduler(0) == owner_policy


def test_batch_scheduling_keeps_a_policy_the_user_chose():
    from engine.parallel.system import batch_scheduling
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        pytest.skip("this test run does not have the default policy")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the user's choice first, then what a worker does at start
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            switched = batch_scheduling()
            os.write(write, bytes([int(switched), os.sched_getscheduler(0)]))
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 2)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == bytes([0, os.SCHED_IDLE])
