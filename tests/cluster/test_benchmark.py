"""benchmarks/cluster.py runs under mpirun in --quick mode, writes its JSON and its headline.
Timings are not asserted (they belong to the benchmark); this keeps the script working."""
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADLINE = r"^cluster allreduce_ms_16m=\d+\.\d\d step_efficiency=(\d+\.\d\d|nan)$"


@pytest.mark.slow
def test_cluster_benchmark_runs_quick_and_prints_its_headline(run_mpi, tmp_path):
    out = tmp_path / "cluster.json"
    run = run_mpi(os.path.join(ROOT, "benchmarks", "cluster.py"), "--quick", "--out", out,
                  timeout_s=400, bind="core")
    assert run.returncode == 0, run.describe()
    assert re.match(HEADLINE, run.stdout.strip().splitlines()[-1]), run.describe()
    document = json.loads(out.read_text())
    assert document["benchmark"] == "cluster" and document["ranks"] == 2
    assert {row["nodes"] for row in document["cost_model"]["rows"]} == {2, 4, 8, 16, 32, 64}
    assert document["cleanup"]["our_shm_blocks"] == [] and not document["cleanup"]["live_children"]
