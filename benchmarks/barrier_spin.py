"""How long a waiting worker should poll before it sleeps: the scaling workloads at several spins.

    .venv/bin/python benchmarks/barrier_spin.py [--quick] [--spins-us 0,50,300,1000]

A worker bound to a core of its own polls the barrier for ``ENGINE_BARRIER_SPIN_US`` (default
300 µs) before it sleeps in the kernel (``engine/parallel/barrier.py``). This runs the two
workloads of ``benchmarks/scaling.py`` (the MLP at batch 256 and the MNIST-1D CNN at batch 100)
on every usable core, one processor (and worker pool) per spin, kept alive for the whole run; after
a warm-up epoch each, they take turns epoch by epoch, each round starting with a different one, so
a change in the host's speed hits all alike. Each configuration's rate is compared with the
first spin's (the reference) round by round.

Headline (last line): ``barrier_spin mlp_gain=X.XX cnn_gain=X.XX``: the default spin's samples/s
over the reference spin's (50 µs unless ``--spins-us`` starts with another), median of the
per-round ratios.
"""
import _common  # noqa: F401 - first: puts the repository root on sys.path

import os
import time

import numpy as np

from _common import (CpuLoad, QuietWaiter, log, parse_args, report_cleanup, rotated,
                     write_results)
from engine import usable_cores
from engine.parallel.barrier import DEFAULT_SPIN_S, SPIN_VARIABLE
from scaling import _QUIET_BUDGET_S, _SETTLE_S, WORKLOADS, Runner, build

DEFAULT_SPINS_US = (50, 0, 300, 1000)


def _spin_runner(spin_us, cores, model, batch_size, examples, labels):
    """A processor whose workers poll ``spin_us`` (the processor reads the variable when it is
    made), after its warm-up epoch (which starts the workers)."""
    previous = os.environ.get(SPIN_VARIABLE)
    os.environ[SPIN_VARIABLE] = str(spin_us)
    try:
        runner = Runner(f"spin {spin_us} us", cores, 1, model, batch_size)
    finally:
        if previous is None:
            os.environ.pop(SPIN_VARIABLE, None)
        else:
            os.environ[SPIN_VARIABLE] = previous
    runner.epoch(examples, labels)
    return runner


def measure_workload(name, spec, spins_us, cores, quick, quiet):
    rows = spec["quick_rows"] if quick else spec["rows"]
    model, examples, labels = build(name, rows)
    num_epochs = 2 if quick else 2 * spec["epochs"]
    runners, per_spin = [], {spin: [] for spin in spins_us}
    try:
        for spin in spins_us:
            runners.append((spin, _spin_runner(spin, cores, model, spec["batch_size"], examples,
                                               labels)))
        for turn in range(num_epochs):
            quiet.wait()
            rates = {}
            for spin, runner in rotated(runners, turn):
                time.sleep(_SETTLE_S)
                record = runner.epoch(examples, labels)
                per_spin[spin].append(dict(samples_per_s=record["samples_per_s"],
                                           compute_s=float(np.mean(record["compute_s"])),
                                           wait_s=float(np.mean(record["wait_s"])),
                                           sync_s=float(np.mean(record["sync_s"]))))
                rates[spin] = record["samples_per_s"]
            log(f"{name}: round {turn + 1}/{num_epochs}  "
                + "  ".join(f"{spin} us: {rate:,.0f}/s" for spin, rate in rates.items()))
    finally:
        for _, runner in runners:
            runner.close()
    reference = np.array([r["samples_per_s"] for r in per_spin[spins_us[0]]])
    summaries = []
    for spin in spins_us:
        epochs = per_spin[spin]
        rates = np.array([r["samples_per_s"] for r in epochs])
        summaries.append(dict(
            spin_us=spin, samples_per_s_median=float(np.median(rates)),
            ratio_to_reference_median=float(np.median(rates / reference)),
            compute_s_median=float(np.median([r["compute_s"] for r in epochs])),
            wait_s_median=float(np.median([r["wait_s"] for r in epochs])),
            sync_s_median=float(np.median([r["sync_s"] for r in epochs])), epochs=epochs))
    print(f"\n{name}: {cores} processes, batch {spec['batch_size']}, {num_epochs} rounds")
    print(f"  {'spin':>8}  {'samples/s':>10}  {'vs ' + str(spins_us[0]) + ' us':>9}  "
          f"{'compute':>10}  {'wait':>8}  {'sync':>8}  (per-step means, medians over rounds)")
    for s in summaries:
        print(f"  {s['spin_us']:>5} us  {s['samples_per_s_median']:>10,.0f}  "
              f"{s['ratio_to_reference_median']:>8.3f}x  {s['compute_s_median'] * 1e6:>7.0f} us"
              f"  {s['wait_s_median'] * 1e6:>5.0f} us  {s['sync_s_median'] * 1e6:>5.0f} us")
    return dict(workload=name, model=repr(model), batch_size=spec["batch_size"],
                processes=cores, rounds=num_epochs, reference_spin_us=spins_us[0],
                configurations=summaries)


def _spins(text):
    spins = [int(part) for part in text.split(",") if part.strip()]
    if not spins or any(spin < 0 for spin in spins):
        raise SystemExit(f"--spins-us takes microseconds >= 0 separated by commas. "
                         f"Received: {text!r}.")
    return spins


def main():
    args = parse_args(__doc__.splitlines()[0], lambda parser: parser.add_argument(
        "--spins-us", default=",".join(map(str, DEFAULT_SPINS_US)),
        help="spins to compare, microseconds; the first is the reference (default %(default)s)"))
    spins_us = _spins(args.spins_us)
    default_us = int(round(DEFAULT_SPIN_S * 1e6))
    if default_us not in spins_us:
        spins_us.append(default_us)
    cores = usable_cores()
    if cores < 2:
        log("barrier_spin: one usable core, so no worker spins; the spins are all the same here")
    load = CpuLoad()
    quiet = QuietWaiter(0.0 if args.quick else _QUIET_BUDGET_S)
    records = {name: measure_workload(name, spec, spins_us, max(2, cores), args.quick, quiet)
               for name, spec in WORKLOADS.items()}
    cleanup, cpu = report_cleanup(load)
    gains = {name: next(s["ratio_to_reference_median"] for s in r["configurations"]
                        if s["spin_us"] == default_us) for name, r in records.items()}
    headline = {f"{name}_gain": gain for name, gain in gains.items()}
    path = write_results("barrier_spin", args, records, cleanup=cleanup, cpu_load=cpu,
                         quiet_wait=quiet.report(), default_spin_us=default_us,
                         headline=headline)
    print(f"results: {path}")
    print(f"barrier_spin mlp_gain={gains['mlp']:.2f} cnn_gain={gains['cnn']:.2f}", flush=True)
    if cleanup["our_shm_blocks"] or cleanup["live_children"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
