"""A run folder belongs to one run: an exclusive lock for the run's whole life, and a folder that
already holds another run is refused unless overwriting is asked for or it is the run resumed.

The lock is ``flock`` on ``.engine-run.lock`` in the folder: the kernel drops it when the holder
exits however it exits (SIGKILL included), so a stale lock never blocks the next run. The lock
file itself stays (removing it would let two runs lock two different files of one name). Holds are
counted per process, so the CLI can take the folder before it writes ``config.json`` and the
trainer inside it takes it again without conflict.
"""
import fcntl
import os
import re
import shutil

__all__ = ["RunFolderError", "hold_run_folder", "check_run_folder", "run_folder_of", "holds_run"]

LOCK_NAME = ".engine-run.lock"
# What a run writes (trainer, CLI and report); --overwrite removes exactly these, nothing else.
RUN_FILES = ("config.json", "history.csv", "model.h5", "model.keras", "results.json",
             "classification_report.txt", "confusion_matrix.png",
             "confusion_matrix_normalized.png", "per_class_accuracy.png", "training_curves.png",
             "checkpoints", "tensorboard", "evaluation")
_MARKS = ("config.json", "history.csv", "model.h5", "results.json", "checkpoints")
_PARTIAL = re.compile(r".+\.(?:partial|tmp)-\d+$")  # checkpoint and state writes cut short
_held = {}  # real path -> [lock file descriptor, number of holds]


class RunFolderError(ValueError):
    """The folder is in use by another run, or holds a run that may not be replaced."""


def run_folder_of(checkpoint_path):
    """The run folder of a checkpoint, from the checkpoint's own location (``run/checkpoints/x.h5``
    or ``run/model.h5`` -> ``run``), never from anything stored inside the file."""
    folder = os.path.dirname(os.path.abspath(os.fspath(checkpoint_path)))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def holds_run(folder):
    """True if ``folder`` already holds the files of a run."""
    return any(os.path.lexists(os.path.join(folder, name)) for name in _MARKS)


def check_run_folder(folder, *, overwrite=False, resuming=False):
    """Raise RunFolderError now if :class:`hold_run_folder` would refuse ``folder``; changes nothing.

    A fast early answer (before a large data set is read); the hold itself stays authoritative.
    """
    folder = os.path.realpath(os.fspath(folder))
    if folder in _held or not os.path.isdir(folder):
        return
    try:
        descriptor = os.open(os.path.join(folder, LOCK_NAME), os.O_RDONLY)
    except OSError:
        descriptor = None  # no lock file: nobody holds the folder
    if descriptor is not None:
        try:
            _lock_or_refuse(descriptor, folder)
        finally:
            os.close(descriptor)
    if not resuming and not overwrite and holds_run(folder):
        _refuse_previous_run(folder)


def _lock_or_refuse(descriptor, folder):
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "?"
        raise RunFolderError(
            f"{folder} is in use by another run (process {owner}); two runs in one folder would "
            "mix their results. Wait for it to finish, or choose another --output-dir "
            "(output_dir=).") from None


def _refuse_previous_run(folder):
    found = [name for name in _MARKS if os.path.lexists(os.path.join(folder, name))]
    raise RunFolderError(
        f"{folder} already holds a run ({', '.join(found)}). Pass --overwrite (overwrite=True) "
        "to replace it, --resume its checkpoints/last.h5 to continue it, or choose another "
        "--output-dir (output_dir=).")


class hold_run_folder:
    """Context manager: hold ``folder`` exclusively for a run (created if missing).

    Args:
        folder: the run's output folder.
        overwrite: remove a previous run's files (only the files a run writes) instead of refusing.
        resuming: the folder holds the run being resumed; its files are kept.
    Raises:
        RunFolderError: another process holds the folder, or it holds a run and neither
            ``overwrite`` nor ``resuming`` is set.
    """

    def __init__(self, folder, *, overwrite=False, resuming=False):
        self.folder = os.path.realpath(os.fspath(folder))
        self.overwrite, self.resuming = overwrite, resuming

    def __enter__(self):
        held = _held.get(self.folder)
        if held is not None:  # this process holds it already (the CLI around the trainer)
            held[1] += 1
            return self
        os.makedirs(self.folder, exist_ok=True)
        descriptor = os.open(os.path.join(self.folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_or_refuse(descriptor, self.folder)
            self._check_previous_run()
            _remove_partial_files(self.folder)
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(descriptor)  # closing drops the lock
            raise
        _held[self.folder] = [descriptor, 1]
        return self

    def _check_previous_run(self):
        if self.resuming or not holds_run(self.folder):
            return
        if not self.overwrite:
            _refuse_previous_run(self.folder)
        for name in RUN_FILES:
            path = os.path.join(self.folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)

    def __exit__(self, *exc_info):
        held = _held.get(self.folder)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _held[self.folder]
            os.close(held[0])


def _remove_partial_files(folder):
    """Remove ``*.partial-PID`` / ``*.tmp-PID`` files a killed write left (we hold the folder, so
    no other run can be writing them)."""
    for where in (folder, os.path.join(folder, "checkpoints")):
        try:
            names = os.listdir(where)
        except OSError:
            continue
        for name in names:
            if _PARTIAL.match(name):
                try:
                    os.unlink(os.path.join(where, name))
                except OSError:
                    pass
