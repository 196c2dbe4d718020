"""Each numba kernel against its NumPy twin, on whole buffers and on the slices workers own."""
import numpy as np
import pytest

from engine.core import kernels
from engine.core.sharding import partition

RTOL = 1e-6  # float32 kernels against float64-accumulating twins


def _random(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("num_slots,length", [(1, 10), (2, 4097), (3, 10_000), (5, 33)])
def test_weighted_mean_matches_twin_when_workers_cover_their_slices(num_slots, length):
    slots = _random((num_slots, length), 0)
    coefficients = np.random.default_rng(1).dirichlet(np.ones(num_slots))
    out = np.zeros(length, np.float32)
    total = 0.0
    bounds = partition(length, 3)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        total += kernels.weighted_mean_into(out, slots, coefficients, start, stop, True)
    expected = kernels.weighted_mean_ref(slots, coefficients)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(total, np.sum(expected.astype(np.float64) ** 2), rtol=1e-6)


def test_weighted_mean_leaves_values_outside_its_slice_untouched():
    slots = _random((2, 100), 2)
    out = np.full(100, 7.0, np.float32)
    kernels.weighted_mean_into(out, slots, np.array([0.5, 0.5]), 20, 40, False)
    assert np.all(out[:20] == 7.0) and np.all(out[40:] == 7.0)
    np.testing.assert_allclose(out[20:40], slots[:, 20:40].mean(0), rtol=RTOL)


def test_sum_squares_matches_numpy_on_odd_lengths():
    values = _random(1003, 3)
    assert kernels.sum_squares(values, 1, 1002) == pytest.approx(
        np.sum(values[1:1002].astype(np.float64) ** 2), rel=1e-12)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_matches_twin(momentum, nesterov):
    params, velocity, grads = _random(1000, 4), _random(1000, 5), _random(1000, 6)
    expected_params, expected_velocity = kernels.sgd_ref(params, velocity, grads, 0.1, momentum,
                                                         nesterov, 0.5)
    bounds = partition(1000, 2)
    params_out, velocity_out = np.empty_like(params), np.empty_like(velocity)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        kernels.sgd_into(params_out, velocity_out, params, velocity, grads, start, stop, 0.1,
                         momentum, nesterov, 0.5)
    np.testing.assert_allclose(params_out, expected_params, rtol=RTOL, atol=1e-7)
    if momentum:
        np.testing.assert_allclose(velocity_out, expected_velocity, rtol=RTOL, atol=1e-7)
    # In place (outputs are the inputs) gives the same numbers.
    for start, stop in zip(bounds[:-1], bounds[1:]):
        kernels.sgd_into(params, velocity, params, velocity, grads, start, stop, 0.1, momentum,
                         nesterov, 0.5)
    np.testing.assert_array_equal(params, params_out)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_matches_textbook_twin_over_several_steps(weight_decay):
    params, grads = _random(5000, 7), _random(5000, 8)
    m, v = np.zeros(5000, np.float32), np.zeros(5000, np.float32)
    ref_params, ref_m, ref_v = params.copy(), m.copy(), v.copy()
    bounds = partition(5000, 3)
    for step in range(1, 6):
        for start, stop in zip(bounds[:-1], bounds[1:]):
            kernels.adam_into(params, m, v, params, m, v, grads, start, stop, 1e-2, 0.9, 0.999,
                              1e-7, step, weight_decay, 1.0)
        ref_params, ref_m, ref_v = kernels.adam_ref(ref_params, ref_m, ref_v, grads, 1e-2, 0.9,
                                                    0.999, 1e-7, step, weight_decay, 1.0)
    np.testing.assert_allclose(params, ref_params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m, ref_m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(v, ref_v, rtol=1e-5, atol=1e-9)


def test_clip_scale_limits_the_global_norm_and_leaves_small_gradients_alone():
    assert kernels.clip_scale(10.0, 2.0) == pytest.approx(0.2)
    assert kernels.clip_scale(1.0, 2.0) == 1.0
    assert kernels.clip_scale(10.0, None) == 1.0


def test_adam_into_separate_outputs_leaves_its_inputs_intact_so_it_can_be_rerun():
    params, grads = _random(100, 9), _random(100, 10)
    m, v = _random(100, 11) * 0.1, np.abs(_random(100, 12)) * 0.1
    before = [a.copy() for a in (params, m, v)]
    outs = [np.empty_like(a) for a in (params, m, v)]
    for _ in range(2):  # a re-run after an interruption writes the same result
        kernels.adam_into(*outs, params, m, v, grads, 0, 100, 1e-2, 0.9, 0.999, 1e-7, 3, 0.0, 1.0)
    for original, kept in zip(before, (params, m, v)):
        np.testing.assert_array_equal(original, kept)
    expected = kernels.adam_ref(params, m, v, grads, 1e-2, 0.9, 0.999, 1e-7, 3, 0.0, 1.0)
    for out, want in zip(outs, expected):
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)


def test_updates_report_whether_every_new_parameter_is_finite():
    params, grads = _random(64, 13), _random(64, 14)
    out, m, v = np.empty_like(params), np.zeros(64, np.float32), np.zeros(64, np.float32)
    assert kernels.sgd_into(out, m, params, m, grads, 0, 64, 0.1, 0.0, False, 1.0) == 0.0
    assert np.isnan(kernels.sgd_into(out, m, params, m, grads, 0, 64, 1e300, 0.0, False, 1.0))
    assert kernels.adam_into(out, m, v, params, m, v, grads, 0, 64, 0.1, 0.9, 0.999, 1e-7, 1, 0.0,
                             1.0) == 0.0
    grads[5] = np.inf
    assert np.isnan(kernels.adam_into(out, m, v, params, m, v, grads, 0, 64, 0.1, 0.9, 0.999, 1e-7,
                                      1, 0.0, 1.0))


def _adam_mean_case(length, seed):
    rng = np.random.default_rng(seed)
    first, last = _random(length, seed + 1), _random(length, seed + 2) * 1e-3
    params, m = _random(length, seed + 3), _random(length, seed + 4) * 0.1
    v = np.abs(_random(length, seed + 5)) * 0.1
    return params, m, v, first, last, rng.dirichlet([1.0, 1.0])


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_with_the_mean_formed_inside_matches_its_twin_and_the_two_passes(weight_decay):
    params, m, v, first, last, (c_first, c_last) = _adam_mean_case(5003, 20)
    outs = [np.empty_like(a) for a in (params, m, v)]
    squares = non_finite = 0.0
    bounds = partition(5003, 3)
    for start, stop in zip(bounds[:-1], bounds[1:]):  # each worker its slice, out of place
        s, nf = kernels.adam_mean_into(*outs, params, m, v, first, c_first, last, c_last, start,
                                       stop, 1e-2, 0.9, 0.999, 1e-7, 4.0, weight_decay)
        squares, non_finite = squares + s, non_finite + nf
    *expected, expected_squares = kernels.adam_mean_ref(params, m, v, first, c_first, last, c_last,
                                                        1e-2, 0.9, 0.999, 1e-7, 4.0, weight_decay)
    for out, want in zip(outs, expected):
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)
    assert squares == pytest.approx(expected_squares, rel=1e-6) and non_finite == 0.0
    # The two passes it replaces: the same values to float32 rounding.
    mean = np.empty_like(first)
    kernels.weighted_mean_into(mean, np.stack([first, last]), np.array([c_first, c_last]), 0,
                               5003, False)
    two_pass = [np.empty_like(a) for a in (params, m, v)]
    kernels.adam_into(*two_pass, params, m, v, mean, 0, 5003, 1e-2, 0.9, 0.999, 1e-7, 4.0,
                      weight_decay, 1.0)
    for out, want in zip(outs, two_pass):
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-8)


def test_adam_with_the_mean_inside_gives_the_same_bits_whole_or_in_pieces():
    """A worker replaced halfway through its slice redoes it in other pieces: same bits."""
    params, m, v, first, last, (c_first, c_last) = _adam_mean_case(10_000, 30)
    whole = [np.empty_like(a) for a in (params, m, v)]
    kernels.adam_mean_into(*whole, params, m, v, first, c_first, last, c_last, 0, 10_000, 1e-3,
                           0.9, 0.999, 1e-7, 2.0, 0.0)
    for cut in (1, 17, 4999, 9990):
        pieces = [np.empty_like(a) for a in (params, m, v)]
        for start, stop in ((0, cut), (cut, 10_000)):
            kernels.adam_mean_into(*pieces, params, m, v, first, c_first, last, c_last, start,
                                   stop, 1e-3, 0.9, 0.999, 1e-7, 2.0, 0.0)
        for a, b in zip(whole, pieces):
            np.testing.assert_array_equal(a, b)


def test_adam_with_the_mean_inside_reports_a_non_finite_gradient():
    params, m, v, first, last, (c_first, c_last) = _adam_mean_case(64, 40)
    last[7] = np.inf
    outs = [np.empty_like(a) for a in (params, m, v)]
    squares, non_finite = kernels.adam_mean_into(*outs, params, m, v, first, c_first, last,
                                                 c_last, 0, 64, 0.1, 0.9, 0.999, 1e-7, 1.0, 0.0)
    assert not np.isfinite(squares) and np.isnan(non_finite)


def test_with_three_slots_the_partial_mean_then_the_fused_update_match_the_two_passes():
    params, m, v, first, last, _ = _adam_mean_case(3001, 50)
    slots = np.stack([first, last, _random(3001, 59)])
    coefficients = np.array([0.2, 0.5, 0.3])
    partial = np.empty_like(first)
    kernels.weighted_mean_into(partial, slots[:2], coefficients[:2], 0, 3001, False)
    fused = [np.empty_like(a) for a in (params, m, v)]
    kernels.adam_mean_into(*fused, params, m, v, partial, 1.0, slots[2], coefficients[2], 0, 3001,
                           1e-2, 0.9, 0.999, 1e-7, 2.0, 0.0)
    mean = np.empty_like(first)
    kernels.weighted_mean_into(mean, slots, coefficients, 0, 3001, False)
    two_pass = [np.empty_like(a) for a in (params, m, v)]
    kernels.adam_into(*two_pass, params, m, v, mean, 0, 3001, 1e-2, 0.9, 0.999, 1e-7, 2.0, 0.0,
                      1.0)
    for out, want in zip(fused, two_pass):
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-8)


def test_workers_fuse_the_mean_only_into_an_update_rule_that_offers_it():
    from dataclasses import dataclass

    from engine.core.optim import SGD, Adam, AdamW, fuses_slot_mean

    @dataclass(frozen=True)
    class OwnRule(Adam):  # overrides the plain update only: the fused one would skip it
        def update_into(self, *args):
            return super().update_into(*args)

    @dataclass(frozen=True)
    class OwnBoth(OwnRule):
        def update_from_mean_into(self, *args):
            return super().update_from_mean_into(*args)

    assert fuses_slot_mean(Adam()) and fuses_slot_mean(AdamW())
    assert not fuses_slot_mean(SGD()) and not fuses_slot_mean(SGD(momentum=0.9))
    assert not fuses_slot_mean(OwnRule()) and fuses_slot_mean(OwnBoth())
