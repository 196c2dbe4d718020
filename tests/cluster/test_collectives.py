"""The cross-node collectives on two ranks against NumPy oracles (float64 sums of the inputs)."""
import numpy as np
import pytest

from engine.parallel.cluster import make_cluster


def test_cluster_option_is_checked():
    with pytest.raises(ValueError, match="cluster must be None or 'mpi'"):
        make_cluster("tcp")
    assert make_cluster(None) is None


# Shared memory is Open MPI's default between ranks of one host; "tcp,self" forces the transport
# that real nodes use, over loopback.
@pytest.mark.parametrize("transport", ["default", "tcp"])
def test_mean_weights_nodes_by_examples_and_is_identical_on_every_rank(run_mpi, transport):
    extra = () if transport == "default" else ("--mca", "pml", "ob1", "--mca", "btl", "tcp,self")
    run = run_mpi("collectives.py", 100_003, mpirun_args=extra)
    assert run.returncode == 0, run.describe()
    assert sorted(run.results) == [0, 1], run.describe()
    first, second = run.results[0], run.results[1]
    for result in (first, second):
        assert result["size"] == 2 and result["local_size"] == 2
        # float32 rounding of one scale and one add per node against a float64 oracle.
        assert result["max_abs_error"] < 1e-5 and result["max_abs_error_scaled"] < 1e-5, result
        assert result["loss"] == pytest.approx(result["expected_loss"], rel=1e-12)
        assert result["examples"] == result["expected_examples"] == 37 + 91
        # sums in rank order: the same bits on both ranks, tiny terms kept.
        assert result["sums"] == [0.25 + 1.25, 2.0, 1e-17 + 2e-17]
        assert result["many_ok"]
        assert result["bcast"] == list(np.arange(10, dtype=np.float32).astype(float))
    assert first["digest"] == second["digest"]  # every rank holds the same reduced bytes
    assert first["share"] == [0, 51] and second["share"] == [51, 101]
    assert first["gathered_ok"] and second["gathered_ok"]
    for result, other in ((first, 1), (second, 0)):
        assert result["disagreement"]["type"] == "ClusterError"
        assert result["disagreement"]["ranks"] == [other]
        assert "have other ranks than rank" in result["disagreement"]["message"]
