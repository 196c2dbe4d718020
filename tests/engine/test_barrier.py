"""The shared-memory barrier: a bounded spin, then a sleep in the kernel, and no lost wake-up."""
import threading
import time

import numpy as np
import pytest

from engine.parallel.barrier import SPIN_VARIABLE, Aborted, Barriers, futex_available, spin_seconds

pytestmark = pytest.mark.skipif(not futex_available(), reason="needs Linux futexes")


def _barriers(spin_s, workers=2):
    arrivals = np.zeros((1, workers, 8), np.int64)
    return Barriers(arrivals, np.zeros(1, np.int32), np.zeros(1, np.int32), spin_s=spin_s)


def _wait_in_thread(barriers, **kwargs):
    """Start a thread that waits for round 1; returns (thread, record of its CPU and wall time)."""
    record = {}

    def waiter():
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            barriers.wait(0, 1, **kwargs)
            record["outcome"] = "passed"
        except Aborted:
            record["outcome"] = "aborted"
        record["cpu_s"], record["wall_s"] = time.thread_time() - cpu, time.perf_counter() - wall

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    return thread, record


def test_a_waiter_for_a_slow_peer_sleeps_after_its_spin_instead_of_holding_the_core():
    barriers = _barriers(spin_s=1e-3)
    barriers.arrive(0, 0, 1)
    thread, record = _wait_in_thread(barriers)
    time.sleep(0.4)
    assert thread.is_alive()
    barriers.arrive(0, 1, 1)  # the slow peer: its ring must wake the sleeper
    thread.join(5)
    assert not thread.is_alive() and record["outcome"] == "passed"
    assert record["wall_s"] >= 0.4
    # A spinning waiter would burn about 0.4 s of CPU; a sleeper, its short spin and a wake-up.
    assert record["cpu_s"] < 0.1, record


def test_a_peer_arriving_within_the_spin_is_caught_without_sleeping():
    for spin_s, expect_sleep in ((2.0, False), (0.0, True)):
        barriers, slept = _barriers(spin_s=spin_s), []
        barriers.arrive(0, 0, 1)
        thread, record = _wait_in_thread(barriers, on_sleep=lambda: slept.append(True))
        time.sleep(0.05)
        barriers.arrive(0, 1, 1)
        thread.join(5)
        assert record["outcome"] == "passed"
        assert bool(slept) is expect_sleep, (spin_s, record)


def test_aborting_the_pass_wakes_a_sleeping_waiter():
    barriers = _barriers(spin_s=0.0)
    thread, record = _wait_in_thread(barriers)
    time.sleep(0.05)
    barriers.abort_all()
    thread.join(5)
    assert record["outcome"] == "aborted" and record["wall_s"] < 1.0


def test_the_spin_is_300_microseconds_unless_the_environment_sets_it():
    assert spin_seconds({}) == pytest.approx(300e-6)
    assert spin_seconds({SPIN_VARIABLE: " 250 "}) == pytest.approx(250e-6)
    assert spin_seconds({SPIN_VARIABLE: "0"}) == 0.0


@pytest.mark.parametrize("text", ["fast", "-1", "nan", "2e6"])
def test_a_spin_setting_that_is_not_a_duration_is_refused_with_the_variable_named(text):
    with pytest.raises(ValueError, match=f"{SPIN_VARIABLE}.*microseconds.*{text}"):
        spin_seconds({SPIN_VARIABLE: text})


def test_a_bad_spin_setting_fails_when_the_processor_is_made(monkeypatch):
    from engine import ParallelBatchProcessor
    from models import MLP

    monkeypatch.setenv(SPIN_VARIABLE, "soon")
    for num_processes in (1, 2):  # refused even where no worker would spin
        with pytest.raises(ValueError, match=f"{SPIN_VARIABLE}.*'soon'"):
            ParallelBatchProcessor(MLP(sizes=(4, 3)), num_processes=num_processes, batch_size=4)
