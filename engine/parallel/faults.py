"""Test-only fault injection: make worker k die, hang or raise at step s.

Set ``ENGINE_TEST_FAULTS`` before the processor starts its workers, as ``;``-separated entries
``KIND@WORKER:STEP[:OP]``:

* KIND: ``kill`` (SIGKILL itself), ``segv`` (a real segmentation fault in native code), ``exit``
  (exit code 7 without cleanup), ``hang`` (sleep forever), ``raise`` (a Python exception),
  ``stop_asleep`` (SIGSTOP itself at the barrier that follows OP, once that barrier has passed,
  still flagged asleep there: as if stopped from outside while it slept. If the barrier passed
  within the spin, it is flagged as a sleeper first, so the hang does not depend on timing).
* OP: when in the step it strikes: ``compute`` (default), ``reduce``, ``update``, ``local_step``,
  ``average``, ``evaluate``, or ``reduce_mid`` / ``update_mid`` (halfway through that worker's
  slice, so shared memory is left half written). Without a clip norm the mean is formed inside
  the update (``_reduce_and_update_slice``): ``reduce`` and ``update`` then strike together before
  it, ``reduce_mid`` and ``update_mid`` with half the slice updated.
  For ``stop_asleep``: ``compute``, ``update``, ``reduce`` (waited on only with a clip norm) or
  ``average`` (states mode), naming the barriers COMPUTED, UPDATED, REDUCED and AVERAGE_OUT.
* STEP: the optimizer's global step (0-based); for ``evaluate``, the batch index in the pass.

Only the first incarnation of a worker carries its faults, so a replacement runs cleanly. The
production loop never checks for faults: a worker that has some runs a subclass of its core
(:func:`fault_injecting`) whose overrides strike and then call the real methods. Example:
``ENGINE_TEST_FAULTS="kill@1:3;hang@0:5:reduce_mid"``.
"""
import ctypes
import os
import signal
import time
from dataclasses import dataclass

from engine.core.kernels import weighted_mean_into
from engine.parallel import workspace as ws

KINDS = ("kill", "segv", "exit", "hang", "raise", "stop_asleep")
OPS = ("compute", "reduce", "update", "local_step", "average", "evaluate", "reduce_mid",
       "update_mid")
# stop_asleep: the barrier a worker waits at right after each op that has one.
BARRIER_AFTER = {"compute": ws.COMPUTED, "reduce": ws.REDUCED, "update": ws.UPDATED,
                 "average": ws.AVERAGE_OUT}


@dataclass(frozen=True)
class Fault:
    kind: str
    worker: int
    step: int
    op: str = "compute"


def parse_faults(text):
    faults = []
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        try:
            kind, where = entry.split("@")
            fields = where.split(":")
            fault = Fault(kind, int(fields[0]), int(fields[1]), *(fields[2:3] or []))
        except (ValueError, TypeError, IndexError):
            raise ValueError(f"ENGINE_TEST_FAULTS entry {entry!r} is not KIND@WORKER:STEP[:OP].") \
                from None
        if fault.kind not in KINDS or fault.op not in OPS:
            raise ValueError(f"ENGINE_TEST_FAULTS entry {entry!r}: kind must be one of {KINDS} and "
                             f"op one of {OPS}.")
        if fault.kind == "stop_asleep" and fault.op not in BARRIER_AFTER:
            raise ValueError(f"ENGINE_TEST_FAULTS entry {entry!r}: stop_asleep strikes at the "
                             f"barrier after an op, so op must be one of {tuple(BARRIER_AFTER)}.")
        faults.append(fault)
    return faults


def strike(faults, op_name, step):
    """Carry out a fault planned for this op and step, if any."""
    for fault in faults:
        if fault.op == op_name and fault.step == step:
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault.kind == "segv":
                ctypes.string_at(0)  # dereferences NULL: a genuine SIGSEGV
            elif fault.kind == "exit":
                os._exit(7)
            elif fault.kind == "hang":
                while True:
                    time.sleep(3600)
            elif fault.kind == "raise":
                raise RuntimeError(f"injected fault at step {step} during {op_name}")


def stops_asleep(faults, kind, step):
    """Whether a ``stop_asleep`` fault is planned at barrier ``kind`` in this step."""
    return any(fault.kind == "stop_asleep" and fault.step == step and
               BARRIER_AFTER[fault.op] == kind for fault in faults)


def fault_injecting(core_class, faults):
    """A subclass of the worker core that strikes ``faults`` at their planned points."""

    class FaultInjectingCore(core_class):
        _stop_when_awake = False

        def _step(self):
            return int(self.results[ws.CURRENT_STEP])

        # stop_asleep: the worker stops with WAITING still set (and WAIT_KIND/WAIT_ROUND/WAIT_ONLY
        # naming the barrier, written by the real _wait) although the barrier has passed. Only
        # hang detection that checks the arrival counters can tell it from a patient waiter.
        def _wait(self, kind, round_number, only=None):
            self._stop_when_awake = stops_asleep(faults, kind, self._step())
            super()._wait(kind, round_number, only)
            if self._stop_when_awake:  # passed within the spin, no sleep: flag it as a sleeper
                self._stop_flagged_asleep()
                self._awake()

        def _awake(self):
            if self._stop_when_awake:  # woke from a real sleep: stop before clearing the flag
                self._stop_flagged_asleep()
            super()._awake()

        def _stop_flagged_asleep(self):
            self._stop_when_awake = False
            self.results[ws.WAITING] = 1.0
            os.kill(os.getpid(), signal.SIGSTOP)  # a SIGCONT would resume it past the barrier

        def _compute(self, step, start, stop, record):
            strike(faults, "compute", step)
            super()._compute(step, start, stop, record)

        def _reduce_slice(self, coefficients, record):
            strike(faults, "reduce", self._step())
            work = self.work
            if work.averaged is not work.reduced:
                return super()._reduce_slice(coefficients, record)
            start, stop = self.weight_slice
            middle = (start + stop) // 2  # split to die with the slice half written
            squares = weighted_mean_into(work.reduced, work.slots, coefficients, start, middle,
                                         True)
            strike(faults, "reduce_mid", self._step())
            squares += weighted_mean_into(work.reduced, work.slots, coefficients, middle, stop,
                                          True)
            start, stop = self.theta_slice
            weighted_mean_into(work.reduced, work.slots, coefficients, start, stop, False)
            return squares

        def _first_half(self, update):
            """Run ``update()`` on the first half of this worker's slice (in the compact
            numbering of the trainable values: frozen weights are skipped, theta left out), so
            a fault that strikes next leaves the new version half written."""
            pieces, theta = self.weight_pieces, self.theta_pieces
            start, stop = self.weight_slice
            middle = (start + stop) // 2
            self.weight_pieces = [(low, low + min(high - low, middle - compact), compact)
                                  for low, high, compact in pieces if compact < middle]
            self.theta_pieces = []
            try:
                return update()
            finally:
                self.weight_pieces, self.theta_pieces = pieces, theta

        def _update_slice(self, step, learning_rate, scale):
            strike(faults, "update", step)
            update = super()._update_slice
            non_finite = self._first_half(lambda: update(step, learning_rate, scale))
            strike(faults, "update_mid", step)
            return non_finite + update(step, learning_rate, scale)

        def _reduce_and_update_slice(self, step, learning_rate, coefficients):
            # The mean formed inside the update (no clipping): both ops strike before anything
            # is written and again with the first half of the slice updated.
            strike(faults, "reduce", step)
            strike(faults, "update", step)
            update = super()._reduce_and_update_slice
            _, half_non_finite = self._first_half(lambda: update(step, learning_rate,
                                                                 coefficients))
            strike(faults, "reduce_mid", step)
            strike(faults, "update_mid", step)
            squares, non_finite = update(step, learning_rate, coefficients)
            return squares, non_finite + half_non_finite

        def _local_step(self, step, start, stop, record):
            strike(faults, "local_step", step)
            return super()._local_step(step, start, stop, record)

        def _average_slice(self, out, coefficients, start, stop):
            strike(faults, "average", self._step())
            super()._average_slice(out, coefficients, start, stop)

        def _evaluate_step(self, k, state, start, stop, record):
            strike(faults, "evaluate", k)
            super()._evaluate_step(k, state, start, stop, record)

    return FaultInjectingCore
