"""A rank that dies or hangs stops every other rank within timeout_s, with an error naming it,
and leaves no process and no shared memory behind (the SIGKILLed rank's own segments are swept by
the next start on that node, as after any SIGKILL)."""
import psutil
import pytest

from engine.parallel.shm import blocks_of, sweep_orphaned_blocks

TIMEOUT_S = 4.0


def _started(run):
    return {record["rank"]: record for record in run.records if record["event"] == "started"}


def _alive_after(pid, seconds):
    """True if ``pid`` still runs after ``seconds`` (an orphaned worker notices within 0.1 s)."""
    try:
        process = psutil.Process(pid)
        process.wait(timeout=seconds)
    except psutil.NoSuchProcess:
        return False
    except psutil.TimeoutExpired:
        return process.status() != psutil.STATUS_ZOMBIE
    return False


def _assert_nothing_left(run, killed=()):
    """No process of any rank alive; no shared memory of a surviving rank (checked before any
    sweep); a SIGKILLed rank's segments go with the next start's sweep, as after any SIGKILL."""
    started = _started(run)
    assert sorted(started) == [0, 1], run.describe()
    for rank, record in started.items():
        for pid in [record["pid"], *record["workers"]]:
            assert not _alive_after(pid, 5.0), f"rank {rank}'s process {pid} is still alive"
        if rank not in killed:
            assert blocks_of(record["pid"]) == [], (rank, blocks_of(record["pid"]))
    sweep_orphaned_blocks()  # what the next start on the node does
    for rank, record in started.items():
        assert blocks_of(record["pid"]) == [], (rank, blocks_of(record["pid"]))


@pytest.mark.slow
def test_hung_rank_is_named_by_the_others_within_timeout(run_mpi):
    run = run_mpi("failure.py", "sleep", TIMEOUT_S)
    errors = [record for record in run.records if record["event"] == "error"]
    assert run.returncode != 0, run.describe()
    assert len(errors) == 1 and errors[0]["rank"] == 0, run.describe()
    assert errors[0]["ranks"] == [1]
    assert "rank(s) [1] did not reach the cross-node mean" in errors[0]["message"]
    assert TIMEOUT_S <= errors[0]["after_s"] < TIMEOUT_S + 2.0, errors[0]
    assert run.elapsed_s < 60, run.describe()  # the hung rank was stopped too
    _assert_nothing_left(run)


@pytest.mark.slow
def test_killed_rank_stops_the_others_and_the_launcher_names_it(run_mpi):
    run = run_mpi("failure.py", "kill", TIMEOUT_S)
    assert run.returncode != 0, run.describe()
    assert "rank 1" in run.stderr and "signal 9" in run.stderr, run.describe()
    assert run.elapsed_s < 30, run.describe()
    _assert_nothing_left(run, killed=(1,))


@pytest.mark.slow
def test_killed_rank_is_named_by_the_others_under_ulfm(run_mpi):
    run = run_mpi("failure.py", "kill", TIMEOUT_S, mpirun_args=("--with-ft", "ulfm"))
    errors = [record for record in run.records if record["event"] == "error"]
    # (mpirun's own exit code under ULFM is 0 even after MPI_Abort: Open MPI 5.0's choice.)
    assert "MPI_ABORT was invoked on rank 0" in run.stderr, run.describe()
    assert len(errors) == 1 and errors[0]["ranks"] == [1], run.describe()
    assert errors[0]["after_s"] < TIMEOUT_S + 2.0
    _assert_nothing_left(run, killed=(1,))


@pytest.mark.slow
def test_stall_inside_the_transfer_ends_the_waiting_rank_by_its_watchdog(run_mpi):
    run = run_mpi("failure.py", "stall", TIMEOUT_S)
    assert run.returncode != 0, run.describe()
    assert "did not finish within timeout_s=4.0 although every rank had arrived" in run.stderr, \
        run.describe()
    assert run.elapsed_s < 60, run.describe()
    _assert_nothing_left(run)


@pytest.mark.slow
def test_uncaught_exception_on_one_rank_aborts_the_job_at_once(run_mpi):
    run = run_mpi("failure.py", "raise", 60.0)
    assert run.returncode != 0, run.describe()
    assert "RuntimeError: rank 1 fails on purpose" in run.stderr, run.describe()
    assert run.elapsed_s < 30, run.describe()  # not the 60 s timeout: the job was aborted
    _assert_nothing_left(run)


@pytest.mark.slow
def test_interrupt_stops_a_collective_waiting_in_another_thread_at_once(run_mpi):
    run = run_mpi("failure.py", "interrupt", 60.0)
    errors = [record for record in run.records if record["event"] == "error"]
    assert run.returncode != 0, run.describe()
    assert len(errors) == 1 and "was interrupted: this process is stopping" in \
        errors[0]["message"], run.describe()
    assert errors[0]["after_s"] < 3.0, errors[0]  # not the 60 s timeout
    _assert_nothing_left(run)


@pytest.mark.slow
def test_killed_rank_leaves_nothing_of_the_survivor_processor(run_mpi):
    run = run_mpi("processor_kill.py", timeout_s=120)
    assert run.returncode != 0 and "rank 1" in run.stderr, run.describe()
    _assert_nothing_left(run, killed=(1,))
