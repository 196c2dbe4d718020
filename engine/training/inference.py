"""Inference: class probabilities of a trained model, loaded once, for real-time and bulk use.

A :class:`Predictor` holds the model, its state and its standardization. Small inputs (one
example, a short batch) run in the calling process: no process start, no shared-memory copy, so
one example costs one forward pass. Inputs of ``parallel_min_examples`` rows or more go through a
``ParallelBatchProcessor`` (``update_weights=False``) that is started at the first such call and
kept alive until :meth:`Predictor.close`, so every core works on a large batch and the pool's start
is paid once.
"""
import numbers
import os

import numpy as np

from engine.parallel.processor import ParallelBatchProcessor
from engine.parallel.system import usable_cores
from engine.training.checkpoint import load_checkpoint
from engine.training.datasets import Standardizer

__all__ = ["Predictor", "load_trained_model"]

# Rows per step of the processor path: large enough that a step's signalling (~0.4 ms) is small
# against its forward pass, small enough that a worker's activations stay in memory.
_PARALLEL_BATCH = 1024


def load_trained_model(path):
    """The model, state and standardization of a checkpoint written by ``engine train``.

    Args:
        path: ``model.h5`` or ``checkpoints/*.h5`` of a run.
    Returns:
        ``(model, state, standardizer or None, metadata)``.
    Raises:
        FileNotFoundError: if ``path`` does not exist. ValueError: if the file holds no run
            configuration (a plain state: use ``Predictor(model, state)`` with your own model).
    """
    checkpoint = load_checkpoint(path)
    metadata = checkpoint.metadata
    if "model_name" not in metadata:
        raise ValueError(f"{os.fspath(path)!r} does not say which model it holds (no model_name in "
                         "its metadata): it was not written by 'engine train'. Build the model "
                         "yourself and use Predictor(model, state, standardizer=...).")
    from models import get_model
    from models.losses import loss_from_config
    arguments = {key: tuple(value) if isinstance(value, list) else value
                 for key, value in metadata.get("model_args", {}).items()}
    model = get_model(metadata["model_name"], **arguments)
    if metadata.get("loss"):
        model = model.with_loss(loss_from_config(metadata["loss"]))
    model.init_state(0).check_matches(checkpoint.state, f"the state in {os.fspath(path)!r}")
    return model, checkpoint.state, Standardizer.from_arrays(checkpoint.arrays), metadata


class Predictor:
    """Class probabilities of one trained model, callable on one example or a batch.

        predictor = Predictor.from_checkpoint("runs/cnn1d-.../model.h5")
        probabilities = predictor(x_one)           # (classes,), in this process
        probabilities = predictor(x_batch)         # (n, classes); all cores for large n
        predictor.close()                          # or use it as a context manager

    Args:
        model: a model following the protocol in ``models`` (``predict``, ``input_shape``).
        state: its trained NetworkState.
        standardizer: the ``Standardizer`` the model was trained with, or None.
        num_processes: worker processes for large inputs; None: every usable core; 1: always in
            this process.
        parallel_min_examples: inputs with at least this many rows use the worker processes.
        check_finite: refuse inputs holding NaN or infinity (a ValueError naming the row).
    Raises:
        ValueError: for bad options, or a state that does not fit the model.
    """

    def __init__(self, model, state, *, standardizer=None, num_processes=None,
                 parallel_min_examples=4096, check_finite=True):
        for name, value in (("parallel_min_examples", parallel_min_examples),
                            ("num_processes", 1 if num_processes is None else num_processes)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int. Received: {name}={value!r}.")
        self.input_shape = tuple(getattr(model, "input_shape", None) or ())
        if not self.input_shape:
            raise ValueError(f"the model must declare input_shape to tell one example from a "
                             f"batch. Received a {type(model).__name__} without it.")
        model.init_state(0).check_matches(state, "the predictor's state")
        self.model, self.state, self.standardizer = model, state, standardizer
        self.num_classes = int(model.num_outputs)
        self.num_processes = usable_cores() if num_processes is None else int(num_processes)
        self.parallel_min_examples = int(parallel_min_examples)
        self.check_finite = bool(check_finite)
        self._processor = None

    @classmethod
    def from_checkpoint(cls, path, **options):
        """A Predictor for a checkpoint written by ``engine train`` (see load_trained_model);
        ``options`` are those of the constructor."""
        model, state, standardizer, _ = load_trained_model(path)
        return cls(model, state, standardizer=standardizer, **options)

    def __call__(self, x):
        """Class probabilities: ``(classes,)`` for one example, ``(n, classes)`` for a batch.

        Raises:
            ValueError: if ``x`` has neither the model's input shape nor a batch of it, or holds
                NaN or infinity.
        """
        x = np.asarray(x, dtype=np.float32)
        one = x.shape == self.input_shape
        batch = x[None] if one else x
        if batch.shape[1:] != self.input_shape:
            raise ValueError(f"the model takes examples of shape {self.input_shape} (or batches "
                             f"(n, {', '.join(map(str, self.input_shape))})). Received an array of "
                             f"shape {x.shape}.")
        if self.check_finite and not np.isfinite(batch).all():
            row = int(np.argmin(np.isfinite(batch.reshape(len(batch), -1)).all(axis=1)))
            raise ValueError(f"example {row} of the input holds NaN or infinite values; the "
                             "model's output would be meaningless. Clean or impute them first.")
        if self.standardizer is not None:
            batch = self.standardizer(batch)
        if len(batch) >= max(self.parallel_min_examples, self.num_processes) > 1:
            probabilities = self._predict_parallel(batch)
        else:
            probabilities = np.asarray(self.model.predict(self.state, batch), dtype=np.float32)
        return probabilities[0] if one else probabilities

    def predict_classes(self, x):
        """The most probable class of each example (an int, or an int64 array for a batch)."""
        probabilities = self(x)
        classes = probabilities.argmax(axis=-1)
        return int(classes) if probabilities.ndim == 1 else classes.astype(np.int64)

    def _predict_parallel(self, batch):
        if self._processor is None:  # one step: _PARALLEL_BATCH rows per worker
            self._processor = ParallelBatchProcessor(
                self.model, num_processes=self.num_processes,
                batch_size=_PARALLEL_BATCH * self.num_processes)
        labels = np.zeros(len(batch), np.int64)  # evaluation computes a loss too: any valid class
        _, results = self._processor.run_parallel(batch, labels, self.state,
                                                  {"update_weights": False})
        return results["predictions"]

    def close(self):
        """Stop the worker processes of the large-input path, if started. Safe to call twice."""
        processor, self._processor = self._processor, None
        if processor is not None:
            processor.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return (f"Predictor({self.model!r}, input_shape={self.input_shape}, classes="
                f"{self.num_classes}, standardized={self.standardizer is not None}, "
                f"num_processes={self.num_processes})")
