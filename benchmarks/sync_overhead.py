"""How long averaging P float32 values across N worker processes takes, against a memcpy floor.

    .venv/bin/python benchmarks/sync_overhead.py [--quick] [--workers N]

What is timed, for each P:
* engine: ``processor._executor.run(REDUCE)`` on a live ``ParallelBatchProcessor`` as the owner sees
  it: one opcode down each pipe, every worker's ``weighted_mean_into`` over its slice of the N
  gradient slots, one answer back from each. The model is a stub with P weights whose gradients
  cost nothing, so nothing but the averaging is measured. Also the ``sync_s`` that
  ``process_batch`` reports (reduce + SGD update), for context.
* floor: N forked processes doing what the average has to do to memory and nothing else. The
  average reads N*P and writes P float32, the traffic of copying (N+1)/2*P float32; each process
  ``np.copyto``'s its 1/N share of that between two buffers in one ``SharedBlock``, started and
  awaited with the engine's own messages (one byte each way, a blocking poll), so the ratio
  isolates the averaging. Reported twice: as the owner sees it, and the slowest worker's copy
  alone. A zero-byte round trip gives the signalling cost by itself.
Engine and floor alternate in rounds (engine first in even rounds, floor first in odd ones): the
memory bandwidth of the machine drifts within minutes and must hit both alike.

Headline (last line): ``sync_overhead worst_ratio_to_floor=X.XX``, the largest
engine_reduce_median / floor_median over P >= 1M. The target is 2.
"""
import _common  # noqa: F401 - first: puts the repository root on sys.path

import os
import select
import signal
import time

import multiprocess
import numpy as np

from _common import (QUIET_CORES, CpuLoad, QuietWaiter, format_seconds, log, report_cleanup,
                     parse_args, rotated, summarize, write_results)
from engine import NetworkState, ParallelBatchProcessor, usable_cores
from engine.parallel import worker as ops
from engine.parallel.shm import SharedBlock
from engine.core.sharding import partition
from engine.parallel.worker import receive_message, send_message

SIZES = (100_000, 1_000_000, 4_000_000, 16_000_000)
HEADLINE_MIN_SIZE = 1_000_000
# Per P: warm-up calls of each side, then rounds of `repeats` calls per side and one process_batch.
FULL = dict(rounds=20, repeats=10, warmup=5, quiet_budget_s=60.0)
QUICK = dict(rounds=4, repeats=5, warmup=2, quiet_budget_s=0.0)


class ConstantGradientModel:
    """P weights in one array; ``loss_and_grads`` returns the same gradient at once.

    Module-level and holding only ``num_weights`` so it pickles for any start method.
    """

    input_shape = (1,)
    num_outputs = 2

    def __init__(self, num_weights):
        self.num_weights = int(num_weights)
        self._grads = None

    def __getstate__(self):
        return dict(num_weights=self.num_weights, _grads=None)

    def init_state(self, seed):
        return NetworkState({"w": np.zeros(self.num_weights, np.float32)})

    def loss_and_grads(self, state, x, y, *, rng=None):
        if self._grads is None:  # built once per process, outside the REDUCE being timed
            self._grads = {"w": np.full(self.num_weights, 1e-3, np.float32)}
        return 0.6931, self._grads

    def predict(self, state, x):
        return np.full((len(x), self.num_outputs), 0.5, np.float32)

    def loss(self, state, x, y):
        return 0.6931


# -- the floor: N processes copying their share, signalled like the engine's workers ---------------
_COPY, _PING, _STOP = 1, 2, 3
_OK = 0
_OWNER_CHECK_S = 1.0


def _floor_layout(num_values, num_workers):
    """Byte offsets of (source, destination, per-worker seconds) in the block, and its size."""
    nbytes = num_values * 4
    destination = -(-nbytes // 64) * 64
    seconds = destination + (-(-nbytes // 64) * 64)
    return (0, destination, seconds), seconds + 8 * num_workers


def _copy_worker(worker_id, block_name, num_values, num_workers, command_pipe, answer_pipe):
    """Attach like an engine worker; on each COPY, copy this worker's share and time it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    (source_at, destination_at, seconds_at), size = _floor_layout(num_values, num_workers)
    block = SharedBlock.attach(block_name, size)
    source = block.array((num_values,), np.float32, source_at)
    destination = block.array((num_values,), np.float32, destination_at)
    seconds = block.array((num_workers,), np.float64, seconds_at)
    bounds = partition(num_values, num_workers)
    start, stop = int(bounds[worker_id]), int(bounds[worker_id + 1])
    command_fd, answer_fd = command_pipe.fileno(), answer_pipe.fileno()
    owner = os.getppid()
    send_message(answer_fd, _OK)
    try:
        while True:
            if not select.select([command_fd], [], [], _OWNER_CHECK_S)[0]:
                if os.getppid() != owner:
                    return
                continue
            try:
                op, _ = receive_message(command_fd)
            except (EOFError, OSError):
                return
            if op == _STOP:
                return
            if op == _COPY:
                began = time.perf_counter()
                np.copyto(destination[start:stop], source[start:stop])
                seconds[worker_id] = time.perf_counter() - began
            send_message(answer_fd, _OK)
    finally:
        source = destination = seconds = None
        block.close()


class CopyFloor:
    """``num_workers`` forked processes that each copy 1/N of ``num_values`` float32 on a signal."""

    def __init__(self, num_values, num_workers):
        self.processes, self.commands, self.answers = [], [], []
        (source_at, _, seconds_at), size = _floor_layout(num_values, num_workers)
        self.block = SharedBlock.create("floor", size)
        try:
            self.block.array((num_values,), np.float32, source_at).fill(1.0)
            self.seconds = self.block.array((num_workers,), np.float64, seconds_at)
            context = multiprocess.get_context("fork")
            for worker_id in range(num_workers):
                command_read, command_write = context.Pipe(duplex=False)
                answer_read, answer_write = context.Pipe(duplex=False)
                process = context.Process(
                    target=_copy_worker, name=f"floor-worker-{worker_id}", daemon=True,
                    args=(worker_id, self.block.name, num_values, num_workers, command_read,
                          answer_write))
                process.start()
                command_read.close()
                answer_write.close()
                self.processes.append(process)
                self.commands.append(command_write)
                self.answers.append(answer_read)
            self._poller = select.poll()
            self._owners = {}
            for answer, process in zip(self.answers, self.processes):
                self._owners[answer.fileno()] = False
                self._owners[process.sentinel] = True
                self._poller.register(answer.fileno(), select.POLLIN)
                self._poller.register(process.sentinel, select.POLLIN)
            self._wait_all()
        except BaseException:
            self.close()
            raise

    def run(self, op=_COPY):
        """Signal every worker, wait for all; returns (seconds seen here, slowest worker's copy)."""
        began = time.perf_counter()
        for command in self.commands:
            send_message(command.fileno(), op)
        self._wait_all()
        return time.perf_counter() - began, float(self.seconds.max())

    def _wait_all(self):
        pending = len(self.processes)
        while pending:
            for fd, _ in self._poller.poll():
                if self._owners[fd]:
                    raise RuntimeError("a floor worker died; see its stderr above")
                receive_message(fd)
                pending -= 1

    def close(self):
        for command in self.commands:
            try:
                send_message(command.fileno(), _STOP)
            except (OSError, ValueError):
                pass
        for process in self.processes:
            process.join(3.0)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self.commands + self.answers:
            connection.close()
        self.processes, self.commands, self.answers = [], [], []
        self.seconds = None
        self.block.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# -- one size ------------------------------------------------------------------------------------
def measure_size(num_values, num_workers, plan, quiet):
    """Alternating rounds of engine REDUCE and floor copies for one P; returns the record."""
    model = ConstantGradientModel(num_values)
    state = model.init_state(seed=0)
    x = np.zeros((num_workers, 1), np.float32)
    y = np.zeros(num_workers, np.int64)
    params = {"learning_rate": 1e-3}
    floor_values = -(-(num_workers + 1) * num_values // 2)
    reduce_s, floor_s, floor_in_worker_s, signal_s = [], [], [], []
    round_ratios = []  # per round, engine median / floor median: paired, so immune to slow drift
    round_others = []  # other processes' load (cores) during each round
    steps = dict(sync_s=[], compute_s=[], wall_s=[])
    with ParallelBatchProcessor(model, num_processes=num_workers, batch_size=num_workers,
                                optimizer="sgd") as processor, \
            CopyFloor(floor_values, num_workers) as floor:
        processor.process_batch(x, y, state, params)  # starts the pool, fills the slots
        executor = processor._executor
        processor._work.coefficients[:] = 1.0 / num_workers  # what the standalone REDUCE weighs

        def engine_reduce():
            began = time.perf_counter()
            executor.run(ops.REDUCE)
            return time.perf_counter() - began

        for _ in range(plan["warmup"]):  # page faults in every process's fresh mappings
            engine_reduce()
            floor.run()
            floor.run(_PING)
        for turn in range(plan["rounds"]):
            quiet.wait()
            load = CpuLoad()
            for side in rotated(("engine", "floor"), turn):
                for _ in range(plan["repeats"]):
                    if side == "engine":
                        reduce_s.append(engine_reduce())
                    else:
                        seen, in_worker = floor.run()
                        floor_s.append(seen)
                        floor_in_worker_s.append(in_worker)
                        signal_s.append(floor.run(_PING)[0])
            round_others.append(load.other_cores())
            last = slice(-plan["repeats"], None)
            round_ratios.append(float(np.median(reduce_s[last]) / np.median(floor_s[last])))
            _, step = processor.process_batch(x, y, state, params)
            for key in steps:
                steps[key].append(float(step[key]))
    reduce, floor_stats = summarize(reduce_s), summarize(floor_s)
    # The same ratio over only the rounds no other process disturbed (each side appended
    # ``repeats`` samples per round, in round order).
    quiet_turns = [turn for turn, others in enumerate(round_others) if others < QUIET_CORES]
    if quiet_turns:
        pick = [turn * plan["repeats"] + i for turn in quiet_turns for i in range(plan["repeats"])]
        quiet_ratio = float(np.median(np.take(reduce_s, pick)) / np.median(np.take(floor_s, pick)))
    else:
        quiet_ratio = None
    traffic = (num_workers + 1) * num_values * 4  # bytes read + written, same for both sides
    return dict(
        num_values=num_values, num_workers=num_workers, floor_values_copied=floor_values,
        traffic_bytes=traffic, engine_reduce=reduce, floor=floor_stats,
        floor_in_worker=summarize(floor_in_worker_s), signal_round_trip=summarize(signal_s),
        process_batch={key: summarize(values) for key, values in steps.items()},
        ratio_to_floor=reduce["median_s"] / floor_stats["median_s"],
        round_ratio_median=float(np.median(round_ratios)), round_ratios=round_ratios,
        round_other_processes_cores=round_others,
        quiet_rounds=dict(count=len(quiet_turns), of=len(round_others), threshold_cores=QUIET_CORES,
                          ratio_to_floor=quiet_ratio),
        ratio_to_floor_in_worker=reduce["median_s"] / float(np.median(floor_in_worker_s)),
        engine_reduce_gb_per_s=traffic / reduce["median_s"] / 1e9,
        floor_gb_per_s=traffic / floor_stats["median_s"] / 1e9,
        samples=dict(engine_reduce_s=reduce_s, floor_s=floor_s,
                     floor_in_worker_s=floor_in_worker_s, signal_round_trip_s=signal_s))


def _quiet_text(quiet):
    if not quiet["count"]:
        return f"no round with other processes below {QUIET_CORES} cores"
    return (f"ratio over the {quiet['count']}/{quiet['of']} quiet rounds "
            f"{quiet['ratio_to_floor']:.2f}")


def _quiet_column(quiet):
    if not quiet["count"]:
        return f"-- (0/{quiet['of']})"
    return f"{quiet['ratio_to_floor']:.2f} ({quiet['count']}/{quiet['of']})"


def main():
    args = parse_args(__doc__.splitlines()[0],
                      lambda parser: parser.add_argument(
                          "--workers", type=int, default=None,
                          help="worker processes (default: usable cores)"))
    num_workers = args.workers or usable_cores()
    plan = QUICK if args.quick else FULL
    load = CpuLoad()
    quiet = QuietWaiter(plan["quiet_budget_s"])
    log(f"sync_overhead: N={num_workers} workers (usable cores {usable_cores()}), "
        f"{plan['rounds']} rounds x {plan['repeats']} repeats per side, P in {SIZES}")
    records = []
    for num_values in SIZES:
        log(f"P={num_values:,}: starting engine pool and floor pool")
        record = measure_size(num_values, num_workers, plan, quiet)
        records.append(record)
        engine, floor = record["engine_reduce"], record["floor"]
        log(f"P={num_values:,}: engine REDUCE median {format_seconds(engine['median_s'])} "
            f"(p90 {format_seconds(engine['p90_s'])}, "
            f"{record['engine_reduce_gb_per_s']:.1f} GB/s) | "
            f"floor median {format_seconds(floor['median_s'])} "
            f"(p90 {format_seconds(floor['p90_s'])}, {record['floor_gb_per_s']:.1f} GB/s; "
            f"in-worker copy {format_seconds(record['floor_in_worker']['median_s'])}; "
            f"signal only {format_seconds(record['signal_round_trip']['median_s'])}) | "
            f"process_batch sync_s {format_seconds(record['process_batch']['sync_s']['median_s'])}")
        log(f"P={num_values:,}: ratio engine/floor = {record['ratio_to_floor']:.2f} "
            f"(median of per-round ratios {record['round_ratio_median']:.2f}; "
            f"vs in-worker copy {record['ratio_to_floor_in_worker']:.2f}; other processes "
            f"{np.mean(record['round_other_processes_cores']):.2f} cores; "
            f"{_quiet_text(record['quiet_rounds'])})")
    cleanup, cpu = report_cleanup(load)
    headline_records = [r for r in records if r["num_values"] >= HEADLINE_MIN_SIZE]
    worst = max(headline_records, key=lambda r: r["ratio_to_floor"])
    path = write_results("sync_overhead", args, records, plan=plan, cleanup=cleanup, cpu_load=cpu,
                         quiet_wait=quiet.report(),
                         headline=dict(worst_ratio_to_floor=worst["ratio_to_floor"],
                                       worst_at_num_values=worst["num_values"], target=2.0))
    print()
    print(f"{'P':>12} {'engine med':>11} {'engine p90':>11} {'floor med':>11} {'floor p90':>11} "
          f"{'in-worker':>11} {'signal':>10} {'step sync':>11} {'ratio':>6} {'quiet rounds':>13}")
    for r in records:
        print(f"{r['num_values']:>12,} {format_seconds(r['engine_reduce']['median_s']):>11} "
              f"{format_seconds(r['engine_reduce']['p90_s']):>11} "
              f"{format_seconds(r['floor']['median_s']):>11} "
              f"{format_seconds(r['floor']['p90_s']):>11} "
              f"{format_seconds(r['floor_in_worker']['median_s']):>11} "
              f"{format_seconds(r['signal_round_trip']['median_s']):>10} "
              f"{format_seconds(r['process_batch']['sync_s']['median_s']):>11} "
              f"{r['ratio_to_floor']:>6.2f} {_quiet_column(r['quiet_rounds']):>13}")
    print(f"results: {path}")
    print(f"sync_overhead worst_ratio_to_floor={worst['ratio_to_floor']:.2f}", flush=True)
    if cleanup["our_shm_blocks"] or cleanup["live_children"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
