"""Resumable checkpoints of a Trainer: what it saves besides the weights, and how a resume puts
it back (processor state, epoch, history, phase, schedule and callback states, shuffle stream).

``Trainer`` inherits these methods from ``ResumeMixin``: they read and write most of the run's
state (processor, phase plan, schedules, callbacks, standardizer, history, RNG stream), so they
stay methods rather than functions of a dozen arguments. The file layout is
engine.training.checkpoint's; this module decides what goes into it.
"""
import warnings

from engine.training.checkpoint import check_resumable, save_checkpoint
from engine.training.history import History
from engine.training.phases import phase_index, plan_to_json
from engine.parallel.system import usable_cores


class ResumeMixin:
    """``save_checkpoint`` and resume for ``Trainer`` (engine.training.trainer), which sets every
    attribute used here during ``fit``."""

    def save_checkpoint(self, path):
        """Write a resumable checkpoint of the current epoch (atomic; see engine.training.checkpoint).

        With an output_dir, checkpoints/last.h5 is written after every epoch: Ctrl-C or SIGTERM
        (SystemExit while workers run) leaves the last completed epoch there for ``resume``."""
        arrays = dict(self.standardizer.arrays()) if self.standardizer else {}
        states = {}
        for key, callback in self._callback_keys.items():
            states[key] = callback.get_state()
            arrays.update({f"{key}/{name}": a for name, a in callback.get_arrays().items()})
        phase = phase_index(self._plan, self._epochs_done - 1) if self._epochs_done else 0
        schedule = self._schedules[phase]
        trainer = {"epoch": self._epochs_done, "history": self.history.to_dict(),
                   "phase": phase + 1, "phases": plan_to_json(self._plan),
                   "schedule": {"type": type(schedule).__name__, "state": schedule.get_state()},
                   "callbacks": states, "stream_rng": self._stream_rng.bit_generator.state,
                   "signature": self._signature()}
        save_checkpoint(path, self.state, metadata=self._metadata(), arrays=arrays,
                        training_state=self._processor.training_state(), trainer=trainer)

    def _restore(self, checkpoint, callbacks, path):
        self.state.check_matches(checkpoint.state, f"the state in {path!r}")
        check_resumable(checkpoint, path)
        self.state = checkpoint.state
        self._processor.load_training_state(checkpoint.training_state)
        saved = checkpoint.trainer
        self.initial_epoch = self._epochs_done = int(saved["epoch"])
        self.history = History.from_dict(saved.get("history", {}))
        differences = {k: (v, saved.get("signature", {}).get(k)) for k, v in
                       self._signature().items() if saved.get("signature", {}).get(k) != v}
        if differences:
            warnings.warn(f"resuming {path!r} with different settings {differences} (now, "
                          "saved): the run will not match an uninterrupted one.", RuntimeWarning,
                          stacklevel=3)
        schedule = saved.get("schedule", {})
        phase = self._schedules[min(len(self._schedules), max(1, int(saved.get("phase", 1)))) - 1]
        if schedule.get("type") == type(phase).__name__:  # the schedule of the saved epoch's phase
            phase.set_state(schedule.get("state", {}))
        self._stream_rng.bit_generator.state = saved["stream_rng"]
        for key, callback in self._callback_keys.items():
            if key in saved.get("callbacks", {}):
                callback.set_state(saved["callbacks"][key])
                prefix = key + "/"
                callback.set_arrays({name[len(prefix):]: array for name, array in
                                     checkpoint.arrays.items() if name.startswith(prefix)})

    def _signature(self):
        options = self.processor_options
        return {"batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "num_processes": options["num_processes"] or usable_cores(),
                "sync": options["sync"], "update_interval": options["update_interval"],
                "optimizer": repr(self._processor.optimizer), "seed": self.seed,
                "clip_norm": self.clip_norm, "loss": None if self.loss is None else
                self.loss.get_config(),
                "phases": None if self.phases is None else plan_to_json(self._plan),
                "freeze": list(self._plan[0].freeze) or None if self.phases is None else None}

    def _metadata(self):
        metadata = dict(self.metadata)
        metadata.setdefault("model", {"class": f"{type(self.model).__module__}."
                                               f"{type(self.model).__name__}",
                                      "repr": repr(self.model)})
        metadata["loss"] = None if self.loss is None else self.loss.get_config()
        metadata["num_classes"] = int(self.model.num_outputs)
        metadata["epoch"] = self._epochs_done
        done = self._epochs_done - 1
        metadata["phase"] = phase_index(self._plan, done) + 1 if done >= 0 else 0
        metadata["freeze"] = list(self._plan[max(0, metadata["phase"] - 1)].freeze)
        return metadata
