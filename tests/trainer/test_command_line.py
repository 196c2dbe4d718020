"""The command line end to end on a small data folder: exit codes, files written, the report."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from engine.training.checkpoint import load_checkpoint
from engine.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT_FILES = {"results.json", "classification_report.txt", "confusion_matrix.png",
                "confusion_matrix_normalized.png", "per_class_accuracy.png",
                "training_curves.png"}


def _train(folder, out, *flags):
    return main(["train", "--data", str(folder), "--model", "mlp", "--model-arg", "hidden=16",
                 "--batch-size", "32", "--workers", "2", "--output-dir", str(out),
                 "--no-progress", *flags])


@pytest.mark.slow
def test_train_then_evaluate_writes_a_complete_results_folder(data_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data_folder, out, "--epochs", "3", "--checkpoint-every", "2", "--standardize",
                  "--loss", "focal", "--label-smoothing", "0.1", "--class-weights", "balanced",
                  "--schedule", "warmup-cosine", "--warmup-epochs", "1", "--clip-norm", "1",
                  "--grad-accum", "2", "--lr", "0.02") == 0
    printed = capsys.readouterr().out
    assert "432 train / 48 validation / 120 test examples" in printed and "test accuracy" in printed
    assert REPORT_FILES | {"config.json", "history.csv", "model.h5", "checkpoints"} <= \
        set(os.listdir(out))
    assert set(os.listdir(out / "checkpoints")) == {"last.h5", "best.h5", "epoch_0002.h5"}
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == "focal" and config["grad_accum"] == 2 and config["epochs"] == 3
    assert config["resolved"]["model_args"]["sizes"] == [12, 16, 3]
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert len(rows) == 3 and float(rows[0]["learning_rate"]) == pytest.approx(0.01)  # warmup
    results = json.loads((out / "results.json").read_text())
    assert results["num_examples"] == 120 and set(results["per_class"]) == {"0", "1", "2"}
    assert results["accuracy"] > 0.8 and results["roc_auc"]["macro_ovr"] > 0.9
    assert "standardize/mean" in load_checkpoint(out / "model.h5").arrays

    assert main(["evaluate", "--checkpoint", str(out / "model.h5"), "--workers", "1"]) == 0
    evaluation = json.loads((out / "evaluation" / "results.json").read_text())
    assert evaluation["accuracy"] == results["accuracy"]
    assert evaluation["loss"] == pytest.approx(results["loss"], rel=1e-5)
    assert REPORT_FILES <= set(os.listdir(out / "evaluation"))

    other = tmp_path / "other.npz"
    np.savez(other, x=np.load(data_folder / "features.npy")[:9],
             y=np.load(data_folder / "labels.npy")[:9])
    assert main(["evaluate", "--checkpoint", str(out / "model.h5"), "--data", str(other),
                 "--split", "all", "--output-dir", str(tmp_path / "other"), "--workers", "1"]) == 0
    assert json.loads((tmp_path / "other" / "results.json").read_text())["num_examples"] == 9


@pytest.mark.slow
def test_resume_takes_the_saved_configuration_and_continues_the_history(data_folder, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    assert _train(data_folder, out, "--epochs", "2") == 0
    assert main(["train", "--resume", str(out / "checkpoints" / "last.h5"), "--epochs", "4",
                 "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4"]
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "mlp" and config["epochs"] == 4 and config["batch_size"] == 32
    assert main(["train", "--resume", str(out / "checkpoints" / "last.h5")]) == 1
    assert "has already trained 4 epochs: pass --epochs above 4" in capsys.readouterr().err


@pytest.mark.slow
def test_without_data_it_trains_the_bundled_mnist1d_cnn(tmp_path, capsys):
    out = tmp_path / "mnist1d"
    assert main(["train", "--epochs", "2", "--workers", "1", "--output-dir", str(out),
                 "--no-progress"]) == 0
    assert "MNIST-1D (bundled): 3600 train / 400 validation / 1000 test" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["num_examples"] == 1000 and results["model"] == "cnn1d"
    assert results["accuracy"] > 0.2  # 2 epochs: far from trained, well above chance (0.1)


@pytest.mark.parametrize("argv, message", [
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    (["train", "--loss", "hinge"], "argument --loss: invalid choice: 'hinge'"),
    (["evaluate"], "the following arguments are required: --checkpoint"),
    (["launch"], "invalid choice: 'launch'"),
])
def test_a_bad_command_line_exits_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


@pytest.mark.parametrize("flags, message", [
    (["--data", "no/such/folder"], "data path 'no/such/folder' does not exist"),
    (["--model", "transformer"], "unknown model name 'transformer'"),
    (["--model-arg", "hidden"], "--model-arg takes key=value"),
    (["--model-arg", "depth=3"], "got an unexpected keyword argument 'depth'"),
    (["--schedule", "warmup-cosine", "--warmup-epochs", "9", "--epochs", "2"],
     "warmup_epochs must be less than total_epochs"),
])
def test_a_failing_run_exits_1_with_one_line(data_folder, tmp_path, capsys, flags, message):
    argv = ["train", "--data", str(data_folder), "--model", "mlp", "--no-progress",
            "--output-dir", str(tmp_path / "out"), *flags]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and "Traceback" not in error


def test_bad_data_exits_1_naming_the_file_and_the_example(data_folder, tmp_path, capsys):
    features = np.load(data_folder / "features.npy")
    features[17, 2] = np.nan
    np.save(data_folder / "features.npy", features)
    assert _train(data_folder, tmp_path / "out", "--epochs", "1") == 1
    assert "features.npy: example 17 holds NaN" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_tensorboard_flag_without_the_package_exits_1_saying_how_to_install(
        data_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # the event writer it needs
    assert _train(data_folder, tmp_path / "out", "--epochs", "1", "--tensorboard") == 1
    assert "pip install tensorboardX" in capsys.readouterr().err


def test_python_dash_m_engine_exit_codes_and_no_tracebacks(tmp_path):
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "engine", *argv], capture_output=True,
                              text=True, cwd=ROOT, timeout=120)

    bad_flag = run("train", "--epochs")
    assert bad_flag.returncode == 2 and "expected one argument" in bad_flag.stderr
    missing = run("evaluate", "--checkpoint", str(tmp_path / "none.h5"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    for child in (bad_flag, missing):
        assert "Traceback" not in child.stderr and child.stderr.count("\n") == 1


def test_help_of_each_command_lists_its_options(capsys):
    expected = {
        "train": ["--data", "--model", "--model-arg", "--epochs", "--batch-size", "--lr",
                  "--workers", "--sync", "--update-interval", "--optimizer", "--loss",
                  "--label-smoothing", "--class-weights", "--schedule", "--warmup-epochs",
                  "--clip-norm", "--grad-accum", "--output-dir", "--resume", "--seed"],
        "evaluate": ["--checkpoint", "--data", "--split", "--output-dir"],
        "info": ["--json"], "models": ["--json"]}
    for command, flags in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert all(flag in text for flag in flags), command


def test_info_and_models_describe_the_machine_and_the_registry(capsys):
    assert main(["info", "--json", "--no-tensorflow"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["usable_cores"] >= 1 and info["memory_total_bytes"] > 0
    assert info["versions"]["numba"] and "tensorflow" in info and isinstance(info["gpus"], list)
    assert main(["info", "--no-tensorflow"]) == 0
    text = capsys.readouterr().out
    assert "cores" in text and "numba" in text and "tensorflow" in text and "gpus" in text
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("softmax_regression", "mlp", "cnn1d", "hidden="))
