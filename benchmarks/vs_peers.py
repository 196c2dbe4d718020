"""The native engine against its peers on the IMU CNN-BiLSTM workload: Keras ``model.fit`` and a
PyTorch twin (default threads, and DDP/gloo with one rank per core), all in one run.

    .venv/bin/python benchmarks/vs_peers.py [--quick] [--rounds N] [--native-only]
                                            [--paired-rounds N]

Workload (issue 9, item 5): ``imu_cnn_bilstm`` (Conv1D(64,5)+BN, Conv1D(128,5), MaxPool(2),
BiLSTM(128, sequences), BiLSTM(128), Dense(128), Dropout(0.3), Dense(26); 739,226 values),
11,392 synthetic examples of shape (128, 13), 26 classes, global batch 64, Adam(1e-3).
Configurations, each kept alive for the whole run, warmed up by one discarded epoch, then taking
turns epoch by epoch (each round starting with a different one):

* ``native Np``: ``ParallelBatchProcessor`` over the native model, one worker per usable core
  (no TensorFlow anywhere); ``native 1 thread``: the same maths in this process, BLAS at 1 thread;
* ``fit default``: Keras ``model.fit`` in a child process, TensorFlow's default threading;
* ``torch default`` and ``torch 1 thread``: a PyTorch twin of the model in a child process;
* ``torch DDP Nx1``: DistributedDataParallel over gloo, one rank per usable core, one thread each,
  the same global batch (each rank takes its share of every batch of 64);
* ``Np independent`` (with more than one usable core): the host's own ceiling for Z, N forked
  processes that never exchange anything (``engine/cli/benchmarking/ceiling.py``), each computing
  its shard of every batch and the Adam update of its share of the values. Its rate over cores x
  native 1 thread is what two busy cores and the smaller step leave of Z before any synchronization;
  native Np over it is the share of that ceiling the engine keeps (left out of a ``--quick`` run
  with the peers; ``--quick --native-only`` runs it).

Rates are steady-state samples/s: examples of the steps after the first ``SKIP_STEPS`` of each
epoch over the time they took (the engine's per-step ``wall_s``, the peers' step-end timestamps).
Memory per process, after each epoch: peak RSS (as each process reports it), and PSS and USS
(``memory_of``): RSS counts every shared page a process touched in full (the engine's data set and
state in shared memory, pages inherited by fork), PSS divides them among the processes that map
them, USS is what the process alone holds. The worker pool's start time (launch to every worker
ready) is taken from the engine's first epoch. Before that, one child process times one LSTM direction forward + backward (62 steps, batch 32,
128 units, input 128, one thread) natively and in torch, interleaved.

Headline (last line): ``vs_peers native_vs_fit=X native_vs_torch_ddp=Y efficiency=Z``: native
engine rate / fit default rate; / torch DDP rate (nan without torch); / (cores x native 1-thread
rate). Targets (issue 9): X >= 1.6, Y >= 1.2, Z >= 0.9, native 1 thread >= torch 1 thread; a
table before the headline gives each with its verdict (``_targets.py``) and, for X, Y and Z, the
host's ceiling: the figure at the independent processes' rate.
The table also gives each ratio of every round's own rates, median over rounds (a drift of the
host's speed between rounds cancels in them; ``per_round_medians`` in the JSON).
``--native-only`` runs the two native configurations alone (X and Y are nan): Z with the two
taking turns directly, not with four peers' epochs between them.

After the epochs, *paired bursts* (``--paired-rounds``, default 10; one with ``--quick``; 0: none)
measure the same ratios again, with every configuration taking its turn for a burst of
``BURST_STEPS`` steps (the first ``SKIP_STEPS`` untimed) round after round: a round then lasts
seconds, not minutes. This host's speed changes within a minute (the reference step alone took
52 to 71 ms within 12 steps), so an epoch-long turn can land in another phase than its
neighbour's; in bursts the configurations compared share a phase. The summary and the JSON
(``paired_bursts``) give each ratio's median and quartiles over the rounds, and X's, Y's and Z's
at the independent processes' rate; the headline and the targets stay the epochs' figures.
"""
import _common  # noqa: F401 - first: puts the repository root on sys.path

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from _common import CpuLoad, QuietWaiter, format_seconds, leftovers, log, parse_args, rotated, \
    write_results
from _targets import print_targets, target_row
from engine.cli.benchmarking.ceiling import IndependentRunner
from vs_keras import (BATCH_SIZE, CLASSES, LEARNING_RATE, ROWS, SHAPE, SKIP_STEPS, EngineRunner,
                      FitRunner, _epoch_record, _step_sizes, make_data)

QUICK_ROWS = 8 * BATCH_SIZE  # --quick: 8 steps per epoch, 3 of them timed

_SETTLE_S = 0.5
_QUIET_BUDGET_S = 120.0
BURST_STEPS = 20  # a paired burst: SKIP_STEPS untimed steps, then the timed ones
PAIRED_ROUNDS = 10
_LIMITS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def native_model():
    """The zoo's native ``imu_cnn_bilstm``, or the same stack as a Sequential before it exists."""
    import models
    if "imu_cnn_bilstm" in models.available_models():
        return models.get_model("imu_cnn_bilstm", learning_rate=LEARNING_RATE), "zoo"
    from models.layers import (BatchNorm, Conv1D, Dense, Dropout, MaxPool1D, ReLU)
    from models.layers.recurrent import LSTM, Bidirectional
    layers = [Conv1D(64, 5), ReLU(), BatchNorm(momentum=0.99, epsilon=1e-3), Conv1D(128, 5),
              ReLU(), MaxPool1D(2), Bidirectional(LSTM(128, return_sequences=True)),
              Bidirectional(LSTM(128)), Dense(128), ReLU(), Dropout(0.3), Dense(CLASSES)]
    return models.Sequential(layers, SHAPE), "sequential twin"


# -- torch, in child processes (run with --torch-child) ------------------------------------------
def _torch_twin():
    import torch
    from torch import nn

    class ImuCnnBiLstm(nn.Module):
        """keras_zoo.imu_cnn_bilstm in torch (Keras's BatchNorm momentum and epsilon)."""

        def __init__(self):
            super().__init__()
            self.conv1, self.bn = nn.Conv1d(SHAPE[1], 64, 5), nn.BatchNorm1d(64, eps=1e-3,
                                                                              momentum=0.01)
            self.conv2, self.pool = nn.Conv1d(64, 128, 5), nn.MaxPool1d(2)
            self.lstm1 = nn.LSTM(128, 128, batch_first=True, bidirectional=True)
            self.lstm2 = nn.LSTM(256, 128, batch_first=True, bidirectional=True)
            self.dense, self.dropout = nn.Linear(256, 128), nn.Dropout(0.3)
            self.classes = nn.Linear(128, CLASSES)

        def forward(self, x):                      # x: (n, timesteps, channels), as Keras
            x = self.bn(torch.relu(self.conv1(x.transpose(1, 2))))
            x = self.pool(torch.relu(self.conv2(x))).transpose(1, 2)
            x, _ = self.lstm1(x)
            _, (h, _) = self.lstm2(x)              # h: (2, n, 128), forward and backward finals
            x = torch.relu(self.dense(torch.cat([h[0], h[1]], dim=1)))
            return self.classes(self.dropout(x))

    return ImuCnnBiLstm()


def torch_child(rank, world, threads, rows, port):
    """Serve "epoch [N]" commands on stdin: one epoch each over the first N rows (all without N),
    answered with a JSON line."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    torch.manual_seed(0)
    model = _torch_twin()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = (torch.from_numpy(a) for a in make_data(rows))
    print(json.dumps(dict(ready=True, threads=torch.get_num_threads())), flush=True)
    for epoch, line in enumerate(sys.stdin):
        command = line.split()
        if not command or command[0] != "epoch":
            break
        count = int(command[1]) if len(command) > 1 else rows
        order = torch.from_numpy(np.random.default_rng(epoch).permutation(count))
        began = time.perf_counter()
        ends, total = [began], 0.0
        for start in range(0, count, BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            share = -(-len(batch) // world)    # this rank's part of the global batch
            batch = batch[rank * share:(rank + 1) * share]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item()
            ends.append(time.perf_counter())
        print(json.dumps(dict(seconds=time.perf_counter() - began, step_ends=ends,
                              loss=total / (len(ends) - 1), rss_bytes=_rss_bytes())), flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()


def memory_of(pids):
    """Resident (RSS), proportional (PSS: shared pages divided among the processes that map
    them) and unique (USS) bytes of each process, now. RSS counts a page of shared memory (the
    engine's data set and state) and of memory inherited by fork in full in every process that
    touched it; PSS adds up to what the processes use together."""
    import psutil
    # The part of RSS that is the engine's shared memory (data set, state, slots): one copy in
    # the machine, counted in full in every process that mapped it.
    folder = (os.environ.get("ENGINE_SHM_DIR") or "/dev/shm").rstrip("/")
    memory = []
    for pid in pids:
        process = psutil.Process(pid)
        info = process.memory_full_info()
        engine_shm = sum(m.rss for m in process.memory_maps(grouped=True)
                         if os.path.dirname(m.path) == folder and
                         os.path.basename(m.path).startswith("engine_"))
        memory.append(dict(rss_bytes=info.rss, pss_bytes=info.pss, uss_bytes=info.uss,
                           engine_shm_rss_bytes=engine_shm))
    return memory


def _rss_bytes():
    import psutil
    return psutil.Process().memory_info().rss


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(threads):
    env = {k: v for k, v in os.environ.items() if k not in _LIMITS}
    if threads:
        env.update({k: str(threads) for k in _LIMITS})
    return env


class TorchRunner:
    """The torch twin in ``world`` child processes (DDP over gloo when world > 1)."""

    def __init__(self, label, world, threads, rows):
        self.label, self.epochs, port = label, [], _free_port()
        self.processes = [subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--torch-child", str(rank), str(world),
             str(threads), str(rows), str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=_child_env(threads)) for rank in range(world)]
        self.info = [json.loads(p.stdout.readline()) for p in self.processes]

    def epoch(self, rows):
        """One epoch over the first ``rows`` rows of the children's data."""
        for process in self.processes:
            process.stdin.write(f"epoch {rows}\n")
            process.stdin.flush()
        answers = [json.loads(p.stdout.readline()) for p in self.processes]
        lead = answers[0]                          # ranks meet at every all-reduce: rank 0 speaks
        steps = np.diff(np.asarray(lead["step_ends"]))
        return _epoch_record(lead["seconds"], steps, _step_sizes(rows, len(steps)), rows,
                             loss=lead["loss"], rss_bytes=[a["rss_bytes"] for a in answers])

    def pids(self):
        return [process.pid for process in self.processes]

    def close(self):
        for process in self.processes:
            if process.poll() is None:
                process.stdin.close()
        for process in self.processes:
            process.wait(timeout=60)


class NativeOneThreadRunner(EngineRunner):
    """The native model in this process (``num_processes=1``), BLAS limited to one thread, freed
    memory kept for reuse as in a worker."""

    def __init__(self, label, model):
        from engine.parallel.system import keep_freed_memory
        keep_freed_memory()
        super().__init__(label, model, 1)

    def epoch(self, data):
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=1):
            return super().epoch(data)


class CeilingRunner:
    """``Np independent``: ``IndependentRunner``'s processes, recorded as the other
    configurations are (steady rate over the steps after the first ``SKIP_STEPS``)."""

    def __init__(self, label, num_processes, model):
        self.label, self.epochs = label, []
        self.runner = IndependentRunner(label, num_processes, model, BATCH_SIZE, LEARNING_RATE)

    def epoch(self, data):
        examples, labels = data
        record = self.runner.epoch(examples, labels)
        step_s = record["compute_s"]  # per step, mean over the processes (they never wait)
        return _epoch_record(record["seconds"], step_s, _step_sizes(len(examples), len(step_s)),
                             len(examples), loss=float("nan"),
                             rss_bytes=[m["rss_bytes"] for m in memory_of(self.pids())])

    def pids(self):
        return self.runner.pids()

    def close(self):
        self.runner.close()


# -- one LSTM direction, native against torch (run with --layer-child) -----------------------
def layer_child(repeats):
    """Median ms of forward + backward of one LSTM direction, native and torch, interleaved."""
    from engine.parallel.system import keep_freed_memory, limit_threads
    from models.layers.recurrent import LSTM
    limit = limit_threads(1)  # noqa: F841 - as in a worker: the limit lasts while it lives
    keep_freed_memory()       # as in a worker: freed buffers are reused, not returned and faulted
    timesteps, batch, units, features = 62, 32, 128, 128
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, timesteps, features)).astype(np.float32)
    layer = LSTM(units, return_sequences=True)
    weights = layer.init_weights((timesteps, features), rng)
    dy = np.ones((batch, timesteps, units), np.float32)

    def native():
        y, cache = layer.forward(x, weights, {}, training=True)
        layer.backward(weights, cache, dy)

    runs = {"native": native}
    if importlib.util.find_spec("torch") is not None:
        import torch
        torch.set_num_threads(1)
        module = torch.nn.LSTM(features, units, batch_first=True)
        x_torch = torch.from_numpy(x).requires_grad_(True)

        def peer():
            y, _ = module(x_torch)
            y.backward(torch.from_numpy(dy))
        runs["torch"] = peer
    times = {name: [] for name in runs}
    for turn in range(repeats + 1):
        for name, run in rotated(runs.items(), turn):
            began = time.perf_counter()
            for _ in range(5):
                run()
            if turn:
                times[name].append((time.perf_counter() - began) / 5)
    print(json.dumps({name: float(np.median(t)) * 1e3 for name, t in times.items()}))


def layer_comparison(repeats):
    finished = subprocess.run([sys.executable, os.path.abspath(__file__), "--layer-child",
                               str(repeats)], capture_output=True, text=True, timeout=600,
                              env=_child_env(1))
    if finished.returncode != 0:
        raise RuntimeError(f"the layer benchmark failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--torch-child":
        torch_child(*(int(v) for v in sys.argv[2:7]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--layer-child":
        layer_child(int(sys.argv[2]))
        return
    def options(parser):
        parser.add_argument("--rounds", type=int, default=None,
                            help="timed epochs per configuration (default 3, 1 with --quick)")
        parser.add_argument("--paired-rounds", type=int, default=None,
                            help=f"rounds of paired bursts after the epochs (default "
                                 f"{PAIRED_ROUNDS}, 1 with --quick; 0: none)")
        parser.add_argument("--native-only", action="store_true",
                            help="only the two native configurations: their efficiency (Z) "
                                 "without the peers' epochs in between")
    args = parse_args(__doc__.splitlines()[0], options)
    from engine import usable_cores
    cores = usable_cores()
    rows = QUICK_ROWS if args.quick else ROWS
    rounds = args.rounds or (1 if args.quick else 3)
    paired_rounds = args.paired_rounds if args.paired_rounds is not None else (
        1 if args.quick else PAIRED_ROUNDS)
    have_torch = importlib.util.find_spec("torch") is not None
    load = CpuLoad()
    quiet = QuietWaiter(0.0 if args.quick else _QUIET_BUDGET_S)
    quiet.wait()
    lstm = layer_comparison(1 if args.quick else 15)
    log("one LSTM direction, forward + backward, 1 thread: " +
        ", ".join(f"{name} {ms:.2f} ms" for name, ms in lstm.items()))
    data = make_data(rows)
    model, model_source = native_model()
    log(f"vs_peers: usable cores {cores}; native model from the {model_source}; {rows:,} "
        f"examples of {SHAPE}, batch {BATCH_SIZE}, {rounds} timed epochs per configuration")
    runners, ready_s = [], {}  # seconds the worker pool took to start (in the warm-up epoch)
    try:
        runners.append(EngineRunner(f"native {cores}p", model, cores))
        runners.append(NativeOneThreadRunner("native 1 thread", model))
        if cores > 1 and (args.native_only or not args.quick):  # a short smoke run without it
            runners.append(CeilingRunner(f"{cores}p independent", cores, model))
        if not args.native_only:
            runners.append(FitRunner("fit default", 0, rows))
        if have_torch and not args.native_only:
            runners.append(TorchRunner("torch default", 1, 0, rows))
            runners.append(TorchRunner("torch 1 thread", 1, 1, rows))
            runners.append(TorchRunner(f"torch DDP {cores}x1", cores, 1, rows))
        log("started: " + ", ".join(runner.label for runner in runners))
        history = []
        # --quick times its first epoch (compilation included): it keeps the script working and
        # its timings mean nothing.
        warm_up = 0 if args.quick else 1
        for turn in range(1 - warm_up, rounds + 1):
            if turn > 0:
                quiet.wait()
            round_load, rates = CpuLoad(), {}
            for runner in rotated(runners, turn):
                record = _turn(runner, data)
                record["memory"] = memory_of(runner.pids())
                start_s = getattr(getattr(runner, "processor", None), "worker_start_s", None)
                if start_s is not None:
                    ready_s.setdefault(runner.label, start_s)  # its first epoch started it
                if turn > 0:
                    runner.epochs.append(record)
                rates[runner.label] = record["steady_samples_per_s"]
            others = round_load.other_cores()
            if turn > 0:
                history.append(dict(steady_samples_per_s=rates, other_processes_cores=others))
            log(f"{'warm-up' if turn == 0 else f'round {turn}/{rounds}'}  " +
                "  ".join(f"{label}: {rate:,.0f}/s" for label, rate in rates.items()) +
                f"  (other processes: {others:.2f} cores)")
        bursts = paired_bursts(runners, data, paired_rounds, cores, quiet)
    finally:
        for runner in runners:
            runner.close()
    summary = _summarize(runners, cores, lstm)
    summary["per_round_medians"] = _per_round_medians(history, cores)
    summary["worker_start_s"] = ready_s
    summary["paired_bursts"] = bursts
    cleanup, cpu = leftovers(), load.report()
    _print_summary(summary, cores)
    targets = peer_targets(summary, cores)
    path = write_results("vs_peers", args, summary, rounds=history, cleanup=cleanup,
                         cpu_load=cpu, quiet_wait=quiet.report(), native_model=model_source,
                         workload=dict(rows=rows, batch_size=BATCH_SIZE, shape=SHAPE,
                                       classes=CLASSES, learning_rate=LEARNING_RATE,
                                       skip_steps=SKIP_STEPS), targets=targets)
    print_targets(targets, "issue 9; the ceiling: independent processes, same model code")
    if cpu["other_processes_cores"] > 0.1:
        log(f"note: other processes used {cpu['other_processes_cores']:.2f} cores on average "
            "during the run; the timings may be disturbed")
    print(f"results: {path}")
    print(f"vs_peers native_vs_fit={summary['native_vs_fit']:.2f} "
          f"native_vs_torch_ddp={summary['native_vs_torch_ddp']:.2f} "
          f"efficiency={summary['efficiency']:.2f}", flush=True)
    if cleanup["our_shm_blocks"] or cleanup["live_children"]:
        raise SystemExit(1)


def _summarize(runners, cores, lstm):
    configurations = {}
    for runner in runners:
        epochs = runner.epochs
        steady = sum(e["steady_s"] for e in epochs)
        examples = sum(e["steady_samples_per_s"] * e["steady_s"] for e in epochs)
        configurations[runner.label] = dict(
            steady_samples_per_s=examples / steady,
            steady_samples_per_s_per_epoch=[e["steady_samples_per_s"] for e in epochs],
            step_mean_s=steady / sum(e["steps"] - SKIP_STEPS for e in epochs),
            peak_rss_bytes=epochs[-1]["rss_bytes"], final_loss=epochs[-1]["loss"],
            pss_bytes=[m["pss_bytes"] for m in epochs[-1]["memory"]],
            uss_bytes=[m["uss_bytes"] for m in epochs[-1]["memory"]],
            engine_shm_rss_bytes=[m["engine_shm_rss_bytes"] for m in epochs[-1]["memory"]],
            epochs=epochs)
    rate = {label: c["steady_samples_per_s"] for label, c in configurations.items()}
    native = rate[f"native {cores}p"]
    ddp = rate.get(f"torch DDP {cores}x1", float("nan"))
    return dict(configurations=configurations, cores=cores, lstm_direction_ms=lstm,
                native_vs_fit=native / rate.get("fit default", float("nan")),
                native_vs_torch_ddp=native / ddp,
                efficiency=native / (cores * rate["native 1 thread"]),
                native_1_thread_vs_torch_1_thread=rate["native 1 thread"] /
                rate.get("torch 1 thread", float("nan")),
                host_ceiling=rate.get(f"{cores}p independent", float("nan")) /
                (cores * rate["native 1 thread"]),
                share_of_host_ceiling=native / rate.get(f"{cores}p independent", float("nan")))


def peer_targets(summary, cores):
    """Issue 9's targets with this run's figures (``_targets``). The ceilings of X and Y are
    what they would be had the engine run at the independent processes' rate."""
    configurations = summary["configurations"]
    rate = {label: c["steady_samples_per_s"] for label, c in configurations.items()}
    nan = float("nan")
    independent = rate.get(f"{cores}p independent", nan)
    native = configurations[f"native {cores}p"]
    # One core: the engine runs in this process, so there is no worker to measure.
    rss_mb = max(native["peak_rss_bytes"]) / 1e6 if cores > 1 else nan
    start_s = summary["worker_start_s"].get(f"native {cores}p", nan)
    return [
        target_row("X: native vs fit default", summary["native_vs_fit"], 1.6,
                   independent / rate.get("fit default", nan)),
        target_row(f"Y: native vs torch DDP {cores}x1", summary["native_vs_torch_ddp"], 1.2,
                   independent / rate.get(f"torch DDP {cores}x1", nan)),
        target_row("Z: efficiency", summary["efficiency"], 0.9, summary["host_ceiling"],
                   unit=""),
        target_row("native 1 thread vs torch 1 thread",
                   summary["native_1_thread_vs_torch_1_thread"], 1.0),
        target_row("a native worker's peak RSS", rss_mb, 250.0, at_most=True, unit="MB"),
        target_row("native worker pool ready", start_s, 1.0, at_most=True, unit="s")]


def paired_bursts(runners, data, rounds, cores, quiet):
    """Every configuration in turn for ``BURST_STEPS`` steps, ``rounds`` times (module docstring);
    returns the bursts' rates and each ratio's median and quartiles over the rounds."""
    rows = min(len(data[0]), BURST_STEPS * BATCH_SIZE)
    burst = (data[0][:rows], data[1][:rows])  # the same arrays each time: loaded by the engine once
    history = []
    for turn in range(rounds):
        quiet.wait()
        rates = {}
        for runner in rotated(runners, turn):
            rates[runner.label] = _turn(runner, burst)["steady_samples_per_s"]
        history.append(rates)
        log(f"paired bursts {turn + 1}/{rounds}  " +
            "  ".join(f"{label}: {rate:,.0f}/s" for label, rate in rates.items()))
    return dict(rows=rows, rounds=history, ratios=_round_ratios(history, cores))


def _turn(runner, data):
    """One epoch of ``runner`` over ``data`` (examples, labels), after the previous configuration's
    idle threads had time to stop spinning; the peers' children hold the same rows and take their
    count."""
    time.sleep(_SETTLE_S)
    if isinstance(runner, (FitRunner, TorchRunner)):
        return runner.epoch(len(data[0]))
    return runner.epoch(data)


def _round_ratios(history, cores):
    """{name: {"median", "q25", "q75"}} of each round's own ratios, from ``history``, a list of
    {label: samples/s} per round (the epochs' rounds or the bursts'); nan where a side is absent."""
    native, independent, ddp = f"native {cores}p", f"{cores}p independent", f"torch DDP {cores}x1"
    ratios = {  # name: (numerator, denominator, cores in the denominator's factor)
        "native_vs_fit": (native, "fit default", 1),
        "native_vs_torch_ddp": (native, ddp, 1),
        "efficiency": (native, "native 1 thread", cores),
        "ceiling_vs_fit": (independent, "fit default", 1),
        "ceiling_vs_torch_ddp": (independent, ddp, 1),
        "host_ceiling": (independent, "native 1 thread", cores),
        "share_of_host_ceiling": (native, independent, 1),
        "native_1_thread_vs_torch_1_thread": ("native 1 thread", "torch 1 thread", 1)}
    nan, figures = float("nan"), {}
    for name, (top, bottom, factor) in ratios.items():
        values = [rates.get(top, nan) / (factor * rates.get(bottom, nan)) for rates in history]
        figures[name] = {key: float(np.quantile(values, q)) if values else nan
                         for key, q in (("median", 0.5), ("q25", 0.25), ("q75", 0.75))}
    return figures


def _per_round_medians(history, cores):
    """X, Y and Z of each round's own rates, median over rounds: epochs of one round ran minutes
    apart at most, so a drift of the host's speed over the run cancels in them."""
    ratios = _round_ratios([r["steady_samples_per_s"] for r in history], cores)
    return {key: ratios[key]["median"] for key in ("native_vs_fit", "native_vs_torch_ddp",
                                                   "efficiency", "share_of_host_ceiling")}


def _print_summary(summary, cores):
    print(f"\nimu_cnn_bilstm, batch {BATCH_SIZE}, Adam, {cores} usable cores "
          f"(steady state: steps after the first {SKIP_STEPS} of each epoch)")
    print(f"  {'configuration':<18} {'samples/s':>10} {'per epoch':>22} {'step':>10} "
          f"{'peak RSS / PSS / USS per process (MiB)':>44}")
    for label, c in summary["configurations"].items():
        per_epoch = ", ".join(f"{rate:,.0f}" for rate in c["steady_samples_per_s_per_epoch"])
        memory = ", ".join(f"{rss / 2**20:,.0f}/{pss / 2**20:,.0f}/{uss / 2**20:,.0f}"
                           for rss, pss, uss in zip(c["peak_rss_bytes"], c["pss_bytes"],
                                                    c["uss_bytes"]))
        print(f"  {label:<18} {c['steady_samples_per_s']:>10,.0f} {per_epoch:>22} "
              f"{format_seconds(c['step_mean_s']):>10} {memory:>44}")
    native = summary["configurations"][f"native {cores}p"]
    mib = lambda values: ", ".join(f"{v / 2**20:,.0f}" for v in values)  # noqa: E731
    print(f"  native workers' RSS {mib(native['peak_rss_bytes'])} MiB, of which the engine's "
          f"shared memory (data set, state; one copy for all) {mib(native['engine_shm_rss_bytes'])}"
          " MiB")
    lstm = ", ".join(f"{name} {ms:.2f} ms" for name, ms in summary["lstm_direction_ms"].items())
    print(f"  native 1 thread / torch 1 thread: "
          f"{summary['native_1_thread_vs_torch_1_thread']:.2f}; one LSTM direction forward + "
          f"backward (T 62, batch 32, 128 units, 1 thread): {lstm}")
    rounds = summary["per_round_medians"]
    print(f"  per-round ratios, median over rounds: native vs fit {rounds['native_vs_fit']:.2f}, "
          f"vs torch DDP {rounds['native_vs_torch_ddp']:.2f}, efficiency "
          f"{rounds['efficiency']:.2f}")
    epochs = native["epochs"]
    steps = sum(e["steps"] - SKIP_STEPS for e in epochs)
    per_step = {key: sum(e[key] for e in epochs) / steps * 1e3 for key in (
        "mean_worker_compute_s", "compute_s", "wait_s", "sync_s")}
    print(f"  native {cores}p per step: a worker's compute {per_step['mean_worker_compute_s']:.1f}"
          f" ms on average, the slowest worker's {per_step['compute_s']:.1f} ms, then wait "
          f"{per_step['wait_s']:.1f} ms and sync {per_step['sync_s']:.1f} ms")
    if not np.isnan(summary["host_ceiling"]):  # the ceiling ran
        print(f"  host ceiling for the efficiency ({cores}p independent, nothing exchanged): "
              f"{summary['host_ceiling']:.2f}; the engine keeps "
              f"{summary['share_of_host_ceiling']:.0%} of it (per-round median "
              f"{rounds['share_of_host_ceiling']:.0%})")
    starts = ", ".join(f"{label} {seconds:.2f} s" for label, seconds in
                       summary["worker_start_s"].items())
    print(f"  worker pool start (launch to every worker ready): {starts}")
    _print_bursts(summary["paired_bursts"])
    print()


def _print_bursts(bursts):
    if not bursts["rounds"]:
        return
    ratios = bursts["ratios"]

    def figure(name, ceiling=None):
        r = ratios[name]
        if np.isnan(r["median"]):
            return "not run"
        text = f"{r['median']:.2f} [{r['q25']:.2f}-{r['q75']:.2f}]"
        if ceiling is None or np.isnan(ratios[ceiling]["median"]):
            return text
        return f"{text}, ceiling {ratios[ceiling]['median']:.2f}"

    print(f"  paired bursts ({len(bursts['rounds'])} rounds, every configuration {BURST_STEPS} "
          f"steps in turn; median [quartiles] of each round's own ratios):")
    print(f"    X native vs fit {figure('native_vs_fit', 'ceiling_vs_fit')}; Y vs torch DDP "
          f"{figure('native_vs_torch_ddp', 'ceiling_vs_torch_ddp')}; Z efficiency "
          f"{figure('efficiency', 'host_ceiling')}")
    print(f"    native over the independent processes "
          f"{figure('share_of_host_ceiling')}; native 1 thread vs torch 1 thread "
          f"{figure('native_1_thread_vs_torch_1_thread')}")


if __name__ == "__main__":
    main()
