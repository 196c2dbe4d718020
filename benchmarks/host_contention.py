"""How much a training step on one core slows down while the other cores are busy, and with what.

    .venv/bin/python benchmarks/host_contention.py [--quick] [--model NAME] [--batch N]

The engine's efficiency (``vs_peers``'s Z: its rate over cores x one process's one-thread rate)
can only be as high as the host lets every core compute as fast as one core alone. This measures
that, for a native zoo model's training step (``loss_and_grads``, default the reference
``imu_cnn_bilstm`` at the 32-example shard a worker gets on 2 cores; one BLAS thread, freed memory
kept, as a worker runs it) in a process bound to one core, while each other usable core runs:

* ``alone``: nothing (the reference);
* ``twin``: the same step in another process: what data-parallel workers do to each other;
* ``stream``: a memory copy of 64 MiB buffers: memory bandwidth only;
* ``gemm``: a 1024 x 1024 float32 matrix product, one thread: the FMA units, from cache.

The configurations take turns round by round, each round starting with a different one; a
neighbour starts before the measured steps and stops after them. Headline (last line):
``host_contention twin=X stream=Y gemm=Z``: the median step time next to each neighbour over the
``alone`` step time of the same round, median over rounds (1.00: no slowdown; 1.10: 10% slower).
With one usable core there is no other core to load: the ratios are ``nan``.
"""
import _common  # noqa: F401 - first: puts the repository root on sys.path

import os
import time

import multiprocess
import numpy as np

from _common import (CpuLoad, QuietWaiter, log, parse_args, report_cleanup, rotated,
                     warm_native_step, write_results)
from engine import usable_cores
from engine.parallel import signals
from engine.parallel.system import bind_to_cores

NEIGHBOURS = ("twin", "stream", "gemm")
ROUNDS, QUICK_ROUNDS = 6, 2
STEPS, QUICK_STEPS = 12, 2
_QUIET_BUDGET_S = 60.0
_STREAM_BYTES, _GEMM_SIZE = 64 * 2**20, 1024
_OWNER_CHECK_S = 1.0  # how often an idle child checks that its parent is alive


def _prepare(kind, model_name, batch):
    """The neighbour's (or the measured step's) work as a function of no arguments."""
    from engine.parallel.system import keep_freed_memory, limit_threads
    limit = limit_threads(1)
    keep_freed_memory()
    if kind == "stream":
        source = np.ones(_STREAM_BYTES // 4, np.float32)
        target = np.empty_like(source)
        return limit, lambda: np.copyto(target, source)
    if kind == "gemm":
        matrix = np.random.default_rng(0).standard_normal((_GEMM_SIZE, _GEMM_SIZE))
        matrix = matrix.astype(np.float32)
        return limit, lambda: matrix @ matrix
    model, state, x, y = warm_native_step(model_name, batch)
    return limit, lambda: model.loss_and_grads(state, x, y)


def _serve(connection, kind, model_name, batch, core):
    """A child: ``("steps", n)`` times n steps and sends their seconds; ``("run", None)`` runs
    steps until the next message (which it reads) and sends how many; ``None`` ends it. It also
    ends when the parent is gone: later children hold copies of the pipe ends, so a killed
    parent would never give it an end of file."""
    owner = os.getppid()
    if core is not None:  # as an engine worker is: on a core of its own
        bind_to_cores({core})
    limit, work = _prepare(kind, model_name, batch)  # noqa: F841 - the limit lasts while it lives
    connection.send("ready")
    while True:
        while not connection.poll(_OWNER_CHECK_S):
            if os.getppid() != owner:
                return
        message = connection.recv()
        if message is None:
            return
        command, count = message
        if command == "steps":
            seconds = []
            for _ in range(count):
                began = time.perf_counter()
                work()
                seconds.append(time.perf_counter() - began)
            connection.send(seconds)
        else:  # "run": busy until told otherwise, then say how many steps it ran
            done = 0
            while not connection.poll():
                if os.getppid() != owner:
                    return
                work()
                done += 1
            if connection.recv() is None:  # the message that stopped it: maybe the end
                return
            connection.send(done)


class Child:
    """One forked worker of ``_serve`` (forked before this process imports the models)."""

    def __init__(self, kind, model_name, batch, core):
        self.kind = kind
        context = multiprocess.get_context("fork")
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=_serve, daemon=True,
                                       args=(theirs, kind, model_name, batch, core))
        self.process.start()
        theirs.close()

    def ready(self):
        try:
            message = self.connection.recv()
        except EOFError:
            message = None
        if message != "ready":
            self.process.join(timeout=5)  # its exit code, once it is reaped
            raise RuntimeError(f"the {self.kind!r} process exited before it was ready (exit code "
                               f"{self.process.exitcode}); its error is printed above. Check "
                               "--model (a native zoo name) and --batch.")

    def close(self):
        try:
            self.connection.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def measure_round(measured, neighbours, kind, steps):
    """The measured child's step seconds next to ``neighbours[kind]`` (None: alone), and, for
    the twin, the twin's own seconds."""
    if kind is None:
        measured.connection.send(("steps", steps))
        return measured.connection.recv(), None
    others = neighbours[kind]
    if kind == "twin":  # both measure at once, so both are busy for the whole window
        for child in (measured, *others):
            child.connection.send(("steps", steps))
        mine = measured.connection.recv()
        return mine, [child.connection.recv() for child in others]
    for child in others:
        child.connection.send(("run", None))
    time.sleep(0.2)  # the neighbour is up to speed before the first measured step
    measured.connection.send(("steps", steps))
    mine = measured.connection.recv()
    for child in others:
        child.connection.send(("stop", None))  # any message stops a "run"
        child.connection.recv()
    return mine, None


def main():
    def options(parser):
        parser.add_argument("--model", default="imu_cnn_bilstm", help="a native zoo model name")
        parser.add_argument("--batch", type=int, default=32, help="examples per step (32)")
    args = parse_args(__doc__.splitlines()[0], options)
    cores = usable_cores()
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    bind = len(allowed) >= cores
    core = (lambda index: allowed[index]) if bind else (lambda index: None)
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    steps = QUICK_STEPS if args.quick else STEPS
    load = CpuLoad()
    children = []
    held = signals.hold()  # SIGTERM and SIGHUP unwind through the finally below
    try:
        measured = Child("step", args.model, args.batch, core(0))
        children.append(measured)
        neighbours = {}
        if cores > 1:
            for kind in NEIGHBOURS:
                neighbours[kind] = [Child("step" if kind == "twin" else kind, args.model,
                                          args.batch, core(index)) for index in range(1, cores)]
                children += neighbours[kind]
        for child in children:
            child.ready()
        kinds = [None, *neighbours]
        log(f"host_contention: {args.model}, batch {args.batch}, one thread; {cores} usable "
            f"cores, {'each process bound to one' if bind else 'processes not bound'}; "
            f"{rounds} rounds of {steps} steps per configuration")
        quiet = QuietWaiter(0.0 if args.quick else _QUIET_BUDGET_S)
        per_round, twin_seconds = [], []
        for turn in range(rounds):
            others = quiet.wait()
            medians = {}
            for kind in rotated(kinds, turn):
                seconds, twins = measure_round(measured, neighbours, kind, steps)
                medians[kind or "alone"] = float(np.median(seconds))
                if twins:
                    twin_seconds.append([float(np.median(s)) for s in twins])
            per_round.append(dict(step_s=medians, other_processes_cores=others))
            log(f"round {turn + 1}/{rounds}  " + "  ".join(
                f"{kind}: {1e3 * value:.1f} ms" for kind, value in medians.items()))
    finally:
        for child in children:
            child.close()
        if held:
            signals.release()
    ratios = {kind: float(np.median([r["step_s"][kind] / r["step_s"]["alone"]
                                     for r in per_round])) if neighbours else float("nan")
              for kind in NEIGHBOURS}
    alone_ms = 1e3 * float(np.median([r["step_s"]["alone"] for r in per_round]))
    print(f"  {'neighbour':<10} {'step':>10} {'over alone':>11}")
    print(f"  {'alone':<10} {alone_ms:>7.1f} ms {1.0:>11.2f}")
    for kind in NEIGHBOURS:
        if neighbours:
            step_ms = 1e3 * float(np.median([r["step_s"][kind] for r in per_round]))
            print(f"  {kind:<10} {step_ms:>7.1f} ms {ratios[kind]:>11.2f}")
    cleanup, cpu = report_cleanup(load)
    path = write_results("host_contention", args,
                         dict(rounds=per_round, twin_step_s=twin_seconds, ratios=ratios,
                              alone_step_ms=alone_ms),
                         model=args.model, batch=args.batch, steps_per_round=steps,
                         bound_to_cores=bind, cleanup=cleanup, cpu_load=cpu,
                         quiet_wait=quiet.report(), headline=ratios)
    print(f"results: {path}")
    print("host_contention " + " ".join(f"{kind}={ratios[kind]:.2f}" for kind in NEIGHBOURS),
          flush=True)
    if cleanup["our_shm_blocks"] or cleanup["live_children"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
