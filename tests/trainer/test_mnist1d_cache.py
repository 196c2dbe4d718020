"""The MNIST-1D cache: generated once, read back bit for bit, regenerated when the file is bad."""
import numpy as np
import pytest

from engine.training import data as data_module


@pytest.fixture
def generator(monkeypatch):
    """mnist1d's make_dataset replaced by a fast fake that counts its calls (seeded by args)."""
    import mnist1d.data
    calls = []

    def fake_make_dataset(args):
        calls.append(args.seed)
        rng = np.random.default_rng(args.seed)
        return {"x": rng.standard_normal((12, 40)), "y": rng.integers(0, 10, 12),
                "x_test": rng.standard_normal((4, 40)), "y_test": rng.integers(0, 10, 4)}

    monkeypatch.setattr(mnist1d.data, "make_dataset", fake_make_dataset)
    return calls


def _cache_files(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".npz")


def test_the_second_load_reads_the_cache_and_returns_the_same_arrays(tmp_path, monkeypatch,
                                                                     generator):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    first = data_module.load_mnist1d()
    assert len(generator) == 1 and len(_cache_files(tmp_path)) == 1
    second = data_module.load_mnist1d()
    assert len(generator) == 1  # not generated again
    for a, b, dtype in zip(first, second, (np.float32, np.int64, np.float32, np.int64)):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(a, b)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_each_seed_has_its_own_file(tmp_path, monkeypatch, generator):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    default, other = data_module.load_mnist1d(), data_module.load_mnist1d(seed=123)
    assert len(_cache_files(tmp_path)) == 2 and len(generator) == 2
    assert not np.array_equal(default[0], other[0])
    np.testing.assert_array_equal(data_module.load_mnist1d(seed=123)[0], other[0])
    assert len(generator) == 2


def test_a_truncated_cache_file_is_generated_again_and_replaced(tmp_path, monkeypatch, generator):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    expected = data_module.load_mnist1d()
    (path,) = _cache_files(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    again = data_module.load_mnist1d()
    assert len(generator) == 2
    np.testing.assert_array_equal(again[0], expected[0])
    data_module.load_mnist1d()
    assert len(generator) == 2  # the replaced file is whole again


def test_an_empty_setting_turns_the_cache_off(tmp_path, monkeypatch, generator):
    monkeypatch.setenv("ENGINE_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    data_module.load_mnist1d()
    data_module.load_mnist1d()
    assert len(generator) == 2 and not list(tmp_path.iterdir())


def test_a_folder_that_cannot_be_made_only_costs_the_cache(tmp_path, monkeypatch, generator):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(blocker / "cache"))
    x, y, x_test, y_test = data_module.load_mnist1d()
    assert x.shape == (12, 40) and y_test.shape == (4,) and len(generator) == 1
