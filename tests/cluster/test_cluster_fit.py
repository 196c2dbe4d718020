"""``fit(..., cluster="mpi")`` on 2 nodes x 1 worker: the same state on every rank, equal to one
node x 2 workers with the same global batch (rtol 1e-4), and only rank 0 writes files."""
import numpy as np

import pytest

from engine import fit
from models import MLP


@pytest.mark.slow
def test_fit_across_two_nodes_equals_one_node_and_only_rank_0_writes(run_mpi, blobs, tmp_path):
    out, saved = tmp_path / "run", tmp_path / "state.npy"
    run = run_mpi("fit_run.py", out, saved, timeout_s=300)
    assert run.returncode == 0, run.describe()
    assert sorted(run.results) == [0, 1], run.describe()
    assert run.results[0]["digest"] == run.results[1]["digest"]
    assert {"history.csv", "model.h5", "checkpoints"} <= set(run.results[0]["files"])
    expected = fit(MLP(sizes=(12, 16, 3)), *blobs, num_processes=2, epochs=3, batch_size=101,
                   learning_rate=0.05, seed=3, verbose=False)
    np.testing.assert_allclose(np.load(saved), expected.state.buffer, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(run.results[0]["loss"], expected.history["loss"], rtol=1e-4)
    assert run.stdout.count("RESULT") == 2
