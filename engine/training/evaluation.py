"""Evaluation over a processor: mean loss, accuracy and class probabilities in inference mode."""
import numpy as np

from engine.parallel.processor import ParallelBatchProcessor
from engine.parallel.system import available_memory_bytes, usable_cores
from engine.training.datasets import Feed, as_labels, check_features, check_labels, describe

__all__ = ["evaluate"]


def evaluate(model, state, x, y, *, standardizer=None, batch_size=256, num_processes=None,
             memory_limit_bytes=None):
    """Mean loss, accuracy and class probabilities of ``state`` on ``(x, y)`` (inference mode).

    Returns ``{"loss": float, "accuracy": float, "probabilities": (n, classes) array}``.
    """
    y = as_labels(y, "y")
    check_features(x, describe(x, "x"), num_labels=len(y))
    check_labels(y, int(model.num_outputs), f"labels of {describe(x, 'x')}")
    processes = min(num_processes or usable_cores(), len(y))
    feed = Feed(x, y, standardizer, memory_limit_bytes or available_memory_bytes() // 4)
    with ParallelBatchProcessor(model, num_processes=processes,
                                batch_size=max(processes, min(batch_size, len(y)))) as processor:
        loss, probabilities = _predict(processor, state, feed)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == y))
    return {"loss": float(loss), "accuracy": accuracy, "probabilities": probabilities}


def _predict(processor, state, feed):
    """Mean loss and class probabilities of ``feed`` in inference mode, in input order."""
    params = {"update_weights": False}
    if feed.in_memory:
        _, results = processor.run_parallel(feed.x, feed.y, state, params)
        return results["mean_loss"], results["predictions"]
    losses, predictions = [], []
    for x, y in feed.segments(np.arange(len(feed.y)), processor.batch_size):
        _, results = processor.run_parallel(x, y, state, params)
        losses.append(results["mean_loss"] * len(y))
        predictions.append(results["predictions"])
    return sum(losses) / len(feed.y), np.concatenate(predictions)
