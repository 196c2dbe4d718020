"""vs_peers's paired bursts: each ratio is taken within a round, then summarized over rounds."""
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from vs_peers import _round_ratios  # noqa: E402


def _round(native, one_thread, independent, fit):
    return {"native 2p": native, "native 1 thread": one_thread, "2p independent": independent,
            "fit default": fit}


def test_each_ratio_comes_from_one_rounds_own_rates_not_from_totals():
    # The host slows to half speed in the second round: every configuration with it. Ratios per
    # round stay put; ratios of the runs' totals would mix the two phases.
    history = [_round(1000, 520, 1040, 600), _round(500, 260, 520, 300),
               _round(990, 500, 1000, 620)]
    ratios = _round_ratios(history, cores=2)
    assert ratios["native_vs_fit"]["median"] == pytest.approx(1000 / 600)
    assert ratios["efficiency"]["median"] == pytest.approx(1000 / (2 * 520))
    assert ratios["share_of_host_ceiling"]["median"] == pytest.approx(1000 / 1040)
    assert ratios["ceiling_vs_fit"]["median"] == pytest.approx(1040 / 600)
    fit = sorted(r["native 2p"] / r["fit default"] for r in history)
    assert ratios["native_vs_fit"]["q25"] == pytest.approx((fit[0] + fit[1]) / 2)
    assert ratios["native_vs_fit"]["q75"] == pytest.approx((fit[1] + fit[2]) / 2)


def test_a_ratio_whose_configuration_did_not_run_is_nan_and_no_rounds_give_nan():
    ratios = _round_ratios([_round(1000, 520, 1040, 600)], cores=2)
    assert math.isnan(ratios["native_vs_torch_ddp"]["median"])  # no torch DDP in the rounds
    assert all(math.isnan(figure["median"]) for figure in _round_ratios([], cores=2).values())
