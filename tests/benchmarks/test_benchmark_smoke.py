"""Each benchmark runs end to end in --quick mode, writes its JSON and ends with its headline.

Timings are never asserted here (they belong to the benchmarks themselves); this only keeps the
scripts working."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HEADLINES = {
    "sync_overhead": r"^sync_overhead worst_ratio_to_floor=\d+\.\d\d$",
    "scaling": r"^scaling mlp_speedup=\d+\.\d\d cnn_speedup=\d+\.\d\d$",
    "soak": r"^soak steps_per_s=\d+ restarts=\d+ identical=true rss_growth_mb=-?\d+\.\d\d leaks=0$",
    "latency": r"^latency p50_us=\d+ p99_us=\d+ vs_keras=\d+\.\d\d$",
    "step_overhead": r"^step_overhead overhead_us=\d+$",
    "barrier_spin": r"^barrier_spin mlp_gain=\d+\.\d\d cnn_gain=\d+\.\d\d$",
    "host_contention": r"^host_contention twin=(\d+\.\d\d|nan) stream=(\d+\.\d\d|nan) "
                       r"gemm=(\d+\.\d\d|nan)$",
    "layer_times": r"^layer_times step_ms=\d+\.\d top=\S+:\d+\.\d$",
    "vs_peers": r"^vs_peers native_vs_fit=\d+\.\d\d native_vs_torch_ddp=(\d+\.\d\d|nan) "
                r"efficiency=\d+\.\d\d$",
}
# Runs of a script with extra arguments, under their own name: (script, arguments, headline).
VARIANTS = {"vs_peers --native-only": (
    "vs_peers", ["--native-only"],
    r"^vs_peers native_vs_fit=nan native_vs_torch_ddp=nan efficiency=\d+\.\d\d$"),
    "layer_times --parts": ("layer_times", ["--parts"], HEADLINES["layer_times"])}
NEEDS = {"latency": "tensorflow", "vs_peers": "tensorflow"}  # compared against a framework


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(HEADLINES) + sorted(VARIANTS))
def test_benchmark_runs_quick_and_prints_its_headline(run, tmp_path):
    name, arguments, headline = VARIANTS.get(run, (run, [], HEADLINES.get(run)))
    if run in NEEDS and importlib.util.find_spec(NEEDS[run]) is None:  # not imported here
        pytest.skip(f"{run} needs {NEEDS[run]}, which is not installed")
    out = tmp_path / f"{name}.json"
    finished = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"),
                               "--quick", "--out", str(out), *arguments],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-2000:]
    last_line = finished.stdout.strip().splitlines()[-1]
    assert re.match(headline, last_line), last_line
    document = json.loads(out.read_text())
    assert document["benchmark"] == name and document["quick"] is True
    assert document["machine"]["usable_cores"] >= 1
    if name == "scaling" and document["machine"]["usable_cores"] > 1:  # the host's own ceiling
        assert document["headline"]["mlp_host_ceiling"] > 0
    if run == "vs_peers --native-only" and document["machine"]["usable_cores"] > 1:  # Z's ceiling
        assert document["measurements"]["host_ceiling"] > 0
    if name == "vs_peers":  # the paired bursts ran once (--quick) and gave Z of their round
        bursts = document["measurements"]["paired_bursts"]
        assert len(bursts["rounds"]) == 1 and bursts["ratios"]["efficiency"]["median"] > 0
    if name in ("scaling", "vs_peers"):  # the issues' targets, each with a verdict
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        from _targets import VERDICTS
        targets = document["targets"]
        assert targets and all(row["verdict"] in VERDICTS for row in targets), targets
        table = printed_targets(finished.stdout)
        for row in targets:  # each row printed with its own verdict at the end of its line
            assert any(line.strip().startswith(row["name"]) and line.endswith(f"  {row['verdict']}")
                       for line in table), (row, table)
    if run == "layer_times --parts":  # every part ran and was timed
        from models.layers._blas import numpy_gemm
        parts = document["measurements"]["recurrent_parts_ms"]
        expected = {"all-timestep gradient GEMMs"} | (
            {"time loop, forward", "time loop, backward"} if numpy_gemm() else set())
        assert set(parts) == expected and all(ms > 0 for ms in parts.values()), parts
    if name == "host_contention" and document["machine"]["usable_cores"] > 1:  # neighbours ran
        assert all(math.isfinite(ratio) and ratio > 0 for ratio in document["headline"].values())


def printed_targets(stdout):
    """The lines of the printed targets table: after its "targets (" title, up to the first line
    that is not one of its indented rows."""
    lines = stdout.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("targets (")), None)
    assert first is not None, "no targets table in the output"
    table = []
    for line in lines[first + 2:]:  # past the title and the column names
        if not line.startswith("  "):
            break
        table.append(line)
    return table
