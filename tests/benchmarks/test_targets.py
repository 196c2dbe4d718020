"""The benchmarks' target verdicts: met, not met, or beyond what the host itself reached."""
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from _targets import BEYOND_HOST, MET, NOT_MEASURED, NOT_MET, target_row, verdict  # noqa: E402


def test_a_figure_at_or_above_its_target_is_met_whatever_the_ceiling():
    assert verdict(1.7, 1.7) == MET
    assert verdict(1.8, 1.7, ceiling=1.6) == MET  # noise can put a run above its ceiling


def test_a_miss_is_beyond_the_host_only_when_the_ceiling_is_below_the_target():
    assert verdict(1.31, 1.5, ceiling=1.45) == BEYOND_HOST
    assert verdict(1.31, 1.5, ceiling=1.52) == NOT_MET
    assert verdict(1.31, 1.5) == NOT_MET  # no ceiling measured
    assert verdict(1.31, 1.5, ceiling=math.nan) == NOT_MET


def test_an_upper_bound_is_met_at_or_below_it_and_never_blamed_on_the_host():
    assert verdict(195.0, 250.0, at_most=True) == MET
    assert verdict(300.0, 250.0, ceiling=100.0, at_most=True) == NOT_MET


def test_a_missing_figure_is_not_measured():
    assert verdict(math.nan, 1.2, ceiling=1.5) == NOT_MEASURED


def test_a_row_keeps_the_figures_and_drops_a_nan_ceiling():
    row = target_row("Y", 1.52, 1.2, math.nan)
    assert row == dict(name="Y", measured=1.52, target=1.2, at_most=False, unit="x",
                       host_ceiling=None, verdict=MET)


def test_a_missing_figure_is_null_in_the_json_not_nan():
    row = target_row("X", math.nan, 1.6, 1.8)
    assert row["measured"] is None and row["host_ceiling"] == 1.8
    assert row["verdict"] == NOT_MEASURED


def test_a_one_core_scaling_run_measures_no_multi_process_target():
    import scaling  # imports the engine; its targets are built from the records alone
    one = dict(largest_label="1p x BLAS default", speedup_vs_single_thread=1.0,
               speedup_vs_blas_default=1.0)
    two = dict(largest_label="2p x 1 thread", speedup_vs_single_thread=1.66,
               speedup_vs_blas_default=1.03, host_ceiling_vs_single_thread=1.74,
               host_ceiling_vs_blas_default=1.08)
    rows = scaling.scaling_targets({"mlp": one, "cnn": one})
    assert [row["verdict"] for row in rows] == [NOT_MEASURED] * 3
    rows = scaling.scaling_targets({"mlp": two, "cnn": two})
    assert [row["verdict"] for row in rows] == [NOT_MET, BEYOND_HOST, MET]  # CNN1D: 1.66 >= 1.5
    assert rows[0]["name"] == "MLP 2p vs 1p x 1 thread"
