"""The three measurements of ``engine bench``, each returning a JSON-ready record.

Every comparison is made within one run, configurations taking turns round by round (each round
starting with a different one), so a drift of the machine (memory bandwidth, a neighbour's load)
hits them alike; the first round of each is a discarded warm-up. Only the public processor API is
used: ``process_batch`` and ``run_parallel`` and the timings their results report.
"""
import time

import numpy as np

from engine.cli.benchmarking.ceiling import IndependentRunner
from engine.core.state import NetworkState
from engine.parallel.processor import ParallelBatchProcessor
from engine.parallel.system import usable_cores

__all__ = ["measure_sync", "measure_scaling", "measure_step", "ConstantGradientModel",
           "SYNC_SIZES"]

SYNC_SIZES = (100_000, 1_000_000, 4_000_000, 16_000_000)


class ConstantGradientModel:
    """P weights whose gradient costs nothing: a step's time is then its synchronisation.

    Module-level and holding only ``num_weights``, so it pickles for every start method.
    """

    input_shape = (1,)
    num_outputs = 2

    def __init__(self, num_weights):
        self.num_weights, self._grads = int(num_weights), None

    def __getstate__(self):
        return {"num_weights": self.num_weights, "_grads": None}

    def init_state(self, seed=0):
        return NetworkState({"w": np.zeros(self.num_weights, np.float32)})

    def loss_and_grads(self, state, x, y, *, rng=None):
        if self._grads is None:  # built once per process, outside the timed steps
            self._grads = {"w": np.full(self.num_weights, 1e-6, np.float32)}
        return 0.6931, self._grads

    def predict(self, state, x):
        return np.full((len(x), 2), 0.5, np.float32)

    def loss(self, state, x, y):
        return 0.6931


def _rotated(items, turn):
    items = list(items)
    turn %= len(items)
    return items[turn:] + items[:turn]


def _median(values):
    return float(np.median(values)) if len(values) else float("nan")


def measure_sync(*, sizes=SYNC_SIZES, num_processes=None, rounds=10, repeats=5, log=print):
    """Per P: the step's ``sync_s`` (averaging + SGD update) against the memory-copy floor.

    The floor copies the bytes the sync moves: averaging reads N*P and writes P float32, the SGD
    update reads weights and gradient and writes the weights (3P), so a copy of (N+4)/2 * P
    values split across N forked processes moves the same bytes.
    Returns ``{"num_processes", "sizes": [records]}``.
    """
    from engine.cli.benchmarking.floor import CopyFloor
    workers = num_processes or usable_cores()
    records = []
    for size in sizes:
        model = ConstantGradientModel(size)
        state = model.init_state()
        x, y = np.zeros((workers, 1), np.float32), np.zeros(workers, np.int64)
        params = {"learning_rate": 1e-3}
        engine, floor = [], []
        with ParallelBatchProcessor(model, num_processes=workers, batch_size=workers,
                                    optimizer="sgd") as processor:
            processor.process_batch(x, y, state, params)  # its workers first: they must not
            with CopyFloor(-(-(workers + 4) * size // 2), workers) as copier:  # hold the pipes
                _alternate(processor, copier, x, y, state, params, rounds, repeats, engine,
                           floor)
        record = {"num_values": size, "num_processes": workers,
                  "traffic_bytes": (workers + 4) * size * 4, "sync_s_median": _median(engine),
                  "sync_s_p90": float(np.percentile(engine, 90)), "floor_s_median": _median(floor),
                  "floor_s_p90": float(np.percentile(floor, 90))}
        record["ratio_to_floor"] = record["sync_s_median"] / record["floor_s_median"]
        records.append(record)
        log(f"P={size:>12,}: sync {record['sync_s_median'] * 1e3:8.3f} ms, floor "
            f"{record['floor_s_median'] * 1e3:8.3f} ms, ratio {record['ratio_to_floor']:.2f}")
    return {"num_processes": workers, "sizes": records}


def _alternate(processor, copier, x, y, state, params, rounds, repeats, engine, floor):
    sides = {"engine": lambda: processor.process_batch(x, y, state, params)[1]["sync_s"],
             "floor": copier.run}
    for turn in range(rounds + 1):
        for side in _rotated(sides, turn):
            seconds = [float(sides[side]()) for _ in range(repeats)]
            if turn:  # round 0 is the warm-up: page faults, first touch, numba
                (engine if side == "engine" else floor).extend(seconds)


def _process_counts(cores):
    return list(range(1, cores + 1))


def measure_scaling(model, examples, labels, *, batch_size, process_counts=None, rounds=5,
                    log=print):
    """Training samples/s at each process count (epochs of ``run_parallel``, Adam, gradients).

    ``1`` runs in this process with BLAS limited to one thread: the single-core baseline of the
    parallel efficiency (rate / (N x single-core rate)). With a largest count N above 1, the host's
    own ceiling takes its turn too: N processes that never exchange anything, each computing its
    shard of every batch and Adam on its share of the values (``ceiling``); the engine at N
    processes cannot beat them, and its share of their rate is what it keeps of what the host
    allows. The configurations take turns round by round; in a round each runs an untimed epoch
    right before its timed one, so what the one before it left behind (caches, sleeping cores)
    is not timed (benchmarks/scaling.py does the same).
    Returns ``{"configurations": [records], "host_ceiling": record or None, "batch_size",
    "examples"}``.
    """
    from threadpoolctl import threadpool_limits
    counts = list(process_counts or _process_counts(usable_cores()))
    largest = max(counts)
    runners = {}
    ceiling = IndependentRunner(f"{largest} independent", largest, model, batch_size, 1e-3) \
        if largest > 1 else None
    ceiling_rates = []

    def epoch(count):
        if count == "ceiling":
            return ceiling.epoch(examples, labels)["seconds"], None
        runner = runners[count]
        limit = threadpool_limits(limits=1) if count == 1 else None
        try:
            began = time.perf_counter()
            runner["state"], results = runner["processor"].run_parallel(
                examples, labels, runner["state"], {"learning_rate": 1e-3})
            return time.perf_counter() - began, results
        finally:
            if limit is not None:
                limit.restore_original_limits()

    try:
        for count in counts:
            runners[count] = {"processor": ParallelBatchProcessor(
                model, num_processes=count, batch_size=batch_size, optimizer="adam", seed=0),
                "state": model.init_state(seed=0), "rates": [], "steps": []}
        configurations = counts + (["ceiling"] if ceiling is not None else [])
        for turn in range(rounds + 1):
            for count in _rotated(configurations, turn):
                if turn:  # untimed: the switch from the configuration before it
                    epoch(count)
                seconds, results = epoch(count)
                if not turn:
                    continue
                if count == "ceiling":
                    ceiling_rates.append(len(examples) / seconds)
                    continue
                runner = runners[count]
                runner["rates"].append(len(examples) / seconds)
                runner["steps"].append({key: results[key].tolist() for key in
                                        ("compute_s", "sync_s", "wait_s", "wall_s")})
            if turn:
                log(f"round {turn}/{rounds}: " + "  ".join(
                    f"{count}p {runners[count]['rates'][-1]:,.0f}/s" for count in counts) +
                    (f"  host ceiling {ceiling_rates[-1]:,.0f}/s" if ceiling_rates else ""))
    finally:
        for runner in runners.values():
            runner["processor"].close()
        if ceiling is not None:
            ceiling.close()
    single = _median(runners[counts[0]]["rates"]) if counts[0] == 1 else float("nan")
    records = []
    for count in counts:
        rate = _median(runners[count]["rates"])
        steps = runners[count]["steps"]
        records.append({"num_processes": count, "samples_per_s_median": rate,
                        "samples_per_s": runners[count]["rates"],
                        "speedup": rate / single, "parallel_efficiency": rate / (count * single),
                        **{f"step_{key}_median": _median(np.concatenate([s[key] for s in steps]))
                           for key in ("compute_s", "sync_s", "wait_s", "wall_s")}})
    host_ceiling = None
    if ceiling_rates:
        rate = _median(ceiling_rates)
        host_ceiling = {"num_processes": largest, "samples_per_s_median": rate,
                        "samples_per_s": ceiling_rates, "speedup": rate / single,
                        "engine_share": records[counts.index(largest)]["samples_per_s_median"] /
                        rate}
    return {"configurations": records, "host_ceiling": host_ceiling, "batch_size": batch_size,
            "examples": len(examples)}


def measure_step(model, examples, labels, *, batch_size, process_counts=None, steps=30,
                 log=print):
    """Where one training step's time goes at each process count: compute, sync, wait, other.

    Each configuration runs ``steps`` timed ``process_batch`` calls (after 3 warm-up steps) on
    consecutive batches; ``other`` is the wall time outside the three reported phases. One
    process runs in this process with one BLAS thread, as in :func:`measure_scaling`.
    Returns ``{"configurations": [records], "batch_size"}``.
    """
    from threadpoolctl import threadpool_limits
    counts = process_counts or sorted({1, usable_cores()})
    series = {count: {"compute_s": [], "sync_s": [], "wait_s": [], "wall_s": []}
              for count in counts}
    processors = {}
    try:
        for count in counts:
            processors[count] = [ParallelBatchProcessor(model, num_processes=count,
                                                        batch_size=batch_size, seed=0),
                                 model.init_state(seed=0)]
        starts = range(0, max(1, len(examples) - batch_size + 1), batch_size)
        for index in range(steps + 3):
            start = list(starts)[index % len(starts)]
            x, y = examples[start:start + batch_size], labels[start:start + batch_size]
            for count in _rotated(counts, index):
                processor, state = processors[count]
                limit = threadpool_limits(limits=1) if count == 1 else None
                try:
                    processors[count][1], results = processor.process_batch(
                        x, y, state, {"learning_rate": 1e-3})
                finally:
                    if limit is not None:
                        limit.restore_original_limits()
                if index >= 3:
                    for key in series[count]:
                        series[count][key].append(float(results[key]))
    finally:
        for processor, _ in processors.values():
            processor.close()
    records = []
    for count in counts:
        medians = {key: _median(values) for key, values in series[count].items()}
        other = max(0.0, medians["wall_s"] - medians["compute_s"] - medians["sync_s"]
                    - medians["wait_s"])
        records.append({"num_processes": count, **{f"{k}_median": v for k, v in medians.items()},
                        "other_s_median": other,
                        "sync_fraction": medians["sync_s"] / medians["wall_s"],
                        "samples_per_s": batch_size / medians["wall_s"]})
        log(f"{count}p: step {medians['wall_s'] * 1e3:.2f} ms = compute "
            f"{medians['compute_s'] * 1e3:.2f} + sync {medians['sync_s'] * 1e3:.2f} + wait "
            f"{medians['wait_s'] * 1e3:.2f} + other {other * 1e3:.2f}")
    return {"configurations": records, "batch_size": batch_size}
