"""A Chrome trace of every step: per worker compute, wait, reduce and update spans, and the owner.

Open the file in Perfetto (ui.perfetto.dev) or chrome://tracing. Each worker is a thread of the
"workers" process; the owner's work (planning a pass, sleeping while workers run it, collecting
results) is a thread of its own. Timestamps are ``time.perf_counter()`` (CLOCK_MONOTONIC, one
clock for every process on the machine), in microseconds from the first pass.

Size is bounded: the first ``full_steps`` steps are all recorded; after that one step in
``sample_every`` (the trace's ``metadata`` says which), so a long run stays a few MB.
"""
import json
import os

import numpy as np

from engine.parallel import workspace as ws

_WORKERS_PID, _OWNER_PID = 1, 0


class Timeline:
    """Collects spans pass by pass and writes the trace on :meth:`write` (atomically).

    Args:
        path: where the JSON trace goes. full_steps: steps recorded in full before sampling.
        sample_every: after that, one step in this many.
    """

    def __init__(self, path, *, full_steps=2000, sample_every=50):
        self.path, self.full_steps, self.sample_every = os.fspath(path), full_steps, sample_every
        self.events, self.steps_seen, self.steps_recorded = [], 0, 0
        self._origin = None
        self._named = set()

    def _us(self, seconds):
        return (seconds - self._origin) * 1e6

    def _name_thread(self, pid, tid, name):
        if (pid, tid) not in self._named:
            self._named.add((pid, tid))
            self.events.append(dict(ph="M", name="thread_name", pid=pid, tid=tid,
                                    args=dict(name=name)))

    def _span(self, name, pid, tid, begin, end, **args):
        if end > begin:
            self.events.append(dict(ph="X", name=name, pid=pid, tid=tid, ts=self._us(begin),
                                    dur=(end - begin) * 1e6, args=args))

    def add_pass(self, records, kind, sync, base_step, owner_began, owner_ran, owner_ended):
        """Spans of one pass from the workers' records (steps x workers x fields)."""
        if self._origin is None:
            self._origin = owner_began
            self.events.append(dict(ph="M", name="process_name", pid=_WORKERS_PID,
                                    args=dict(name="workers")))
            self.events.append(dict(ph="M", name="process_name", pid=_OWNER_PID,
                                    args=dict(name="owner")))
        self._name_thread(_OWNER_PID, 0, "owner")
        self._span("plan pass", _OWNER_PID, 0, owner_began, owner_ran)
        self._span("sleep (workers run the pass)", _OWNER_PID, 0, owner_ran, owner_ended,
                   steps=len(records), first_step=base_step)
        gradients = kind == ws.TRAIN and sync == "gradients"
        for k in range(len(records)):
            self.steps_seen += 1
            if self.steps_seen > self.full_steps and self.steps_seen % self.sample_every:
                continue
            self.steps_recorded += 1
            step = base_step + k
            for worker, fields in enumerate(records[k].tolist()):
                self._name_thread(_WORKERS_PID, worker, f"worker {worker}")
                started, compute_s = fields[ws.R_STARTED], fields[ws.R_COMPUTE_S]
                if started == 0.0:
                    continue  # a worker with nothing to do in this step
                label = "compute" if kind == ws.TRAIN else "evaluate"
                self._span(label, _WORKERS_PID, worker, started, started + compute_s, step=step,
                           examples=int(fields[ws.R_COUNT]), loss=fields[ws.R_LOSS])
                if not gradients:
                    continue
                computed, reduced = fields[ws.R_COMPUTED], fields[ws.R_REDUCED]
                updated, ended = fields[ws.R_UPDATED], fields[ws.R_ENDED]
                self._span("wait", _WORKERS_PID, worker, started + compute_s, computed, step=step)
                self._span("reduce", _WORKERS_PID, worker, computed, reduced, step=step)
                self._span("update", _WORKERS_PID, worker, reduced, updated, step=step)
                self._span("wait", _WORKERS_PID, worker, updated, ended, step=step)

    def write(self):
        """Write the trace (JSON object format) atomically; returns its path."""
        document = dict(traceEvents=self.events, displayTimeUnit="ms",
                        metadata=dict(steps_seen=self.steps_seen,
                                      steps_recorded=self.steps_recorded,
                                      full_steps=self.full_steps, sample_every=self.sample_every,
                                      clock="time.perf_counter (CLOCK_MONOTONIC), microseconds "
                                            "from the first pass"))
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        temporary = f"{self.path}.partial-{os.getpid()}"
        with open(temporary, "w") as f:
            json.dump(document, f, default=_plain)
        os.replace(temporary, self.path)
        return self.path


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to a trace")
