"""Data files: each format, each error (naming file and problem), splits, standardization."""
import h5py
import numpy as np
import pytest

from engine.cli.config import DEFAULTS
from engine.training.datasets import (DataError, Standardizer, Subset, check_every_class, check_features,
                             load_dataset, stratified_split, take)
from engine.cli.jobs import prepare_data


def test_a_folder_of_npy_files_is_memory_mapped(data_folder, blobs):
    (data_folder / "class_names.txt").write_text("red\ngreen\nblue\n")
    data = load_dataset(data_folder)
    assert isinstance(data.x, np.memmap) and data.x_test is None
    np.testing.assert_array_equal(data.x, blobs[0])
    assert data.y.dtype == np.int64 and data.class_names == ["red", "green", "blue"]


def test_a_folder_may_hold_its_own_test_split(data_folder, blobs):
    np.save(data_folder / "test_features.npy", blobs[0][:10])
    np.save(data_folder / "test_labels.npy", blobs[1][:10])
    data = load_dataset(data_folder)
    assert data.x_test.shape == (10, 12) and len(data.y_test) == 10


def test_npz_with_x_and_y_or_with_train_and_test_keys(tmp_path, blobs):
    x, y = blobs
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    data = load_dataset(tmp_path / "plain.npz")
    assert data.x.shape == (600, 12) and data.x_test is None
    np.savez(tmp_path / "split.npz", x_train=x[:500], y_train=y[:500], x_test=x[500:],
             y_test=y[500:], class_names=np.array(["a", "b", "c"]))
    data = load_dataset(tmp_path / "split.npz")
    assert len(data.y) == 500 and len(data.y_test) == 100 and data.class_names == ["a", "b", "c"]


def test_hdf5_with_default_or_named_datasets(tmp_path, blobs):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["features"], f["labels"] = blobs
        f["inputs"], f["targets"] = blobs
    data = load_dataset(tmp_path / "d.h5")
    assert isinstance(data.x, h5py.Dataset) and data.x.shape == (600, 12)
    named = load_dataset(tmp_path / "d.h5", x_key="inputs", y_key="targets")
    np.testing.assert_array_equal(take(named.x, [5, 1, 5]), blobs[0][[5, 1, 5]])
    with pytest.raises(DataError, match=r"no dataset 'pixels'.*\['features', 'inputs'"):
        load_dataset(tmp_path / "d.h5", x_key="pixels")


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "labels.npy").unlink(), "labels.npy' does not exist"),
    (lambda d: np.save(d / "labels.npy", np.ones((600, 3))), "one-hot"),
    (lambda d: np.save(d / "labels.npy", np.full(600, 1.5)), "label 0 is 1.5"),
    (lambda d: np.save(d / "labels.npy", np.array(["a"] * 600)), "integer class indices"),
    (lambda d: np.save(d / "features.npy", np.array([object()] * 600)), "features.npy'.*cannot"),
    (lambda d: np.save(d / "test_labels.npy", np.zeros(3)), "only one of test_features.npy"),
])
def test_folder_errors_name_the_file_and_the_problem(data_folder, make, message):
    make(data_folder)
    with pytest.raises((DataError, FileNotFoundError), match=message):
        load_dataset(data_folder)


def test_file_level_errors(tmp_path, blobs):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_dataset(tmp_path / "data.csv")
    np.savez(tmp_path / "keys.npz", a=blobs[0], b=blobs[1])
    with pytest.raises(DataError, match=r"keys.npz' holds keys \['a', 'b'\]; expected 'x'"):
        load_dataset(tmp_path / "keys.npz")
    np.savez(tmp_path / "objects.npz", x=np.array([object()] * 3), y=np.zeros(3))
    with pytest.raises(DataError, match="objects.npz.*numeric arrays only"):
        load_dataset(tmp_path / "objects.npz")


def test_content_checks_name_the_file_the_example_and_the_class(data_folder, blobs):
    x = blobs[0].copy()
    x[42, 3] = np.inf
    np.save(data_folder / "features.npy", x)
    data = load_dataset(data_folder)
    with pytest.raises(DataError, match=r"features.npy: example 42 holds NaN or infinite"):
        check_features(data.x, data.source)
    with pytest.raises(DataError, match="features.npy: 600 examples but 599 labels"):
        check_features(data.x, data.source, num_labels=599)
    with pytest.raises(DataError, match=r"class\(es\) \[1\] have no example in the training"):
        check_every_class(np.array([0, 2, 2]), 3, "features.npy")


def test_prepare_data_checks_every_split_before_training(data_folder, blobs):
    labels = blobs[1].copy()
    labels[7] = 9
    np.save(data_folder / "labels.npy", labels)
    config = dict(DEFAULTS, data=str(data_folder), model_args={"num_classes": 3})
    with pytest.raises(DataError, match=r"labels.npy: labels must be class indices in \[0, 3\); "
                                        "label 7 is 9"):
        prepare_data(config)


def test_stratified_splits_are_seeded_disjoint_and_keep_class_proportions(blobs):
    y = blobs[1]
    kept, held = stratified_split(y, 0.25, seed=3)
    assert len(held) == 150 and len(np.intersect1d(kept, held)) == 0
    assert len(kept) + len(held) == len(y)
    np.testing.assert_allclose(np.bincount(y[held]) / 150, np.bincount(y) / 600, atol=0.01)
    again, _ = stratified_split(y, 0.25, seed=3)
    other, _ = stratified_split(y, 0.25, seed=4)
    assert np.array_equal(kept, again) and not np.array_equal(kept, other)
    with pytest.raises(DataError, match="at least 2 examples"):
        stratified_split(np.array([0, 0, 0, 1]), 0.5, seed=0)


def test_prepare_data_splits_test_then_validation_reproducibly(data_folder):
    config = dict(DEFAULTS, data=str(data_folder), val_split=0.1, test_split=0.2, seed=1)
    first, second = prepare_data(config), prepare_data(config)
    assert (len(first.y_train), len(first.y_val), len(first.y_test)) == (432, 48, 120)
    np.testing.assert_array_equal(first.x_test.indices, second.x_test.indices)
    every = np.concatenate([first.x_train.indices, first.x_val.indices, first.x_test.indices])
    assert sorted(every) == list(range(600))


def test_standardizer_matches_numpy_and_leaves_constant_features_alone(blobs):
    x = blobs[0].copy()
    x[:, 0] = 5.0
    scaler = Standardizer.fit(Subset(x, np.arange(600)))
    np.testing.assert_allclose(scaler.mean, x.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(scaler.std[1:], x.std(axis=0)[1:], rtol=1e-4)
    assert scaler.std[0] == 1.0
    scaled = scaler(x)
    assert scaled.dtype == np.float32 and np.allclose(scaled[:, 0], 0.0)
    restored = Standardizer.from_arrays(scaler.arrays())
    np.testing.assert_array_equal(restored(x), scaled)
