"""What freezing saves: step time and sync time with most of the parameters frozen, against the
same model with everything trainable, interleaved round by round in one run.

The model is an MLP (64 -> 1024 -> 1024 -> 10, 1.13M parameters); "frozen" keeps the two hidden
layers fixed (99.1% of the values) and trains the 10k-parameter head, as in the first phase of
fine-tuning. The model still computes every gradient (it does not know what is frozen), so
compute is the same; the sync (reduce-scatter of the gradients, optimizer update) covers only
the trainable values. Per step: ``sync_s`` from the processor's results (from the barrier after
compute to the barrier after the update) and ``wall_s``.

    .venv/bin/python benchmarks/freezing.py [--quick]

Last line: ``freezing sync_saved_pct=X step_saved_pct=Y`` (N = usable cores, medians).
"""
import _common  # noqa: F401 - puts the repository root on sys.path
import numpy as np

from _common import CpuLoad, QuietWaiter, log, parse_args, report_cleanup, rotated, write_results
from engine import ParallelBatchProcessor, usable_cores
from models import MLP

SIZES = (64, 1024, 1024, 10)
FROZEN = ["dense_0/*", "dense_2/*"]


def main():
    args = parse_args(__doc__.splitlines()[0])
    cores = usable_cores()
    rounds, steps, batch = (2, 10, 64) if args.quick else (8, 40, 128)
    model = MLP(sizes=SIZES)
    state = model.init_state(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=batch * steps)
    counts = sorted({1, cores})
    configurations = [(n, frozen) for n in counts for frozen in (False, True)]
    quiet, load = QuietWaiter(0 if args.quick else 60), CpuLoad()
    processors, samples = {}, {c: {"sync_s": [], "wall_s": [], "compute_s": []}
                               for c in configurations}
    try:
        for n, frozen in configurations:
            processor = ParallelBatchProcessor(model, num_processes=n, batch_size=batch,
                                               freeze=FROZEN if frozen else None)
            processor.run_parallel(x[:batch * 3], y[:batch * 3], state,
                                   {"learning_rate": 1e-3})  # warm up
            processors[n, frozen] = processor
        for turn in range(rounds):
            quiet.wait()
            for configuration in rotated(configurations, turn):
                _, results = processors[configuration].run_parallel(x, y, state,
                                                                    {"learning_rate": 1e-3})
                for key, values in samples[configuration].items():
                    values.extend(results[key][1:])  # the first step includes the wake-up
            log(f"round {turn + 1}/{rounds} done")
        trainable = {c: processors[c]._work.slots.shape[1] for c in configurations}
    finally:
        for processor in processors.values():
            processor.close()
    measurements = []
    log(f"{'N':>3} {'frozen':>6} {'slot':>9} {'sync median':>12} {'step median':>12} "
        f"{'compute':>9}")
    for (n, frozen), values in samples.items():
        record = dict(num_processes=n, frozen=frozen, slot_values=int(trainable[n, frozen]),
                      num_values=int(state.num_params), steps=len(values["wall_s"]),
                      **{f"{key}_median": float(np.median(v)) for key, v in values.items()},
                      **{f"{key}_p90": float(np.percentile(v, 90)) for key, v in values.items()})
        measurements.append(record)
        log(f"{n:>3} {str(frozen):>6} {record['slot_values']:>9,} "
            f"{record['sync_s_median'] * 1e3:>9.3f} ms {record['wall_s_median'] * 1e3:>9.3f} ms "
            f"{record['compute_s_median'] * 1e3:>6.2f} ms")
    cleanup, cpu = report_cleanup(load)
    full = next(m for m in measurements if m["num_processes"] == cores and not m["frozen"])
    part = next(m for m in measurements if m["num_processes"] == cores and m["frozen"])
    sync_saved = 100 * (1 - part["sync_s_median"] / full["sync_s_median"])
    step_saved = 100 * (1 - part["wall_s_median"] / full["wall_s_median"])
    path = write_results("freezing", args, measurements, frozen_patterns=FROZEN, cleanup=cleanup,
                         cpu=cpu, quiet=quiet.report())
    log(f"results written to {path}")
    print(f"freezing sync_saved_pct={sync_saved:.0f} step_saved_pct={step_saved:.0f}")


if __name__ == "__main__":
    main()
