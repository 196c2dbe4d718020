"""Fixtures of the trainer, CLI and data tests: small data on disk and quiet fit options."""
import numpy as np
import pytest


@pytest.fixture
def quiet_fit():
    """Options of a small, fast, silent fit on the ``blobs`` problem (12 features, 3 classes)."""
    return dict(batch_size=64, num_processes=1, learning_rate=0.01, verbose=False, seed=0)


@pytest.fixture
def data_folder(tmp_path, blobs):
    """``blobs`` saved as a data folder (features.npy, labels.npy) in the users' convention."""
    folder = tmp_path / "data"
    folder.mkdir()
    np.save(folder / "features.npy", blobs[0])
    np.save(folder / "labels.npy", blobs[1])
    return folder
