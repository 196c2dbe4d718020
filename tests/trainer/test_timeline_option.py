"""fit(timeline=...) and `engine train --timeline` write a Chrome trace of the run's steps."""
import json

from engine import fit
from engine.cli.main import main
from models import MLP


def _spans(path):
    trace = json.loads(path.read_text())
    return trace, [event for event in trace["traceEvents"] if event["ph"] == "X"]


def test_fit_writes_a_trace_of_every_step(blobs, tmp_path):
    path = tmp_path / "trace.json"
    history = fit(MLP(sizes=(12, 8, 3)), *blobs, epochs=2, batch_size=50, num_processes=2,
                  timeline=path, verbose=False)
    trace, spans = _spans(path)
    steps = {span["args"]["step"] for span in spans if span["name"] == "compute"}
    assert steps == set(range(2 * -(-len(blobs[1]) // 50)))  # every training step, once
    assert trace["metadata"]["steps_recorded"] > len(steps)  # evaluation passes are there too
    assert {span["tid"] for span in spans if span["pid"] == 1} == {0, 1}
    assert history.epoch == [1, 2]


def test_the_command_line_writes_the_trace_into_the_run_folder(data_folder, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--data", str(data_folder), "--model", "mlp", "--model-arg", "hidden=16",
                 "--batch-size", "32", "--workers", "2", "--epochs", "1", "--output-dir",
                 str(out), "--no-progress", "--timeline", "trace.json"])
    assert code == 0
    _, spans = _spans(out / "trace.json")
    assert {"compute", "reduce", "update"} <= {span["name"] for span in spans}
