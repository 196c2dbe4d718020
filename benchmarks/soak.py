"""Soak: thousands of steps of a tiny model while worker processes are SIGKILLed at random moments.

A killer thread (asleep between kills, so it costs no core) sends SIGKILL to a random live worker
every ``--kill-every-s`` seconds, wherever that worker is in its step. The engine must replace it
and recompute the step, so the final state must be *bitwise* the state of the same run without
kills (measured first, in the same process). Reported: steps/s of both runs, restarts, RSS of the
owner and the workers, the owner's open file descriptors and /dev/shm segment count at the start
(after warm-up) and at the end. Targets: no growth, zero leaks, every fault survived.

    .venv/bin/python benchmarks/soak.py [--quick] [--steps 20000] [--kill-every-s 0.5]
Headline: ``soak steps_per_s=... restarts=... identical=true rss_growth_mb=... leaks=0``
"""
import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import leftovers, log, parse_args, write_results

import os
import random
import signal
import threading
import time

import numpy as np
import psutil

from engine import ParallelBatchProcessor
from engine.parallel.shm import blocks_of
from models import MLP

STEPS_PER_EPOCH = 100
BATCH = 64


def _data():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, size=(3, 12))
    labels = rng.integers(0, 3, size=STEPS_PER_EPOCH * BATCH)
    return (centers[labels] + rng.normal(size=(len(labels), 12))).astype(np.float32), labels


class Killer(threading.Thread):
    """SIGKILLs a random worker of ``processor`` every ``interval_s`` seconds until stopped."""

    def __init__(self, processor, interval_s, seed):
        super().__init__(daemon=True)
        self.processor, self.interval_s = processor, interval_s
        self.random, self.stopped, self.kills = random.Random(seed), threading.Event(), 0

    def run(self):
        while not self.stopped.wait(self.interval_s * self.random.uniform(0.5, 1.5)):
            pids = self.processor.worker_pids
            if pids:
                try:
                    os.kill(self.random.choice(pids), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass  # already being replaced


def _snapshot(processor):
    owner = psutil.Process()
    workers = [psutil.Process(pid) for pid in processor.worker_pids]
    return dict(owner_rss_mb=round(owner.memory_info().rss / 2**20, 3),
                worker_rss_mb=[w.memory_info().rss / 2**20 for w in workers],
                open_fds=owner.num_fds(), shm_segments=len(blocks_of(os.getpid())),
                threads=owner.num_threads())


def soak(x, y, epochs, kill_every_s):
    model = MLP(sizes=(12, 32, 3))
    state = model.init_state(0)
    restarts, reasons, killer = 0, set(), None
    with ParallelBatchProcessor(model, num_processes=2, batch_size=BATCH, optimizer="adam",
                                seed=1, max_restarts=10_000) as processor:
        state, _ = processor.run_parallel(x, y, state, {"learning_rate": 1e-3})  # warm-up epoch
        start = _snapshot(processor)
        if kill_every_s:
            killer = Killer(processor, kill_every_s, seed=2)
            killer.start()
        began = time.perf_counter()
        for epoch in range(1, epochs):
            state, results = processor.run_parallel(x, y, state, {"learning_rate": 1e-3})
            restarts += len(results["restarts"])  # counted, not kept: the soak must not grow
            reasons.update(record["reason"] for record in results["restarts"])
            if epoch % max(1, epochs // 10) == 0:
                log(f"  epoch {epoch}/{epochs - 1}: loss {results['mean_loss']:.4f}, "
                    f"{restarts} restarts so far")
        elapsed = time.perf_counter() - began
        if killer:
            killer.stopped.set()
            killer.join()
        end = _snapshot(processor)
    steps = (epochs - 1) * STEPS_PER_EPOCH
    return state, dict(steps=steps, seconds=elapsed, steps_per_s=steps / elapsed, start=start,
                       end=end, restarts=restarts, kills=killer.kills if killer else 0,
                       restart_reasons=sorted(reasons))


def main():
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--steps", type=int, default=20_000),
        p.add_argument("--kill-every-s", type=float, default=0.5)))
    steps = 2_000 if args.quick else args.steps
    kill_every_s = 0.2 if args.quick else args.kill_every_s
    epochs = 1 + max(1, steps // STEPS_PER_EPOCH)
    x, y = _data()
    log(f"reference run: {steps} steps of MLP(12, 32, 3), batch {BATCH}, 2 workers, no faults")
    reference, clean = soak(x, y, epochs, kill_every_s=0)
    log(f"  {clean['steps_per_s']:.0f} steps/s")
    log(f"soak run: the same steps, a worker SIGKILLed every ~{kill_every_s} s")
    state, faulty = soak(x, y, epochs, kill_every_s=kill_every_s)
    identical = bool(np.array_equal(state.buffer, reference.buffer))
    left = leftovers()
    leaks = len(left["our_shm_blocks"]) + len(left["live_children"])
    growth = faulty["end"]["owner_rss_mb"] - faulty["start"]["owner_rss_mb"]
    log(f"  {faulty['steps_per_s']:.0f} steps/s, {faulty['kills']} kills, {faulty['restarts']} "
        f"restarts (a kill after the last step goes unnoticed), final state identical to the "
        f"reference: {identical}")
    log(f"  owner RSS {faulty['start']['owner_rss_mb']:.1f} -> {faulty['end']['owner_rss_mb']:.1f}"
        f" MB; workers {faulty['end']['worker_rss_mb']} MB; fds {faulty['start']['open_fds']} -> "
        f"{faulty['end']['open_fds']}; /dev/shm segments {faulty['start']['shm_segments']} -> "
        f"{faulty['end']['shm_segments']}; after close: {left}")
    path = write_results("soak", args, dict(reference=clean, soak=faulty, identical=identical,
                                            leftovers_after_close=left))
    log(f"results written to {path}")
    print(f"soak steps_per_s={faulty['steps_per_s']:.0f} restarts={faulty['restarts']} "
          f"identical={str(identical).lower()} rss_growth_mb={growth:.2f} leaks={leaks}")


if __name__ == "__main__":
    main()
