"""Test-only fault injection: make worker k die, hang or raise at step s.

Set ``ENGINE_TEST_FAULTS`` before the processor starts its workers, as ``;``-separated entries
``KIND@WORKER:STEP[:OP]``:

* KIND: ``kill`` (SIGKILL itself), ``segv`` (a real segmentation fault in native code), ``exit``
  (exit code 7 without cleanup), ``hang`` (sleep forever), ``raise`` (a Python exception).
* OP: when in the step it strikes: ``compute`` (default), ``reduce``, ``update``, ``local_step``,
  ``average``, ``evaluate``, or ``reduce_mid`` / ``update_mid`` (halfway through that worker's
  slice, so shared memory is left half written).

Only the first incarnation of a worker carries its faults, so a replacement runs cleanly. Example:
``ENGINE_TEST_FAULTS="kill@1:3;hang@0:5:reduce_mid"``.
"""
import ctypes
import os
import signal
import time
from dataclasses import dataclass

KINDS = ("kill", "segv", "exit", "hang", "raise")
OPS = ("compute", "reduce", "update", "reduce_update", "local_step", "average", "evaluate",
       "reduce_mid", "update_mid")


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
