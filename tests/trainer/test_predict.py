"""Inference: the Predictor (one example, batches, the all-cores path) and ``engine predict``.

The oracle is the model's own ``predict`` on inputs standardized by hand with the statistics
stored in the checkpoint (a NumPy twin of what the Predictor must do)."""
import csv
import re

import numpy as np
import pytest

from engine import NetworkState, Predictor
from engine.cli.main import main
from engine.training.checkpoint import load_checkpoint
from engine.training.inference import load_trained_model


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A standardized MLP trained for 2 epochs by ``engine train`` on the blobs data folder."""
    rng = np.random.default_rng(7)  # the blobs fixture's problem, rebuilt at module scope
    centers = rng.normal(0, 3, size=(3, 12))
    labels = rng.integers(0, 3, size=600)
    x = (centers[labels] + rng.normal(size=(600, 12))).astype(np.float32)
    root = tmp_path_factory.mktemp("predict")
    folder = root / "data"
    folder.mkdir()
    np.save(folder / "features.npy", x)
    np.save(folder / "labels.npy", labels)
    assert main(["train", "--data", str(folder), "--model", "mlp", "--model-arg", "hidden=16",
                 "--batch-size", "32", "--workers", "1", "--epochs", "2", "--standardize",
                 "--output-dir", str(root / "run"), "--no-progress"]) == 0
    return root / "run" / "model.h5", folder, x, labels


def _reference(checkpoint_path, x):
    """Probabilities of the checkpoint's state on x standardized by hand."""
    model, state, _, _ = load_trained_model(checkpoint_path)
    arrays = load_checkpoint(checkpoint_path).arrays
    mean, std = arrays["standardize/mean"], arrays["standardize/std"]
    return model.predict(state, ((x - mean) / std).astype(np.float32))


def test_predictor_applies_the_checkpoint_standardization(trained_run):
    path, _, x, _ = trained_run
    with Predictor.from_checkpoint(path, num_processes=1) as predictor:
        probabilities = predictor(x[:40])
    assert probabilities.shape == (40, 3)
    np.testing.assert_allclose(probabilities, _reference(path, x[:40]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_one_example_gives_one_row_of_probabilities_without_starting_a_process(
        trained_run, live_children):
    path, _, x, _ = trained_run
    with Predictor.from_checkpoint(path, num_processes=2) as predictor:
        rows = [predictor(example) for example in x[:20]]
        assert live_children() == []  # small inputs never start a worker
    assert rows[0].shape == (3,)
    np.testing.assert_allclose(np.stack(rows), _reference(path, x[:20]), rtol=1e-5, atol=1e-6)
    with Predictor.from_checkpoint(path, num_processes=1) as predictor:
        assert predictor.predict_classes(x[0]) == int(np.argmax(rows[0]))
        assert predictor.predict_classes(x[:5]).dtype == np.int64


def test_large_inputs_use_one_pool_kept_across_calls_and_match_in_process(trained_run,
                                                                          live_children):
    path, _, x, _ = trained_run
    with Predictor.from_checkpoint(path, num_processes=1) as serial:
        expected = serial(x)
    with Predictor.from_checkpoint(path, num_processes=2, parallel_min_examples=100) as predictor:
        first = predictor(x)
        pids = sorted(child.pid for child in live_children())
        second = predictor(x[:300])
        assert len(pids) == 2 and sorted(c.pid for c in live_children()) == pids  # kept
    assert live_children() == []  # close() stopped them
    # The same forward pass on other chunk sizes: float32 rounding of BLAS only.
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(second, expected[:300], rtol=1e-5, atol=1e-6)


def test_predictor_refuses_wrong_shapes_and_non_finite_inputs(trained_run):
    path, _, x, _ = trained_run
    with Predictor.from_checkpoint(path, num_processes=1) as predictor:
        with pytest.raises(ValueError, match=r"shape \(12,\).*Received an array of shape "
                                             r"\(5, 11\)"):
            predictor(x[:5, :11])
        bad = x[:6].copy()
        bad[4, 3] = np.nan
        with pytest.raises(ValueError, match="example 4 of the input holds NaN"):
            predictor(bad)


def test_predictor_refuses_a_state_of_another_model_and_a_file_without_a_model_name(
        trained_run, tmp_path):
    path, _, _, _ = trained_run
    model, state, _, _ = load_trained_model(path)
    from models import MLP
    with pytest.raises(ValueError, match="does not match"):
        Predictor(MLP(sizes=(12, 8, 3)), state)
    plain = tmp_path / "plain.h5"
    NetworkState.save(state, plain)
    with pytest.raises(ValueError, match="not written by 'engine train'"):
        Predictor.from_checkpoint(plain)
    with pytest.raises(ValueError, match="parallel_min_examples must be a positive int"):
        Predictor(model, state, parallel_min_examples=0)


def test_predict_command_writes_one_csv_row_per_example(trained_run, tmp_path, capsys):
    path, folder, x, labels = trained_run
    (folder / "class_names.txt").write_text("left\nright\nup\n")
    try:
        output = tmp_path / "out" / "predictions.csv"
        assert main(["predict", "--checkpoint", str(path), "--data", str(folder), "--output",
                     str(output), "--workers", "2"]) == 0
    finally:
        (folder / "class_names.txt").unlink()
    rows = list(csv.DictReader(open(output)))
    assert len(rows) == len(x) and list(rows[0]) == [
        "example", "predicted", "predicted_name", "probability_left", "probability_right",
        "probability_up"]
    probabilities = np.array([[float(row[f"probability_{name}"]) for name in ("left", "right",
                              "up")] for row in rows])
    expected = _reference(path, x)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6, atol=1e-7)  # 7 digits written
    predicted = np.array([int(row["predicted"]) for row in rows])
    np.testing.assert_array_equal(predicted, expected.argmax(axis=1))
    assert rows[0]["predicted_name"] == ["left", "right", "up"][predicted[0]]
    accuracy = float(np.mean(predicted == labels))
    assert f"accuracy {accuracy:.4f} against its labels" in capsys.readouterr().out


def test_predict_command_writes_npz_from_a_bare_npy_file(trained_run, tmp_path):
    path, folder, x, _ = trained_run
    output = tmp_path / "predictions.npz"
    assert main(["predict", "--checkpoint", str(path), "--data", str(folder / "features.npy"),
                 "--output", str(output), "--workers", "1"]) == 0
    with np.load(output) as saved:
        np.testing.assert_allclose(saved["probabilities"], _reference(path, x), rtol=1e-6,
                                   atol=1e-7)
        np.testing.assert_array_equal(saved["predicted"], saved["probabilities"].argmax(axis=1))
        assert saved["predicted"].dtype == np.int64 and "class_names" not in saved.files


@pytest.mark.parametrize("problem, message", [
    ("nan", "example 7 holds NaN or infinite values"),
    ("shape", r"examples have shape \(10,\), the model .* takes \(12,\)"),
    ("labels", r"labels must be class indices in \[0, 3\)"),
    ("output", "--output must end in .csv or .npz"),
])
def test_predict_command_checks_the_data_like_train(trained_run, tmp_path, capsys, problem,
                                                    message):
    path, _, x, labels = trained_run
    x, labels, output = x[:20].copy(), labels[:20].copy(), tmp_path / "p.csv"
    if problem == "nan":
        x[7, 0] = np.inf
    elif problem == "shape":
        x = x[:, :10]
    elif problem == "labels":
        labels[3] = 5
    else:
        output = tmp_path / "p.txt"
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=labels)
    assert main(["predict", "--checkpoint", str(path), "--data", str(data), "--output",
                 str(output), "--workers", "1"]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not output.exists()


def test_predict_command_reads_hdf5_features_by_key(trained_run, tmp_path):
    import h5py
    path, _, x, labels = trained_run
    data = tmp_path / "data.h5"
    with h5py.File(data, "w") as f:
        f["signals"] = x[:50]
        f["y"] = labels[:50]
    output = tmp_path / "p.npz"
    assert main(["predict", "--checkpoint", str(path), "--data", str(data), "--x-key",
                 "signals", "--output", str(output), "--workers", "1"]) == 0
    with np.load(output) as saved:
        np.testing.assert_allclose(saved["probabilities"], _reference(path, x[:50]), rtol=1e-6,
                                   atol=1e-7)
    assert main(["predict", "--checkpoint", str(path), "--data", str(data), "--output",
                 str(output), "--workers", "1"]) == 1  # no dataset "x" and no --x-key
