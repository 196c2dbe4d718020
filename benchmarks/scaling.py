"""Training throughput (samples/s) at num_processes = 1 .. usable cores, for an MLP and the CNN.

    .venv/bin/python benchmarks/scaling.py [--quick]

Workloads: (a) ``MLP(sizes=(784, 1024, 256, 10))`` (1.07M weights), global batch 256, synthetic
data; (b) ``CNN1D()`` (MNIST-1D ConvBase, 5,210 weights), batch 100, on the MNIST-1D training set
generated offline by ``mnist1d``. Each epoch is one ``run_parallel`` call with Adam,
sync="gradients", timed from call to return (shuffling, loading shared memory and the final state
copy included).

Configurations, and why there are two at one process: ``num_processes=1`` runs in this process with
BLAS free to use every core (multithreaded matrix products), while N > 1 processes get one BLAS
thread each. So one process is measured twice:
* "1p x 1 thread" (under ``threadpool_limits(1)``): the single-core rate, the baseline of parallel
  efficiency;
* "1p x BLAS default": what a user gets without the engine (BLAS threads recorded in the JSON).
* "Np independent" (``engine/cli/benchmarking/ceiling.py``): N processes that never exchange
  anything, each computing its shard of every batch and the Adam update of 1/N of the values: the
  host's own ceiling for any data-parallel split (two busy cores against one, and the smaller step),
  which the engine's rate is also given against.
Every configuration keeps its processor (and worker pool) alive for the whole run; after one
discarded warm-up epoch each (numba compilation, page faults), they take turns round by round,
each round starting with a different one, so a change in memory bandwidth hits all alike. In a
round each configuration runs two epochs back to back and only the second is timed: the first
absorbs the switch from the configuration before it (caches and branch predictors holding the
other one's data and code, idle cores asleep, the other's BLAS threads spinning down), which a
user training one configuration epoch after epoch never pays. At the CNN1D's 13-20 ms epochs that
switch cost the two-process configuration a third of its rate (2026-12-07: 220k samples/s timed
right after a switch, 350-375k in epochs run back to back).

Headline (last line): ``scaling mlp_speedup=X.XX cnn_speedup=X.XX``: median samples/s at the largest
process count over median samples/s of "1p x 1 thread". The lines before it give the speedups over
"1p x BLAS default" and the host ceiling (independent processes over "1p x 1 thread"), and
before them a table of issue 8's targets: each figure, its target, the host's ceiling for it
(independent processes over the same baseline) and the verdict, "beyond the host's ceiling" when
even processes that exchange nothing fell short of the target in this run (``_targets.py``).
"""
import _common  # noqa: F401 - first: puts the repository root on sys.path

import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from _common import (QUIET_CORES, CpuLoad, QuietWaiter, format_seconds, log, report_cleanup,
                     parse_args, rotated, summarize, write_results)
from _targets import print_targets, target_row
from engine import ParallelBatchProcessor, usable_cores
from engine.cli.benchmarking.ceiling import IndependentRunner
from models import CNN1D, MLP

LEARNING_RATE = 1e-3
# Issue 8's targets: (workload, against "single" = 1p x 1 thread or "blas" = 1p x BLAS default,
# the largest process count's speedup it asks for).
TARGETS = (("mlp", "single", 1.7), ("mlp", "blas", 1.2), ("cnn", "single", 1.5))
_AGAINST = {  # baseline label, the record's speedup over it, the host's ceiling over it
    "single": ("1p x 1 thread", "speedup_vs_single_thread", "host_ceiling_vs_single_thread"),
    "blas": ("1p x BLAS default", "speedup_vs_blas_default", "host_ceiling_vs_blas_default")}
_NAMES = {"mlp": "MLP", "cnn": "CNN1D"}
# Epochs each configuration runs, untimed, right before its timed one in every round (docstring).
UNTIMED_EPOCHS_PER_ROUND = 1
# An idle OpenBLAS thread spins for a while (about 2**28 cycles) before it sleeps; the pause keeps
# the spinning threads of the previous configuration off the cores of the next one.
_SETTLE_S = 0.15
# Longest total wait for other processes to leave the cores alone before a round (full run only).
_QUIET_BUDGET_S = 90.0
WORKLOADS = {
    # rows: examples per epoch (None: the whole MNIST-1D training set); epochs: timed epochs.
    "mlp": dict(batch_size=256, rows=256 * 40, quick_rows=256 * 10, epochs=8, quick_epochs=2),
    "cnn": dict(batch_size=100, rows=None, quick_rows=None, epochs=30, quick_epochs=3),
}


def build(name, rows):
    """The model and (examples, labels) of one workload."""
    rng = np.random.default_rng(0)
    if name == "mlp":
        model = MLP(sizes=(784, 1024, 256, 10))
        return model, rng.normal(size=(rows, 784)).astype(np.float32), rng.integers(0, 10, rows)
    model = CNN1D()
    try:
        from mnist1d.data import get_dataset_args, make_dataset
        log("cnn: generating the MNIST-1D data set")
        dataset = make_dataset(get_dataset_args())  # generated in memory, about 2 s, no download
        examples, labels, source = dataset["x"], dataset["y"], "mnist1d"
    except ImportError:
        examples, labels = rng.normal(size=(4000, 40)), rng.integers(0, 10, 4000)
        source = "synthetic"
    log(f"cnn: data from {source}, {len(examples)} examples of shape {examples.shape[1:]}")
    return model, examples.astype(np.float32), labels.astype(np.int64)


def configurations(cores):
    """(label, num_processes, BLAS thread limit or None) from 1 process up to ``cores``.

    With N > 1 the engine gives each worker ``cores // N`` BLAS threads (1 when N = cores).
    """
    configs = [("1p x BLAS default", 1, None)]
    if cores > 1:
        configs.append(("1p x 1 thread", 1, 1))
    for n in range(2, cores + 1):
        threads = max(1, cores // n)
        configs.append((f"{n}p x {threads} thread{'s' if threads > 1 else ''}", n, None))
    return configs


def _blas_threads():
    return max((info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"),
               default=None)


class Runner:
    """One configuration: its processor, the state it trains, and its epochs."""

    def __init__(self, label, num_processes, blas_limit, model, batch_size):
        self.label, self.num_processes, self.blas_limit = label, num_processes, blas_limit
        self.processor = ParallelBatchProcessor(model, num_processes=num_processes,
                                                batch_size=batch_size, optimizer="adam", seed=0)
        self.state = model.init_state(seed=0)
        self.epochs, self.blas_threads = [], None

    def epoch(self, examples, labels):
        """Run one epoch; returns its record (not stored: the caller decides if it counts)."""
        limit = threadpool_limits(limits=self.blas_limit) if self.blas_limit else None
        try:
            # In-process: this process's BLAS pool; workers: the limit the engine sets in each.
            self.blas_threads = (_blas_threads() if self.num_processes == 1
                                 else self.processor.threads_per_process)
            began = time.perf_counter()
            self.state, results = self.processor.run_parallel(
                examples, labels, self.state, {"learning_rate": LEARNING_RATE})
            seconds = time.perf_counter() - began
        finally:
            if limit is not None:
                limit.restore_original_limits()
        wall = results["wall_s"]
        return dict(seconds=seconds, samples_per_s=len(examples) / seconds, steps=len(wall),
                    compute_s=results["compute_s"].tolist(), sync_s=results["sync_s"].tolist(),
                    wait_s=results["wait_s"].tolist(), wall_s=wall.tolist(),
                    outside_steps_s=seconds - float(wall.sum()), mean_loss=results["mean_loss"])

    def summary(self):
        return runner_summary(self)

    def close(self):
        self.processor.close()


def runner_summary(runner):
    """Medians and per-step means of a runner's timed epochs (and the epochs themselves)."""
    epochs = runner.epochs
    rates = [epoch["samples_per_s"] for epoch in epochs]

    def step_mean(key):
        return float(np.mean(np.concatenate([epoch[key] for epoch in epochs])))

    return dict(label=runner.label, num_processes=runner.num_processes,
                blas_threads=runner.blas_threads, ceiling=getattr(runner, "ceiling", False),
                samples_per_s_median=float(np.median(rates)),
                samples_per_s_min=float(np.min(rates)), samples_per_s_max=float(np.max(rates)),
                epoch_seconds=summarize([epoch["seconds"] for epoch in epochs]),
                step_mean_compute_s=step_mean("compute_s"),
                step_mean_sync_s=step_mean("sync_s"), step_mean_wait_s=step_mean("wait_s"),
                step_mean_wall_s=step_mean("wall_s"),
                epoch_mean_outside_steps_s=float(np.mean([e["outside_steps_s"] for e in epochs])),
                final_mean_loss=epochs[-1]["mean_loss"], epochs=epochs)


def measure_workload(name, spec, cores, quick, quiet):
    rows = spec["quick_rows"] if quick else spec["rows"]
    model, examples, labels = build(name, rows)
    if rows is not None:
        log(f"{name}: synthetic data, {len(examples)} examples of shape {examples.shape[1:]}")
    num_epochs = spec["quick_epochs"] if quick else spec["epochs"]
    num_weights = model.init_state(seed=0).num_params
    log(f"{name}: {model!r}, {num_weights:,} values, batch {spec['batch_size']}, "
        f"{-(-len(examples) // spec['batch_size'])} steps per epoch, {num_epochs} timed epochs")
    runners, rounds = [], []
    try:
        for label, num_processes, blas_limit in configurations(cores):
            runners.append(Runner(label, num_processes, blas_limit, model, spec["batch_size"]))
        if cores > 1:
            runners.append(IndependentRunner(f"{cores}p independent", cores, model,
                                             spec["batch_size"], LEARNING_RATE))
        for turn in range(num_epochs + 1):
            rates = {}
            if turn > 0:
                quiet.wait()
            load = CpuLoad()
            for runner in rotated(runners, turn):
                time.sleep(_SETTLE_S)
                if turn > 0:  # untimed: the switch from the previous configuration is not timed
                    for _ in range(UNTIMED_EPOCHS_PER_ROUND):
                        runner.epoch(examples, labels)
                record = runner.epoch(examples, labels)
                if turn > 0:  # the first round is the warm-up
                    runner.epochs.append(record)
                rates[runner.label] = record["samples_per_s"]
            others = load.other_cores()
            if turn > 0:
                rounds.append(dict(samples_per_s=rates, other_processes_cores=others))
            log(f"{name}: {'warm-up' if turn == 0 else f'round {turn}/{num_epochs}'}  "
                + "  ".join(f"{label}: {rate:,.0f}/s" for label, rate in rates.items())
                + f"  (other processes: {others:.2f} cores)")
        summaries = [runner_summary(runner) for runner in runners]
    finally:
        for runner in runners:
            runner.close()
    log(f"{name}: done, processors closed")
    by_label = {s["label"]: s for s in summaries}
    engine = [s for s in summaries if not s["ceiling"]]
    largest = max(engine, key=lambda s: s["num_processes"])  # first wins a tie at 1 core
    ceiling = next((s for s in summaries if s["ceiling"]), None)
    single = by_label.get("1p x 1 thread", by_label["1p x BLAS default"])
    blas = by_label["1p x BLAS default"]
    record = dict(workload=name, model=repr(model), num_values=num_weights,
                  batch_size=spec["batch_size"], examples_per_epoch=len(examples),
                  timed_epochs=num_epochs, untimed_epochs_per_round=UNTIMED_EPOCHS_PER_ROUND,
                  largest_label=largest["label"],
                  speedup_vs_single_thread=largest["samples_per_s_median"] /
                  single["samples_per_s_median"],
                  speedup_vs_blas_default=largest["samples_per_s_median"] /
                  blas["samples_per_s_median"],
                  round_speedups_vs_single_thread=[
                      a["samples_per_s"] / b["samples_per_s"]
                      for a, b in zip(largest["epochs"], single["epochs"])],
                  rounds=rounds, configurations=summaries)
    record["parallel_efficiency"] = record["speedup_vs_single_thread"] / largest["num_processes"]
    if ceiling is not None:
        record["host_ceiling_vs_single_thread"] = (ceiling["samples_per_s_median"] /
                                                   single["samples_per_s_median"])
        record["host_ceiling_vs_blas_default"] = (ceiling["samples_per_s_median"] /
                                                  blas["samples_per_s_median"])
        record["share_of_host_ceiling"] = (largest["samples_per_s_median"] /
                                           ceiling["samples_per_s_median"])
        record["round_shares_of_host_ceiling"] = [
            a["samples_per_s"] / b["samples_per_s"]
            for a, b in zip(largest["epochs"], ceiling["epochs"])]
    record["quiet_rounds"] = _quiet_rounds(rounds, largest["label"], single["label"], blas["label"])
    _print_table(record)
    return record


def _quiet_rounds(rounds, largest, single, blas):
    """The same medians and speedups over only the rounds no other process disturbed."""
    quiet = [r["samples_per_s"] for r in rounds if r["other_processes_cores"] < QUIET_CORES]
    if not quiet:
        return dict(count=0, of=len(rounds), threshold_cores=QUIET_CORES)
    medians = {label: float(np.median([r[label] for r in quiet])) for label in quiet[0]}
    return dict(count=len(quiet), of=len(rounds), threshold_cores=QUIET_CORES,
                samples_per_s_median=medians,
                speedup_vs_single_thread=medians[largest] / medians[single],
                speedup_vs_blas_default=medians[largest] / medians[blas])


def _print_table(record):
    print(f"\n{record['workload']}: {record['model']}, batch {record['batch_size']}")
    print(f"  {'configuration':<20} {'BLAS thr':>8} {'samples/s':>10} {'min..max':>17} "
          f"{'compute':>10} {'sync':>10} {'wait':>10} {'step wall':>10} {'outside':>10}")
    for s in record["configurations"]:
        print(f"  {s['label']:<20} {s['blas_threads']!s:>8} {s['samples_per_s_median']:>10,.0f} "
              f"{s['samples_per_s_min']:>8,.0f}..{s['samples_per_s_max']:<7,.0f} "
              f"{format_seconds(s['step_mean_compute_s']):>10} "
              f"{format_seconds(s['step_mean_sync_s']):>10} "
              f"{format_seconds(s['step_mean_wait_s']):>10} "
              f"{format_seconds(s['step_mean_wall_s']):>10} "
              f"{format_seconds(s['epoch_mean_outside_steps_s']):>10}")
    print(f"  (per-step means; 'outside' = epoch time not inside any step, per epoch)")
    print(f"  {record['largest_label']}: "
          f"{record['speedup_vs_single_thread']:.2f}x vs 1p x 1 thread "
          f"(efficiency {record['parallel_efficiency']:.0%}; per-round median "
          f"{np.median(record['round_speedups_vs_single_thread']):.2f}x), "
          f"{record['speedup_vs_blas_default']:.2f}x vs 1p x BLAS default")
    if "host_ceiling_vs_single_thread" in record:
        processes = record["largest_label"].split()[0]
        print(f"  host ceiling ({processes} independent processes, nothing exchanged): "
              f"{record['host_ceiling_vs_single_thread']:.2f}x vs 1p x 1 thread, "
              f"{record['host_ceiling_vs_blas_default']:.2f}x vs 1p x BLAS default; "
              f"the engine reaches {record['share_of_host_ceiling']:.0%} of it (per-round median "
              f"{np.median(record['round_shares_of_host_ceiling']):.0%})")
    quiet = record["quiet_rounds"]
    if quiet["count"]:
        print(f"  only the {quiet['count']} of {quiet['of']} rounds when other processes used < "
              f"{QUIET_CORES} cores: {quiet['speedup_vs_single_thread']:.2f}x vs 1p x 1 thread, "
              f"{quiet['speedup_vs_blas_default']:.2f}x vs 1p x BLAS default")
    else:
        print(f"  no round ran with other processes below {QUIET_CORES} cores")
    print(flush=True)


def scaling_targets(records):
    """Issue 8's targets with this run's figures and the host's ceilings (``_targets``); not
    measured on one usable core (no run with more than one process)."""
    rows = []
    for workload, against, target in TARGETS:
        record = records[workload]
        label, key, ceiling_key = _AGAINST[against]
        processes = record["largest_label"].split()[0]
        several = processes != "1p"
        rows.append(target_row(f"{_NAMES[workload]} {processes if several else 'Np'} vs {label}",
                               record[key] if several else float("nan"), target,
                               record.get(ceiling_key)))
    return rows


def main():
    args = parse_args(__doc__.splitlines()[0])
    cores = usable_cores()
    load = CpuLoad()
    log(f"scaling: usable cores {cores}, configurations "
        f"{[label for label, _, _ in configurations(cores)]}")
    quiet = QuietWaiter(0.0 if args.quick else _QUIET_BUDGET_S)
    records = {name: measure_workload(name, spec, cores, args.quick, quiet)
               for name, spec in WORKLOADS.items()}
    cleanup, cpu = report_cleanup(load)
    targets = scaling_targets(records)
    headline = {f"{name}_speedup": r["speedup_vs_single_thread"] for name, r in records.items()}
    headline.update({f"{name}_speedup_vs_blas_default": r["speedup_vs_blas_default"]
                     for name, r in records.items()})
    headline.update({f"{name}_host_ceiling": r["host_ceiling_vs_single_thread"]
                     for name, r in records.items() if "host_ceiling_vs_single_thread" in r})
    path = write_results("scaling", args, records, cleanup=cleanup, cpu_load=cpu,
                         quiet_wait=quiet.report(), headline=headline, targets=targets)
    print_targets(targets, "issue 8; the ceiling: independent processes, same model code")
    print(f"results: {path}")
    if "mlp_host_ceiling" in headline:
        print(f"scaling host ceiling (independent processes): "
              f"mlp={headline['mlp_host_ceiling']:.2f} cnn={headline['cnn_host_ceiling']:.2f}")
    print(f"scaling vs 1 process with multithreaded BLAS: "
          f"mlp_speedup={records['mlp']['speedup_vs_blas_default']:.2f} "
          f"cnn_speedup={records['cnn']['speedup_vs_blas_default']:.2f}")
    print(f"scaling mlp_speedup={records['mlp']['speedup_vs_single_thread']:.2f} "
          f"cnn_speedup={records['cnn']['speedup_vs_single_thread']:.2f}", flush=True)
    if cleanup["our_shm_blocks"] or cleanup["live_children"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
