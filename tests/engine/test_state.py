"""NetworkState: one buffer with named views, copy, average, HDF5 round trip, mismatch errors."""
import h5py
import numpy as np
import pytest

from engine import NetworkState


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return NetworkState({"dense/kernel": rng.normal(size=(4, 3)), "dense/bias": rng.normal(size=3)},
                        {"bn/running_mean": rng.normal(size=3)})


def test_weights_and_theta_are_views_of_one_float32_buffer():
    state = _state()
    assert state.buffer.dtype == np.float32 and state.num_params == 18 and state.num_trainable == 15
    state.weights["dense/bias"][:] = 5.0
    state.theta["bn/running_mean"][:] = -1.0
    assert np.all(state.buffer[12:15] == 5.0) and np.all(state.buffer[15:] == -1.0)


def test_copy_is_independent_of_the_original():
    state = _state()
    clone = state.copy()
    clone.weights["dense/kernel"][0, 0] = 123.0
    assert state.weights["dense/kernel"][0, 0] != 123.0


def test_average_is_the_elementwise_weighted_mean():
    a, b = _state(1), _state(2)
    averaged = NetworkState.average([a, b], weights=[3, 1])
    np.testing.assert_allclose(averaged.buffer, 0.75 * a.buffer + 0.25 * b.buffer, rtol=1e-6)
    np.testing.assert_allclose(NetworkState.average([a, b]).buffer, (a.buffer + b.buffer) / 2,
                               rtol=1e-6)


def test_save_and_load_round_trip_keeps_names_order_values_and_metadata(tmp_path):
    state = _state()
    state.save(tmp_path / "s.h5", metadata={"epoch": 3})
    loaded, metadata = NetworkState.load(tmp_path / "s.h5", return_metadata=True)
    assert list(loaded.weights) == list(state.weights) and list(loaded.theta) == list(state.theta)
    np.testing.assert_array_equal(loaded.buffer, state.buffer)
    assert metadata == {"epoch": 3}
    assert not list(tmp_path.glob("*.tmp-*"))


def test_load_rejects_a_foreign_hdf5_file_with_its_name(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="other.h5.*not a file of format 'engine.NetworkState'"):
        NetworkState.load(tmp_path / "other.h5")


def test_load_rejects_a_truncated_file(tmp_path):
    _state().save(tmp_path / "s.h5")
    data = (tmp_path / "s.h5").read_bytes()
    (tmp_path / "bad.h5").write_bytes(data[:len(data) // 3])
    with pytest.raises(ValueError, match="bad.h5"):
        NetworkState.load(tmp_path / "bad.h5")


def test_mismatch_error_names_the_key_and_both_shapes():
    state = _state()
    other = NetworkState({"dense/kernel": np.zeros((4, 2)), "dense/bias": np.zeros(3)},
                         {"bn/running_mean": np.zeros(3)})
    with pytest.raises(ValueError, match=r"dense/kernel.*\(4, 3\).*\(4, 2\)"):
        state.check_matches(other)
    missing = NetworkState({"dense/kernel": np.zeros((4, 3))}, {"bn/running_mean": np.zeros(3)})
    with pytest.raises(ValueError, match="dense/bias"):
        state.check_matches(missing)


def test_a_name_cannot_be_both_weight_and_theta():
    with pytest.raises(ValueError, match="both a weight and a theta"):
        NetworkState({"a": np.zeros(2)}, {"a": np.zeros(2)})
