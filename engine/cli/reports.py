"""Evaluation reports: metrics from scikit-learn, a text report and PNG plots with matplotlib.

``write_report(output_dir, y_true, probabilities, history=...)`` writes

    results.json                      accuracy, top-k accuracy, precision/recall/F1 per class and
                                      macro/weighted, ROC AUC (one-vs-rest) where defined, the
                                      confusion matrix, and whatever ``extra`` holds
    classification_report.txt         scikit-learn's classification_report
    confusion_matrix.png              counts
    confusion_matrix_normalized.png   each row divided by its class's examples (recall on diagonal)
    per_class_accuracy.png            accuracy of each class, with the overall accuracy
    training_curves.png               loss, accuracy and learning rate per epoch (given a history)
"""
import json
import math
import os

import numpy as np

__all__ = ["classification_metrics", "write_report", "plot_training_curves"]

_ANNOTATE_UP_TO = 20  # classes; beyond this, confusion-matrix cells are not labelled with numbers


def classification_metrics(y_true, probabilities, class_names=None):
    """Metrics of predicted class probabilities against integer labels, as a JSON-ready dict."""
    from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support,
                                 roc_auc_score, top_k_accuracy_score)
    y_true = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(probabilities, dtype=np.float64)
    scores /= scores.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 only to ~1e-7
    num_classes = scores.shape[1]
    labels = np.arange(num_classes)
    names = _names(class_names, num_classes)
    predicted = scores.argmax(axis=1)
    results = {"num_examples": int(len(y_true)), "num_classes": num_classes,
               "accuracy": float(accuracy_score(y_true, predicted)), "top_k_accuracy": {}}
    for k in (2, 3, 5):
        if k < num_classes:
            results["top_k_accuracy"][str(k)] = float(
                top_k_accuracy_score(y_true, scores, k=k, labels=labels))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, labels=labels, zero_division=0)
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, predicted, labels=labels,
                                                     average=average, zero_division=0)
        results[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    per_class = {}
    for c in labels:
        present = 0 < support[c] < len(y_true)
        auc = float(roc_auc_score(y_true == c, scores[:, c])) if present else None
        per_class[names[c]] = {"precision": float(precision[c]), "recall": float(recall[c]),
                               "f1": float(f1[c]), "support": int(support[c]),
                               "accuracy": float(recall[c]) if support[c] else None,
                               "roc_auc": auc}
    results["per_class"] = per_class
    if np.all(support > 0):
        average = roc_auc_score(y_true, scores[:, 1]) if num_classes == 2 else roc_auc_score(
            y_true, scores, multi_class="ovr", average="macro", labels=labels)
        results["roc_auc"] = {"macro_ovr": float(average)}
    else:
        missing = [names[c] for c in labels if support[c] == 0]
        results["roc_auc"] = {"macro_ovr": None,
                              "undefined_because": f"no example of class(es) {missing}"}
    results["confusion_matrix"] = confusion_matrix(y_true, predicted, labels=labels).tolist()
    return results


def write_report(output_dir, y_true, probabilities, *, history=None, class_names=None, extra=None,
                 title="test"):
    """Write the metrics, the text report and the plots into ``output_dir``; return the metrics.

    Args:
        history: a ``History`` (or its ``to_dict()``) for training_curves.png; None skips it.
        extra: JSON-serialisable entries added to results.json (e.g. checkpoint, loss, split).
        title: which split the examples are, shown in plot titles.
    """
    from sklearn.metrics import classification_report
    os.makedirs(output_dir, exist_ok=True)
    results = classification_metrics(y_true, probabilities, class_names)
    results.update(extra or {})
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    num_classes = results["num_classes"]
    names = _names(class_names, num_classes)
    predicted = np.asarray(probabilities).argmax(axis=1)
    text = classification_report(y_true, predicted, labels=np.arange(num_classes),
                                 target_names=names, digits=4, zero_division=0)
    with open(os.path.join(output_dir, "classification_report.txt"), "w") as f:
        f.write(f"{title}: {len(y_true)} examples\n\n{text}")
    matrix = np.asarray(results["confusion_matrix"])
    _plot_confusion(matrix, names, os.path.join(output_dir, "confusion_matrix.png"),
                    f"Confusion matrix ({title}, {len(y_true)} examples)", normalized=False)
    _plot_confusion(matrix, names, os.path.join(output_dir, "confusion_matrix_normalized.png"),
                    f"Confusion matrix, normalized by true class ({title})", normalized=True)
    _plot_per_class(results, names, os.path.join(output_dir, "per_class_accuracy.png"), title)
    if history is not None:
        plot_training_curves(history, os.path.join(output_dir, "training_curves.png"))
    return results


def _names(class_names, num_classes):
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes.")
    return [str(name) for name in class_names]


def _figure(width, height, columns=1):
    # A bare Figure, not pyplot: no GUI backend is needed (servers, CI) and a user's interactive
    # backend is left alone.
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, columns)


def _plot_confusion(matrix, names, path, title, normalized):
    count = len(names)
    values = matrix.astype(np.float64)
    if normalized:
        totals = values.sum(axis=1, keepdims=True)
        values = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
    size = min(14.0, 3.0 + 0.5 * count)
    fig, ax = _figure(size + 1.2, size)
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalized else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(count), yticks=range(count), xlabel="Predicted class",
           ylabel="True class", title=title)
    ax.set_xticklabels(names, rotation=45 if max(map(len, names)) > 3 else 0, ha="right"
                       if max(map(len, names)) > 3 else "center")
    ax.set_yticklabels(names)
    if count <= _ANNOTATE_UP_TO:
        threshold = values.max() / 2 if values.max() > 0 else 0.5
        for i in range(count):
            for j in range(count):
                text = f"{values[i, j]:.2f}" if normalized else f"{int(matrix[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if count > 10 else 9,
                        color="white" if values[i, j] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_per_class(results, names, path, title):
    accuracy = [results["per_class"][name]["accuracy"] or 0.0 for name in names]
    support = [results["per_class"][name]["support"] for name in names]
    fig, ax = _figure(max(6.0, 0.45 * len(names) + 2), 4.5)
    bars = ax.bar(range(len(names)), accuracy, color="tab:blue", zorder=2)
    ax.axhline(results["accuracy"], color="tab:red", linestyle="--", zorder=1,  # behind the bars
               label=f"overall {results['accuracy']:.3f}")
    if len(names) <= 30:  # inside the bar's top, clear of the overall line above most bars
        for bar, value, n in zip(bars, accuracy, support):
            inside = value > 0.25
            ax.text(bar.get_x() + bar.get_width() / 2, value - 0.02 if inside else value + 0.02,
                    f"{value:.2f}\nn={n}", ha="center", va="top" if inside else "bottom",
                    fontsize=7, color="white" if inside else "black", zorder=3)
    ax.set(xticks=range(len(names)), ylim=(0, 1.05), xlabel="Class", ylabel="Accuracy (recall)",
           title=f"Per-class accuracy ({title})")
    ax.set_xticklabels(names, rotation=45 if max(map(len, names)) > 3 else 0)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_training_curves(history, path):
    """Loss, accuracy and learning rate per epoch from a History (or its ``to_dict()``)."""
    data = history.to_dict() if hasattr(history, "to_dict") else history
    epochs, logs = data["epoch"], data["history"]

    def series(key):
        return [math.nan if v is None else v for v in logs.get(key, [])]

    from matplotlib.ticker import MaxNLocator
    fig, axes = _figure(15, 4.2, columns=3)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
    for ax, (title, keys) in zip(axes[:2], (("Loss", ("loss", "val_loss")),
                                            ("Accuracy", ("accuracy", "val_accuracy")))):
        for key, label in zip(keys, ("training", "validation")):
            if key in logs:
                ax.plot(epochs, series(key), marker="." if len(epochs) < 40 else None, label=label)
        ax.set(title=title, xlabel="Epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    rates = series("learning_rate")
    axes[2].plot(epochs, rates, color="tab:green")
    if rates and min(rates) > 0 and max(rates) / min(rates) > 20:
        axes[2].set_yscale("log")
    elif rates and max(rates) > 0:
        axes[2].set_ylim(0, 1.1 * max(rates))
    axes[2].set(title="Learning rate", xlabel="Epoch")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
