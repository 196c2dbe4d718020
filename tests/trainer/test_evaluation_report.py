"""The evaluation report: metrics against hand computations, and every file it writes."""
import json

import numpy as np
import pytest

from engine.training.history import History
from engine.cli.reports import classification_metrics, write_report

# Six examples, three classes; predictions (argmax) are 0, 1, 1, 1, 2, 0.
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
PROBABILITIES = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1],
                          [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])


def test_metrics_match_a_hand_computation():
    results = classification_metrics(Y_TRUE, PROBABILITIES, class_names=["a", "b", "c"])
    assert results["accuracy"] == pytest.approx(4 / 6)
    # Top-2: the true class has one of the two highest scores in every row (rows 2 and 6 second).
    assert results["top_k_accuracy"] == {"2": pytest.approx(1.0)}
    per_class = results["per_class"]
    # Class b: predicted for examples 1, 2, 3 (right for 2 and 3): precision 2/3, recall 2/2.
    assert per_class["b"]["precision"] == pytest.approx(2 / 3)
    assert per_class["b"]["recall"] == per_class["b"]["accuracy"] == pytest.approx(1.0)
    assert per_class["b"]["f1"] == pytest.approx(0.8)
    assert per_class["a"]["support"] == 2 and per_class["a"]["recall"] == pytest.approx(0.5)
    # Class a one-vs-rest AUC: positives score 0.7, 0.3; negatives 0.1, 0.2, 0.1, 0.5. Of the 8
    # (positive, negative) pairs the positive wins 7 (0.3 < 0.5 loses): AUC 7/8.
    assert per_class["a"]["roc_auc"] == pytest.approx(7 / 8)
    assert results["macro"]["recall"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert results["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert 0 < results["roc_auc"]["macro_ovr"] <= 1


def test_roc_auc_is_reported_undefined_when_a_class_is_absent():
    results = classification_metrics(Y_TRUE[:4], PROBABILITIES[:4])
    assert results["roc_auc"]["macro_ovr"] is None
    assert "no example of class(es) ['2']" in results["roc_auc"]["undefined_because"]
    assert results["per_class"]["2"]["roc_auc"] is None


def test_write_report_writes_the_json_the_text_report_and_readable_plots(tmp_path):
    import matplotlib.image
    history = History()
    for epoch in range(1, 6):
        history.append(epoch, {"loss": 1 / epoch, "val_loss": 1.2 / epoch, "accuracy": 0.5,
                               "val_accuracy": 0.4, "learning_rate": 0.1 / epoch})
    results = write_report(tmp_path, Y_TRUE, PROBABILITIES, history=history,
                           class_names=["cat", "dog", "bird"], extra={"loss": 0.5})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results)) and saved["loss"] == 0.5
    text = (tmp_path / "classification_report.txt").read_text()
    assert "bird" in text and "macro avg" in text
    for name in ("confusion_matrix", "confusion_matrix_normalized", "per_class_accuracy",
                 "training_curves"):
        image = matplotlib.image.imread(tmp_path / f"{name}.png")
        assert image.shape[0] > 300 and image.shape[1] > 300, name
        assert image[..., :3].std() > 0.05, name  # not a blank canvas


def test_report_without_history_has_no_training_curves(tmp_path):
    write_report(tmp_path, Y_TRUE, PROBABILITIES)
    assert not (tmp_path / "training_curves.png").exists()
    with pytest.raises(ValueError, match="2 names for 3 classes"):
        write_report(tmp_path, Y_TRUE, PROBABILITIES, class_names=["a", "b"])
