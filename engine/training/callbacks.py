"""Callbacks: hooks the Trainer calls around every epoch.

Order of calls: ``on_train_begin``; per epoch ``on_epoch_begin(epoch, logs)`` (logs hold the
``learning_rate``), ``on_epoch_end(epoch, logs)`` on every callback, then ``on_epoch_commit(epoch,
logs)`` on every callback; ``on_train_end``. ``epoch`` is 0-based; files and bars show it 1-based.
``on_epoch_commit`` runs once every callback has updated its own state for the epoch, which is when
checkpoints are written, so a checkpoint holds the epoch's final state of everything.

A callback reaches the training through ``self.trainer``: ``state`` (the current NetworkState,
assignable), ``stop_training``, ``history``, ``epochs``, ``initial_epoch`` and
``save_checkpoint(path)``. What it must remember across a resume goes through ``get_state``/
``set_state`` (JSON values) and ``get_arrays``/``set_arrays`` (numpy arrays).
"""
import csv
import itertools
import math
import os
import sys

from engine.training.schedules import is_improvement, monitor_mode

__all__ = ["Callback", "ModelCheckpoint", "EarlyStopping", "CSVLogger", "TensorBoard",
           "ProgressBar"]


class Callback:
    """Base class; every hook does nothing. ``monitors`` lists the log keys a callback reads."""

    trainer = None
    monitors = ()

    def on_train_begin(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs):
        pass

    def on_epoch_commit(self, epoch, logs):
        pass

    def on_train_end(self, logs=None):
        pass

    def get_state(self):
        return {}

    def set_state(self, state):
        pass

    def get_arrays(self):
        return {}

    def set_arrays(self, arrays):
        pass


class _Monitor:
    """The best value of one log key so far, under a mode and a minimum improvement."""

    def __init__(self, monitor, mode, min_delta):
        self.monitor, self.mode, self.min_delta = monitor, monitor_mode(monitor, mode), min_delta
        self.best = None

    def improved(self, logs):
        value = logs.get(self.monitor)
        if value is None or not math.isfinite(value):
            return False
        if is_improvement(value, self.best, self.mode, self.min_delta):
            self.best = float(value)
            return True
        return False


class ModelCheckpoint(Callback):
    """Write a resumable checkpoint (HDF5, atomic: a failed write keeps the previous file).

    Args:
        filepath: destination; may hold ``{epoch}`` (1-based) and log keys, e.g.
            ``"ckpt/epoch_{epoch:03d}.h5"`` or ``"best_{val_accuracy:.3f}.h5"``.
        monitor, mode: with ``save_best_only``, the log key to watch and "min"/"max"/"auto".
        save_best_only: write only when ``monitor`` improves on the best value so far.
        every_n_epochs: otherwise, write after every n-th epoch.
    """

    def __init__(self, filepath, *, monitor="val_loss", mode="auto", save_best_only=False,
                 every_n_epochs=1):
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or \
                every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int. Received: "
                             f"every_n_epochs={every_n_epochs!r}.")
        self.filepath, self.save_best_only = os.fspath(filepath), save_best_only
        self.every_n_epochs = every_n_epochs
        self._monitor = _Monitor(monitor, mode, 0.0)
        self.monitors = (monitor,) if save_best_only else ()
        self.last_saved, self._due = None, False

    def on_epoch_end(self, epoch, logs):
        if self.save_best_only:
            self._due = self._monitor.improved(logs)
        else:
            self._due = (epoch + 1) % self.every_n_epochs == 0

    def on_epoch_commit(self, epoch, logs):
        if self._due:
            self.last_saved = self.filepath.format(epoch=epoch + 1, **logs)
            self.trainer.save_checkpoint(self.last_saved)

    def get_state(self):
        return {"best": self._monitor.best, "last_saved": self.last_saved}

    def set_state(self, state):
        self._monitor.best, self.last_saved = state["best"], state["last_saved"]


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    Args:
        monitor, mode: log key and "min"/"max"/"auto" (max for accuracy-like names).
        patience: epochs without improvement before stopping.
        min_delta: smallest change that counts as an improvement.
        restore_best_weights: at the end of training (stopped early or not), make the state of the
            best epoch the result. The best state is kept in memory and in checkpoints.
    """

    def __init__(self, *, monitor="val_loss", patience=10, min_delta=0.0, mode="auto",
                 restore_best_weights=False):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0. Received: patience={patience!r}.")
        self.patience, self.restore_best_weights = patience, restore_best_weights
        self._monitor = _Monitor(monitor, mode, abs(min_delta))
        self.monitors = (monitor,)
        self.wait, self.best_epoch, self.stopped_epoch, self.best_state = 0, None, None, None

    def on_epoch_end(self, epoch, logs):
        if self._monitor.improved(logs):
            self.wait, self.best_epoch = 0, epoch
            if self.restore_best_weights:
                self.best_state = self.trainer.state.copy()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.trainer.stop_training = True

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self.best_state is not None:
            self.trainer.state = self.best_state

    def get_state(self):
        return {"best": self._monitor.best, "wait": self.wait, "best_epoch": self.best_epoch}

    def set_state(self, state):
        self._monitor.best, self.wait, self.best_epoch = state["best"], state["wait"], \
            state["best_epoch"]

    def get_arrays(self):
        return {} if self.best_state is None else {"best_state": self.best_state.buffer}

    def set_arrays(self, arrays):
        if "best_state" in arrays:
            from engine.core.state import NetworkState
            self.best_state = NetworkState.from_buffer(self.trainer.state.layout,
                                                       arrays["best_state"].astype("float32"))


class CSVLogger(Callback):
    """One row per epoch (``epoch`` 1-based, then every log key) in a CSV file.

    A resumed run rewrites the rows of the epochs it restored and appends the new ones, so the file
    never holds an epoch twice even if the previous run died between a row and its checkpoint.
    """

    def __init__(self, filename):
        self.filename = os.fspath(filename)
        self._keys = None

    def on_train_begin(self, logs=None):
        folder = os.path.dirname(os.path.abspath(self.filename))
        os.makedirs(folder, exist_ok=True)
        history = self.trainer.history
        self._keys = None
        if history.epoch:
            self._write_header(list(history.history))
            for index, epoch in enumerate(history.epoch):
                self._append(epoch, {key: values[index] for key, values in history.history.items()})

    def on_epoch_end(self, epoch, logs):
        if self._keys is None:
            self._write_header(list(logs))
        self._append(epoch + 1, logs)

    def _write_header(self, keys):
        self._keys = keys
        with open(self.filename, "w", newline="") as f:
            csv.writer(f).writerow(["epoch"] + keys)

    def _append(self, epoch, logs):
        with open(self.filename, "a", newline="") as f:
            csv.writer(f).writerow([epoch] + [_format(logs.get(key, "")) for key in self._keys])


def _format(value):
    return repr(value) if isinstance(value, float) else value


class TensorBoard(Callback):
    """Write every numeric log value as a TensorBoard scalar per epoch (``tensorboard --logdir DIR``).

    The event files come from ``tensorboardX``'s ``SummaryWriter``, which needs neither TensorFlow
    nor the ``tensorboard`` package. Each training run (and each resume) adds one event file to
    ``log_dir``, flushed at every epoch end, so an interrupted run keeps what it logged.

    Args:
        log_dir: folder of the event files (created if missing).
    Raises:
        ImportError: saying how to install tensorboardX when it is missing.
    """

    def __init__(self, log_dir):
        _summary_writer_class()  # fail now, before training starts, if tensorboardX is missing
        self.log_dir, self._writer = os.fspath(log_dir), None

    def on_train_begin(self, logs=None):
        os.makedirs(self.log_dir, exist_ok=True)
        # tensorboardX names files by the second: the suffix keeps two runs in one second apart.
        self._writer = _summary_writer_class()(
            logdir=self.log_dir, flush_secs=3600,
            filename_suffix=f".{os.getpid()}.{next(_EVENT_FILES)}")

    def on_epoch_end(self, epoch, logs):
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, float(value), global_step=epoch + 1)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


_EVENT_FILES = itertools.count()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported with torch hidden when torch is not loaded yet.

    tensorboardX's writer module imports torch whenever it is installed (only to accept torch
    tensors); that costs about a second and hundreds of MB in the training process, for scalars
    that are plain floats here. So the import sees torch as absent unless the user has it loaded.
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes "import torch" raise ImportError
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ImportError("the TensorBoard callback needs the 'tensorboardX' package, which is not "
                          "installed. Install it with: pip install tensorboardX (or the engine's "
                          "'tensorboard' extra).") from None
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class ProgressBar(Callback):
    """A tqdm bar over epochs: loss, validation accuracy, learning rate, samples/s and ETA."""

    def __init__(self, file=None):
        self.file, self._bar = file, None

    def on_train_begin(self, logs=None):
        from tqdm import tqdm
        trainer = self.trainer
        self._bar = tqdm(total=trainer.epochs, initial=trainer.initial_epoch, unit="epoch",
                         file=self.file or sys.stderr, dynamic_ncols=True, desc="train")

    def on_epoch_end(self, epoch, logs):
        shown = {"loss": "loss", "val_loss": "val_loss", "val_accuracy": "val_acc",
                 "learning_rate": "lr", "samples_per_s": "samples/s"}
        postfix = {}
        for key, label in shown.items():
            if key in logs:
                value = logs[key]
                postfix[label] = f"{value:,.0f}" if key == "samples_per_s" else f"{value:.4g}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def on_train_end(self, logs=None):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
