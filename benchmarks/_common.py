"""Helpers shared by the benchmarks: arguments, progress lines, timing statistics, machine facts,
a check that nothing was left behind, and the JSON results file.

Importing this module puts the repository root on ``sys.path``, so a benchmark run as
``.venv/bin/python benchmarks/NAME.py`` can import ``engine`` and ``models``: import it first.
"""
import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
RESULTS_DIRECTORY = os.path.join(ROOT, "benchmarks", "results")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

_STARTED = time.perf_counter()
# Other processes' load (cores) under which a round counts as quiet: below this, neighbours barely
# touch the timings; above it, a 2-core machine loses a visible part of a core.
QUIET_CORES = 0.25


def parse_args(description, configure=None):
    """Parse ``--quick`` and ``--out`` plus whatever ``configure(parser)`` adds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="few repeats, for a smoke test (well under a minute)")
    parser.add_argument("--out", default=None,
                        help="JSON results path (default: benchmarks/results/NAME.json)")
    if configure is not None:
        configure(parser)
    return parser.parse_args()


def log(message):
    """A progress line stamped with the seconds since the benchmark started."""
    print(f"[{time.perf_counter() - _STARTED:6.1f}s] {message}", flush=True)


def summarize(seconds):
    """Median, p10, p90, min, mean and count of a list of durations (seconds)."""
    values = np.asarray(seconds, dtype=np.float64)
    if values.size == 0:
        return dict(count=0)
    return dict(count=int(values.size), median_s=float(np.median(values)),
                p10_s=float(np.percentile(values, 10)), p90_s=float(np.percentile(values, 90)),
                min_s=float(values.min()), mean_s=float(values.mean()))


def format_seconds(seconds):
    """``0.000123`` -> ``"123.0 us"``: durations from microseconds to seconds, readable."""
    if not math.isfinite(seconds):
        return str(seconds)
    for scale, unit in ((1.0, "s"), (1e-3, "ms")):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.2f} {unit}"
    return f"{seconds * 1e6:.1f} us"


def rotated(items, turn):
    """``items`` rotated left by ``turn``: round r of an alternation starts with a different item,
    so a slow drift (memory bandwidth, a neighbour's load) does not always hit the same one."""
    items = list(items)
    turn %= len(items)
    return items[turn:] + items[:turn]


class CpuLoad:
    """CPU time other processes used since this was made: a neighbour's load distorts timings.

    Busy time of the whole machine (psutil) minus ours: this process, its reaped children
    (``os.times``) and its live children (psutil), so worker pools may be running or joined.
    """

    def __init__(self):
        self._wall, self._machine, self._ours = time.perf_counter(), self._busy(), self._own()
        self.load_average_start = os.getloadavg()

    @staticmethod
    def _busy():
        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        return sum(times) - idle, getattr(times, "steal", 0.0)

    @staticmethod
    def _own():
        times = os.times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in psutil.Process().children(recursive=True):
            try:
                child_times = child.cpu_times()
            except psutil.Error:  # exited between the listing and the query
                continue
            total += child_times.user + child_times.system
        return total

    def other_cores(self):
        """Cores' worth of CPU other processes used since this was made (0.0 = none)."""
        wall = time.perf_counter() - self._wall
        others = (self._busy()[0] - self._machine[0]) - (self._own() - self._ours)
        return max(0.0, others / wall) if wall > 0 else 0.0

    def report(self):
        wall = time.perf_counter() - self._wall
        (busy, steal), ours = self._busy(), self._own()
        machine_s = busy - self._machine[0]
        ours_s = ours - self._ours
        others_s = max(0.0, machine_s - ours_s)
        return dict(wall_s=wall, machine_busy_cpu_s=machine_s, our_cpu_s=ours_s,
                    other_processes_cpu_s=others_s, other_processes_cores=others_s / wall,
                    steal_cpu_s=steal - self._machine[1],
                    load_average_start=list(self.load_average_start),
                    load_average_end=list(os.getloadavg()))


class QuietWaiter:
    """Before a measurement round, wait (within a total budget) until other processes leave the
    cores alone: on a shared machine a neighbour's test run can halve a configuration's rate.

    ``wait()`` returns the other processes' load (cores) in its last window; ``waited_s`` is the
    total spent waiting. A budget of 0 never waits (``--quick``).
    """

    def __init__(self, budget_s, threshold_cores=QUIET_CORES, window_s=0.2):
        self.budget_s, self.threshold_cores, self.window_s = budget_s, threshold_cores, window_s
        self.waited_s, self.busy_rounds = 0.0, 0

    def wait(self):
        if self.budget_s <= 0:
            return None
        announced = False
        while True:
            load = CpuLoad()
            time.sleep(self.window_s)
            others = load.other_cores()
            self.waited_s += self.window_s
            if others < self.threshold_cores:
                return others
            if self.waited_s >= self.budget_s:
                self.busy_rounds += 1
                return others
            if not announced:
                log(f"  other processes are using {others:.2f} cores; waiting for them to settle "
                    f"({self.budget_s - self.waited_s:.0f} s of waiting budget left)")
                announced = True

    def report(self):
        return dict(budget_s=self.budget_s, threshold_cores=self.threshold_cores,
                    waited_s=self.waited_s, rounds_started_busy=self.busy_rounds)


def warm_native_step(model_name, batch):
    """A native zoo model, its seed-0 state and a random batch ``(model, state, x, y)``, after
    three training steps (compiled, buffers faulted in): what a worker's step runs on."""
    import models
    model = models.get_model(model_name)
    state = model.init_state(seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *model.input_shape)).astype(np.float32)
    y = rng.integers(0, model.num_outputs, batch)
    for _ in range(3):
        model.loss_and_grads(state, x, y)
    return model, state, x, y


def leftovers():
    """Engine blocks in /dev/shm (any owner) and live child processes of ours, after cleanup."""
    from engine.parallel.shm import blocks_of
    children = [child for child in psutil.Process().children(recursive=True)
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    gone, alive = psutil.wait_procs(children, timeout=5)
    return dict(shm_blocks=blocks_of(None), our_shm_blocks=blocks_of(os.getpid()),
                live_children=[child.pid for child in alive])


def report_cleanup(load):
    """Log what was left behind and how busy other processes kept the machine; returns
    ``(leftovers, cpu_report)`` for the JSON."""
    cleanup = leftovers()
    cpu = load.report()
    clean = not (cleanup["our_shm_blocks"] or cleanup["live_children"])
    log(f"cleanup: our engine blocks in /dev/shm: {cleanup['our_shm_blocks'] or 'none'}; "
        f"live children: {cleanup['live_children'] or 'none'}"
        f"{'' if clean else '  <-- LEFT BEHIND'}")
    if cpu["other_processes_cores"] > 0.1:
        log(f"note: other processes used {cpu['other_processes_cores']:.2f} cores on average "
            "during the run; the timings may be disturbed")
    return cleanup, cpu


def machine_facts():
    """What the numbers depend on: cores, CPU, BLAS, library versions, commit, time, command."""
    import numba
    import threadpoolctl

    from engine import usable_cores
    from engine.cli.system_report import blas_kernel_warning
    blas = [{key: info.get(key) for key in ("internal_api", "version", "num_threads",
                                            "architecture", "threading_layer")}
            for info in threadpoolctl.threadpool_info()]
    now = datetime.datetime.now(datetime.timezone.utc)
    return dict(usable_cores=usable_cores(), cpu_count=os.cpu_count(), cpu_model=_cpu_model(),
                memory_bytes=psutil.virtual_memory().total, blas=blas,
                blas_held_back=blas_kernel_warning(),  # None, or why the GEMMs run slow here
                python=platform.python_version(), numpy=np.__version__, numba=numba.__version__,
                threadpoolctl=threadpoolctl.__version__, platform=platform.platform(),
                git_commit=_git_commit(),
                timestamp=now.isoformat(timespec="seconds"),
                command=shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
                working_directory=os.getcwd())


def write_results(name, args, measurements, **extra):
    """Write ``{benchmark, quick, machine, **extra, measurements}`` as JSON; returns the path."""
    path = args.out or os.path.join(RESULTS_DIRECTORY, f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    machine = machine_facts()
    if machine["blas_held_back"]:  # the native figures are those of the older kernels
        log(f"note: {machine['blas_held_back']} This run's native figures are those of the "
            "older kernels.")
    document = dict(benchmark=name, quick=bool(args.quick), machine=machine, **extra,
                    measurements=measurements)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(document, f, indent=1, default=_to_json)
        f.write("\n")
    os.replace(temporary, path)
    relative = os.path.relpath(path)
    return os.path.abspath(path) if relative.startswith("..") else relative


def _to_json(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit():
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{'-dirty' if dirty else ''}" if head else None
