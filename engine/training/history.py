"""History: what each epoch of training logged, and how an epoch's processor results become logs."""
import math

import numpy as np

__all__ = ["History", "merge_results"]


class History:
    """Per-epoch logs of a training run (``fit`` returns one).

    ``history[key]`` is a list with one value per epoch and ``epoch`` the matching 1-based epoch
    numbers (a resumed run includes the epochs it restored). Keys:

    * ``loss``: mean training loss over the epoch's steps (training mode, as the steps ran).
    * ``accuracy``: accuracy on a fixed sample of up to 2,000 training examples after the epoch
      (inference mode). ``val_loss``/``val_accuracy``: the validation set after the epoch.
    * ``learning_rate``; ``grad_norm``: mean global gradient norm before clipping (NaN in
      ``sync="states"``); ``steps``.
    * the engine's timing, summed over the epoch's steps: ``compute_s`` (slowest worker's compute),
      ``sync_s`` (reduce and update), ``wait_s`` (waiting beyond the slowest compute), ``wall_s``;
      ``samples_per_s`` = training examples / ``wall_s``; ``epoch_s``: the whole epoch, evaluation
      included.

    ``state`` is the trained NetworkState and ``standardizer`` the feature scaling (or None).
    """

    def __init__(self):
        self.epoch, self.history = [], {}
        self.state = self.standardizer = None

    def append(self, epoch, logs):
        count = len(self.epoch)
        for key in logs:
            self.history.setdefault(key, [math.nan] * count)
        for key, values in self.history.items():
            values.append(float(logs.get(key, math.nan)))
        self.epoch.append(int(epoch))

    def last(self, key, default=None):
        values = self.history.get(key)
        return values[-1] if values else default

    def to_dict(self):
        """JSON-serialisable form (NaN becomes None)."""
        return {"epoch": list(self.epoch),
                "history": {key: [None if math.isnan(v) else v for v in values]
                            for key, values in self.history.items()}}

    @classmethod
    def from_dict(cls, data):
        history = cls()
        history.epoch = [int(e) for e in data.get("epoch", [])]
        history.history = {key: [math.nan if v is None else float(v) for v in values]
                           for key, values in data.get("history", {}).items()}
        return history

    def __repr__(self):
        return f"History({len(self.epoch)} epochs, keys={list(self.history)})"


def merge_results(parts, learning_rate):
    """One epoch's logs from the results of its ``run_parallel`` call(s)."""
    def joined(key):
        return np.concatenate([np.atleast_1d(np.asarray(p[key], dtype=np.float64)) for p in parts])

    examples, losses = joined("examples"), joined("loss")
    wall_s = float(joined("wall_s").sum())
    grad_norm = joined("grad_norm")
    logs = {"loss": float(np.dot(losses, examples) / examples.sum()),
            "learning_rate": float(learning_rate),
            "grad_norm": float(np.mean(grad_norm)) if np.all(np.isfinite(grad_norm)) else math.nan,
            "steps": float(len(examples))}
    for key in ("compute_s", "sync_s", "wait_s"):
        logs[key] = float(joined(key).sum())
    logs["wall_s"] = wall_s
    logs["samples_per_s"] = float(examples.sum() / wall_s) if wall_s > 0 else math.nan
    return logs
