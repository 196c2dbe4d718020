"""``engine bench sync|scaling|step``: each writes its JSON and PNG and prints its table; the
memory-copy floor copies every byte; bad options fail in one line. Timings are not asserted
(they belong to benchmarks/), only their consistency."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from engine.cli.benchmarking.ceiling import IndependentRunner
from engine.cli.benchmarking.floor import CopyFloor
from engine.cli.main import main
from models import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    """(width, height) from the PNG header."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_copy_floor_copies_every_value_with_each_process_taking_its_share(live_children):
    with CopyFloor(100_003, 2) as floor:  # an odd count: the shares differ by one
        assert len(live_children()) == 2
        assert floor._buffers[1].max() == 0.0
        assert floor.run() > 0
        np.testing.assert_array_equal(floor._buffers[1], np.ones(100_003, np.float32))
    assert live_children() == []


def test_bench_sync_writes_json_and_png_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "sync", "--quick", "--sizes", "2000,50000", "--workers", "2",
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "values (P)" in printed and "floor median" in printed
    document = json.loads((out / "sync.json").read_text())
    sizes = document["results"]["sizes"]
    assert [r["num_values"] for r in sizes] == [2000, 50000]
    for record in sizes:
        assert record["ratio_to_floor"] == pytest.approx(record["sync_s_median"] /
                                                         record["floor_s_median"])
        assert record["traffic_bytes"] == (2 + 4) * record["num_values"] * 4
    assert document["machine"]["usable_cores"] >= 1 and document["num_values"] == 5210
    width, height = _png_size(out / "sync.png")
    assert width > 500 and height > 200


def test_bench_scaling_reports_speedup_and_efficiency_per_process_count(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "scaling", "--quick", "--model", "mlp", "--model-arg", "hidden=32",
                 "--input-shape", "20", "--classes", "3", "--batch-size", "64", "--examples",
                 "256", "--workers", "2", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "efficiency" in printed
    document = json.loads((out / "scaling.json").read_text())
    assert document["model_args"]["sizes"] == [20, 32, 3] and document["input_shape"] == [20]
    configurations = document["results"]["configurations"]
    assert [c["num_processes"] for c in configurations] == [1, 2]
    single = configurations[0]["samples_per_s_median"]
    for c in configurations:
        assert len(c["samples_per_s"]) == 2  # one per timed round (the warm-up discarded)
        assert c["speedup"] == pytest.approx(c["samples_per_s_median"] / single)
        assert c["parallel_efficiency"] == pytest.approx(c["speedup"] / c["num_processes"])
    # The host's ceiling at the largest count took its turns too, and the engine is given over it.
    ceiling = document["results"]["host_ceiling"]
    assert ceiling["num_processes"] == 2 and len(ceiling["samples_per_s"]) == 2
    assert ceiling["speedup"] == pytest.approx(ceiling["samples_per_s_median"] / single)
    assert ceiling["engine_share"] == pytest.approx(
        configurations[1]["samples_per_s_median"] / ceiling["samples_per_s_median"])
    assert "host ceiling: 2 processes that exchange nothing" in printed
    _png_size(out / "scaling.png")


def test_host_ceiling_runs_every_batch_in_processes_that_leave_nothing_behind(live_children):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)).astype(np.float32), rng.integers(0, 3, 40)
    inner = MLP(sizes=(6, 8, 3))  # wrapped: a loss_and_grads that takes neither rng nor out
    model = types.SimpleNamespace(
        init_state=inner.init_state,
        loss_and_grads=lambda state, x, y: inner.loss_and_grads(state, x, y))
    runner = IndependentRunner("2 independent", 2, model, 16, 1e-3)
    try:
        first, second = runner.epoch(x, y), runner.epoch(x, y)
        assert len(live_children()) == 2  # started once, kept for the second epoch
    finally:
        runner.close()
    assert first["steps"] == second["steps"] == 3  # 16 + 16 + 8 rows
    assert all(seconds > 0 for seconds in second["compute_s"])
    assert live_children() == []


def test_a_failing_host_ceiling_process_raises_its_error_and_leaves_nothing(live_children):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)).astype(np.float32), rng.integers(0, 3, 40)
    inner = MLP(sizes=(6, 8, 3))

    def loss_and_grads(state, x, y):
        raise FloatingPointError("the model blew up")
    model = types.SimpleNamespace(init_state=inner.init_state, loss_and_grads=loss_and_grads)
    runner = IndependentRunner("2 independent", 2, model, 16, 1e-3)
    try:
        with pytest.raises(RuntimeError, match="(?s)host-ceiling process 0 of 2 failed.*"
                                               "FloatingPointError: the model blew up"):
            runner.epoch(x, y)
    finally:
        runner.close()
    assert live_children() == []


def test_bench_step_splits_the_step_into_phases_that_fit_in_it(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "step", "--quick", "--batch-size", "50", "--examples", "200",
                 "--workers", "2", "--output-dir", str(out)]) == 0
    configurations = json.loads((out / "step.json").read_text())["results"]["configurations"]
    assert [c["num_processes"] for c in configurations] == [1, 2]
    for c in configurations:
        phases = c["compute_s_median"] + c["sync_s_median"] + c["wait_s_median"]
        assert 0 < phases <= c["wall_s_median"] * 1.25  # medians of a sum need not add exactly
        assert c["samples_per_s"] == pytest.approx(50 / c["wall_s_median"])
    _png_size(out / "step.png")


def test_bench_refuses_a_batch_smaller_than_the_process_count(tmp_path, capsys):
    assert main(["bench", "scaling", "--batch-size", "1", "--workers", "2", "--output-dir",
                 str(tmp_path)]) == 1
    assert "batch_size must be at least the largest process count" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "everything"])
    assert exit_info.value.code == 2


def test_bench_never_imports_tensorflow(tmp_path):
    code = ("import sys; from engine.cli.main import main; assert main(['bench', 'sync', "
            "'--quick', '--sizes', '1000', '--workers', '1', '--output-dir', sys.argv[1]]) == 0; "
            "print('tensorflow' in sys.modules)")
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip().splitlines()[-1] == "False"


def test_bench_data_takes_the_models_own_input_shape_unless_given():
    from engine.cli.bench import _build_model
    assert _build_model("imu_cnn_bilstm", [], None, 26)[2] == (128, 13)
    assert _build_model("imu_cnn_bilstm", ["timesteps=50", "channels=6"], None, 4)[2] == (50, 6)
    assert _build_model("mlp", ["hidden=8"], None, 3)[2] == (40,)  # mlp takes its size from data
    assert _build_model("mlp", ["hidden=8"], "12", 3)[1]["sizes"] == (12, 8, 3)
