"""The timeline is a Chrome trace whose spans account for every step's measured time."""
import json

import numpy as np
import pytest

from engine import ParallelBatchProcessor
from models import MLP

MODEL = MLP(sizes=(12, 16, 3))


def _trace(blobs, tmp_path, **options):
    path = tmp_path / "trace.json"
    with ParallelBatchProcessor(MODEL, batch_size=50, timeline=path, **options) as processor:
        _, results = processor.run_parallel(*blobs, MODEL.init_state(0), {"learning_rate": 0.01})
    return json.loads(path.read_text()), results


@pytest.mark.parametrize("num_processes", [1, 2])
def test_the_spans_of_each_worker_add_up_to_the_measured_step_times(blobs, tmp_path,
                                                                    num_processes):
    trace, results = _trace(blobs, tmp_path, num_processes=num_processes)
    spans = [event for event in trace["traceEvents"] if event["ph"] == "X"]
    steps = len(results["loss"])
    assert trace["metadata"]["steps_recorded"] == steps
    for worker in range(num_processes):
        mine = [span for span in spans if span["pid"] == 1 and span["tid"] == worker]
        assert {span["name"] for span in mine} <= {"compute", "wait", "reduce", "update"}
        per_step = np.zeros(steps)
        for span in mine:
            per_step[span["args"]["step"]] += span["dur"] * 1e-6
        compute = {span["args"]["step"]: span["dur"] * 1e-6 for span in mine
                   if span["name"] == "compute"}
        if worker == 0:  # results time steps from worker 0's records
            wall_without_gaps = results["wall_s"][:-1]  # wall runs to the next step's start
            assert np.all(per_step[:-1] <= wall_without_gaps + 1e-6)
            np.testing.assert_allclose(per_step.sum(), results["wall_s"].sum(), rtol=0.25)
        assert max(compute.values()) <= results["compute_s"].max() + 1e-9
    owner = [span for span in spans if span["pid"] == 0]
    assert {span["name"] for span in owner} == {"plan pass", "sleep (workers run the pass)"}


def test_a_long_run_is_sampled_and_says_so(blobs, tmp_path):
    path = tmp_path / "trace.json"
    with ParallelBatchProcessor(MODEL, num_processes=1, batch_size=10, timeline=path) as processor:
        processor.timeline.full_steps, processor.timeline.sample_every = 20, 7
        processor.run_parallel(*blobs, MODEL.init_state(0), {"learning_rate": 0.01})
    trace = json.loads(path.read_text())
    seen = trace["metadata"]["steps_seen"]
    assert trace["metadata"]["steps_recorded"] == 20 + (seen // 7 - 20 // 7)
