"""The engine against Keras ``model.fit`` on the same cores: the IMU CNN-BiLSTM workload.

    .venv/bin/python benchmarks/vs_keras.py [--quick] [--rounds N]

Workload: ``models.keras_zoo.imu_cnn_bilstm()`` (739,226 values, dropout 0.3), 11,392 synthetic
examples of shape (128, 13) with 26 classes, global batch 64, Adam(1e-3). Three configurations,
each kept alive for the whole run and warmed up by one discarded epoch (TensorFlow import,
tracing), then taking turns epoch by epoch, each round starting with a different one:

* ``engine``: ``ParallelBatchProcessor`` over ``KerasModel``, one worker per usable core, each
  with TensorFlow intra-op threads = its share of the cores, inter-op = 1. This process stays free
  of TensorFlow (workers are forked);
* ``engine unrolled``: the same with ``unroll_rnns=True`` (recurrent layers unrolled in the
  workers: the same maths without the graph while-loop's per-timestep cost);
* ``fit default``: ``model.fit`` in a child process with TensorFlow's default threading;
* ``fit 1 thread``: the same with intra-op and inter-op threads = 1: the single-core rate.

Rates are steady-state samples/s: the examples of every step after the first ``SKIP_STEPS`` of an
epoch over the time those steps took (the engine's per-step ``wall_s``; fit's batch-end
timestamps), so both sides are measured the same way; whole-epoch rates are in the JSON too.

Headline (last line): ``vs_keras speedup_vs_fit=X.XX efficiency=X.XX sync_fraction=X.XX``:
engine rate / fit default rate; engine rate / (cores x fit 1-thread rate); the engine's sync time
over its step time, for the engine's default settings; the line before it gives the same for
``engine unrolled``.
"""
import _common  # noqa: F401 - first: puts the repository root on sys.path

import json
import os
import subprocess
import sys
import time

import numpy as np

from _common import (CpuLoad, QuietWaiter, format_seconds, leftovers, log, parse_args, rotated,
                     write_results)

ROWS, QUICK_ROWS = 11_392, 1_536
BATCH_SIZE, LEARNING_RATE, CLASSES, SHAPE = 64, 1e-3, 26, (128, 13)
SKIP_STEPS = 5
_SETTLE_S = 0.5      # idle TensorFlow/OpenMP threads of the previous configuration stop spinning
_QUIET_BUDGET_S = 120.0


def make_data(rows):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(rows, *SHAPE)).astype(np.float32),
            rng.integers(0, CLASSES, rows).astype(np.int64))


# -- model.fit, in a child process (run with --fit-child) ------------------------------------
def fit_child(threads, rows):
    """Serve "epoch [N]" commands on stdin: one model.fit epoch each over the first N rows (all
    without N), answered with a JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras

    from models.keras_zoo import imu_cnn_bilstm
    keras.utils.set_random_seed(0)
    model = imu_cnn_bilstm(learning_rate=LEARNING_RATE)
    x, y = make_data(rows)

    class BatchTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.times = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    timer = BatchTimes()
    print(json.dumps(dict(ready=True, intra=tf.config.threading.get_intra_op_parallelism_threads(),
                          inter=tf.config.threading.get_inter_op_parallelism_threads())),
          flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] != "epoch":
            break
        count = int(command[1]) if len(command) > 1 else rows
        began = time.perf_counter()
        history = model.fit(x[:count], y[:count], batch_size=BATCH_SIZE, epochs=1, shuffle=True,
                            verbose=0, callbacks=[timer])
        seconds = time.perf_counter() - began
        print(json.dumps(dict(seconds=seconds, step_ends=timer.times,
                              loss=float(history.history["loss"][-1]),
                              rss_bytes=_rss_bytes())), flush=True)


def _rss_bytes():
    import psutil
    return psutil.Process().memory_info().rss


class FitRunner:
    """A model.fit configuration living in its own process."""

    def __init__(self, label, threads, rows):
        self.label, self.threads, self.epochs = label, threads, []
        env = {k: v for k, v in os.environ.items()
               if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--fit-child", str(threads), str(rows)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = json.loads(self.process.stdout.readline())

    def epoch(self, examples_per_epoch):
        """One epoch over the first ``examples_per_epoch`` rows of the child's data."""
        self.process.stdin.write(f"epoch {examples_per_epoch}\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        ends = np.asarray(answer["step_ends"])
        steps = np.diff(ends)
        sizes = _step_sizes(examples_per_epoch, len(steps))
        return _epoch_record(answer["seconds"], steps, sizes, examples_per_epoch,
                             loss=answer["loss"], rss_bytes=[answer["rss_bytes"]])

    def pids(self):
        return [self.process.pid]

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


class EngineRunner:
    """The engine: one worker per usable core, kept alive for the whole run."""

    def __init__(self, label, model, num_processes):
        from engine import ParallelBatchProcessor
        self.label, self.epochs = label, []
        self.processor = ParallelBatchProcessor(model, num_processes=num_processes,
                                                batch_size=BATCH_SIZE, optimizer="adam", seed=0)
        self.state = model.init_state(seed=0)

    def epoch(self, data):
        examples, labels = data
        began = time.perf_counter()
        self.state, results = self.processor.run_parallel(
            examples, labels, self.state, {"learning_rate": LEARNING_RATE})
        seconds = time.perf_counter() - began
        record = _epoch_record(seconds, results["wall_s"], results["examples"], len(examples),
                               loss=results["mean_loss"],
                               rss_bytes=results["peak_rss_bytes"].tolist())
        for key in ("compute_s", "sync_s", "wait_s"):
            record[key] = float(np.sum(results[key][SKIP_STEPS:]))
        # The mean worker's compute: against compute_s (the slowest one's), the lockstep's cost.
        record["mean_worker_compute_s"] = float(
            np.sum(results["worker_compute_s"][SKIP_STEPS:].mean(axis=1)))
        return record

    def pids(self):
        """The processes doing the work: the workers, or this process when there are none."""
        return self.processor.worker_pids or [os.getpid()]

    def close(self):
        self.processor.close()


def _step_sizes(rows, steps):
    sizes = np.full(steps, BATCH_SIZE)
    if steps and rows % BATCH_SIZE:
        sizes[-1] = rows % BATCH_SIZE
    return sizes


def _epoch_record(seconds, step_s, step_examples, rows, **extra):
    step_s, step_examples = np.asarray(step_s, float), np.asarray(step_examples)
    steady_s = float(step_s[SKIP_STEPS:].sum())
    return dict(seconds=seconds, samples_per_s=rows / seconds, steady_s=steady_s,
                steady_samples_per_s=float(step_examples[SKIP_STEPS:].sum()) / steady_s,
                steps=len(step_s), **extra)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--fit-child":
        fit_child(int(sys.argv[2]), int(sys.argv[3]))
        return
    args = parse_args(__doc__.splitlines()[0], lambda parser: parser.add_argument(
        "--rounds", type=int, default=None, help="timed epochs per configuration (default 3, "
                                                 "1 with --quick)"))
    from engine import usable_cores
    from models.keras_zoo import get_keras_model
    cores = usable_cores()
    rows = QUICK_ROWS if args.quick else ROWS
    rounds = args.rounds or (1 if args.quick else 3)
    data = make_data(rows)
    model = get_keras_model("imu_cnn_bilstm", learning_rate=LEARNING_RATE)
    load = CpuLoad()
    log(f"vs_keras: usable cores {cores}; {rows:,} examples of {SHAPE}, batch {BATCH_SIZE}, "
        f"{-(-rows // BATCH_SIZE)} steps per epoch, {rounds} timed epochs per configuration")
    quiet = QuietWaiter(0.0 if args.quick else _QUIET_BUDGET_S)
    runners = []
    try:
        runners.append(EngineRunner(f"engine {cores}p x 1 thread", model, cores))
        unrolled = get_keras_model("imu_cnn_bilstm", learning_rate=LEARNING_RATE, unroll_rnns=True)
        runners.append(EngineRunner(f"engine {cores}p unrolled", unrolled, cores))
        runners.append(FitRunner("fit default", 0, rows))
        runners.append(FitRunner("fit 1 thread", 1, rows))
        log("started: " + ", ".join(runner.label for runner in runners))
        history = []
        for turn in range(rounds + 1):
            if turn > 0:
                quiet.wait()
            round_load, rates = CpuLoad(), {}
            for runner in rotated(runners, turn):
                time.sleep(_SETTLE_S)
                record = runner.epoch(data if isinstance(runner, EngineRunner) else rows)
                if turn > 0:
                    runner.epochs.append(record)
                rates[runner.label] = record["steady_samples_per_s"]
            others = round_load.other_cores()
            if turn > 0:
                history.append(dict(steady_samples_per_s=rates, other_processes_cores=others))
            log(f"{'warm-up' if turn == 0 else f'round {turn}/{rounds}'}  " +
                "  ".join(f"{label}: {rate:,.0f}/s" for label, rate in rates.items()) +
                f"  (other processes: {others:.2f} cores)")
        fit_info = {runner.label: runner.info for runner in runners
                    if isinstance(runner, FitRunner)}
    finally:
        for runner in runners:
            runner.close()
    summary = _summarize(runners, cores)
    cleanup, cpu = leftovers(), load.report()
    _print_summary(summary, cores)
    path = write_results("vs_keras", args, summary, rounds=history, fit_threads=fit_info,
                         cleanup=cleanup, cpu_load=cpu, quiet_wait=quiet.report(),
                         workload=dict(rows=rows, batch_size=BATCH_SIZE, shape=SHAPE,
                                       classes=CLASSES, learning_rate=LEARNING_RATE,
                                       skip_steps=SKIP_STEPS))
    if cpu["other_processes_cores"] > 0.1:
        log(f"note: other processes used {cpu['other_processes_cores']:.2f} cores on average "
            "during the run; the timings may be disturbed")
    print(f"results: {path}")
    for label, figures in summary["engines"].items():
        if label != summary["engine_label"]:
            print(f"{label}: speedup_vs_fit={figures['speedup_vs_fit']:.2f} "
                  f"efficiency={figures['efficiency']:.2f} "
                  f"sync_fraction={figures['sync_fraction']:.2f}")
    print(f"vs_keras speedup_vs_fit={summary['speedup_vs_fit']:.2f} "
          f"efficiency={summary['efficiency']:.2f} "
          f"sync_fraction={summary['sync_fraction']:.2f}", flush=True)
    if cleanup["our_shm_blocks"] or cleanup["live_children"]:
        raise SystemExit(1)


def _summarize(runners, cores):
    configurations = {}
    for runner in runners:
        epochs = runner.epochs
        steady = sum(e["steady_s"] for e in epochs)
        examples = sum(e["steady_samples_per_s"] * e["steady_s"] for e in epochs)
        configurations[runner.label] = dict(
            steady_samples_per_s=examples / steady,
            steady_samples_per_s_per_epoch=[e["steady_samples_per_s"] for e in epochs],
            epoch_samples_per_s_median=float(np.median([e["samples_per_s"] for e in epochs])),
            step_mean_s=steady / sum(e["steps"] - SKIP_STEPS for e in epochs),
            peak_rss_bytes=epochs[-1]["rss_bytes"], final_loss=epochs[-1]["loss"], epochs=epochs)
    fit_rate = configurations["fit default"]["steady_samples_per_s"]
    single_rate = configurations["fit 1 thread"]["steady_samples_per_s"]
    engines = {}
    for engine in (r for r in runners if isinstance(r, EngineRunner)):
        record = configurations[engine.label]
        for key in ("compute_s", "sync_s", "wait_s"):
            record[f"{key}_fraction"] = sum(e[key] for e in engine.epochs) / \
                sum(e["steady_s"] for e in engine.epochs)
        rate = record["steady_samples_per_s"]
        engines[engine.label] = dict(speedup_vs_fit=rate / fit_rate,
                                     efficiency=rate / (cores * single_rate),
                                     sync_fraction=record["sync_s_fraction"])
    default = next(r for r in runners if isinstance(r, EngineRunner)).label
    return dict(configurations=configurations, engine_label=default, cores=cores,
                data_parallel_limit_samples_per_s=cores * single_rate, engines=engines,
                **engines[default])


def _print_summary(summary, cores):
    print(f"\nimu_cnn_bilstm, batch {BATCH_SIZE}, Adam, {cores} usable cores "
          f"(steady state: steps after the first {SKIP_STEPS} of each epoch)")
    print(f"  {'configuration':<22} {'samples/s':>10} {'per epoch':>24} {'step':>10} "
          f"{'peak RSS per process':>28}")
    for label, c in summary["configurations"].items():
        per_epoch = ", ".join(f"{rate:,.0f}" for rate in c["steady_samples_per_s_per_epoch"])
        rss = ", ".join(f"{value / 2**20:,.0f} MiB" for value in c["peak_rss_bytes"])
        print(f"  {label:<22} {c['steady_samples_per_s']:>10,.0f} {per_epoch:>24} "
              f"{format_seconds(c['step_mean_s']):>10} {rss:>28}")
    for label, figures in summary["engines"].items():
        engine = summary["configurations"][label]
        print(f"  {label}: step time split compute {engine['compute_s_fraction']:.1%}, sync "
              f"{engine['sync_s_fraction']:.1%}, wait {engine['wait_s_fraction']:.1%}; "
              f"efficiency {figures['efficiency']:.0%} of the data-parallel limit, "
              f"{figures['speedup_vs_fit']:.2f}x fit default")
    print(f"  (data-parallel limit: {cores} x fit 1 thread = "
          f"{summary['data_parallel_limit_samples_per_s']:,.0f}/s; compute = the slowest "
          "worker's, wait = the rest of the compute phase)\n")


if __name__ == "__main__":
    main()
