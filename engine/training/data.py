"""Bundled data sets."""
import numpy as np


def load_mnist1d(seed=None):
    """MNIST-1D (Greydanus & Kobak), generated offline: 4,000 training and 1,000 test examples.

    Uses ``mnist1d``'s ``make_dataset(get_dataset_args())`` (never its downloading path), so it
    needs no network. Returns ``(x_train, y_train, x_test, y_test)``: float32 features of length
    40 and int64 labels in [0, 10).
    """
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    if seed is not None:
        args.seed = seed
    data = make_dataset(args)
    return (data["x"].astype(np.float32), data["y"].astype(np.int64),
            data["x_test"].astype(np.float32), data["y_test"].astype(np.int64))
