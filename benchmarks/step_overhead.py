"""The engine's own cost per training step: a step's wall time minus its slowest worker's compute.

The model does almost nothing (its loss_and_grads writes nothing into the gradient slot it is
given through ``out=``), so what is left of a step is the engine: shard bookkeeping, the
barriers, the weighted mean and the optimizer update of each worker's slice. Configurations
(P = 1k and 1M parameters, N = 1 .. usable cores) are interleaved round by round in one run.

    .venv/bin/python benchmarks/step_overhead.py [--quick]

Last line: ``step_overhead overhead_us=NN`` (N = usable cores, P = 1k, median over steps).
"""
import _common  # noqa: F401 - puts the repository root on sys.path
import numpy as np

from _common import (CpuLoad, QuietWaiter, log, parse_args, report_cleanup, rotated,
                     write_results)
from engine import NetworkState, ParallelBatchProcessor, usable_cores
from engine.core.state import StateLayout


class IdleModel:
    """P float32 weights, one input feature, two classes; gradients are whatever the slot holds
    (zeros), so a step is pure engine."""

    input_shape, num_outputs = (1,), 2

    def __init__(self, num_values):
        self.num_values = num_values

    def init_state(self, seed):
        layout = StateLayout(weight_shapes=(("w", (self.num_values,)),), theta_shapes=())
        return NetworkState.from_buffer(layout, np.zeros(self.num_values, np.float32))

    def loss_and_grads(self, state, x, y, *, out=None):
        if out is None:
            return 0.6931, {"w": np.zeros(self.num_values, np.float32)}
        return 0.6931, out

    def predict(self, state, x):
        return np.full((len(x), 2), 0.5, np.float32)


def measure(processor, state, x, y, steps_per_pass):
    """Per-step overhead (s) of one pass: wall time minus the slowest worker's compute."""
    _, results = processor.run_parallel(x, y, state, {"learning_rate": 1e-3})
    overhead = results["wall_s"] - results["compute_s"]
    return overhead[1:]  # the first step of a pass includes the owner's wake-up of the workers


def main():
    args = parse_args(__doc__.splitlines()[0])
    cores = usable_cores()
    sizes = (1_000, 1_000_000)
    counts = list(range(1, cores + 1))
    rounds, steps = (2, 50) if args.quick else (8, 400)
    batch = 2 * cores
    x = np.zeros((batch * steps, 1), np.float32)
    y = np.zeros(batch * steps, np.int64)
    quiet, load = QuietWaiter(0 if args.quick else 60), CpuLoad()
    configurations = [(p, n) for p in sizes for n in counts]
    processors, states, overheads = {}, {}, {c: [] for c in configurations}
    try:
        for p, n in configurations:
            model = IdleModel(p)
            processors[p, n] = ParallelBatchProcessor(model, num_processes=n, batch_size=batch,
                                                      optimizer="sgd")
            states[p, n] = model.init_state(0)
            measure(processors[p, n], states[p, n], x[:batch * 4], y[:batch * 4], 4)  # warm up
        for turn in range(rounds):
            quiet.wait()
            for configuration in rotated(configurations, turn):
                overheads[configuration].extend(
                    measure(processors[configuration], states[configuration], x, y, steps))
            log(f"round {turn + 1}/{rounds} done")
    finally:
        for processor in processors.values():
            processor.close()
    measurements = []
    log(f"{'P':>10} {'N':>3} {'median':>10} {'p99':>10}")
    for (p, n), values in overheads.items():
        values = np.asarray(values) * 1e6
        record = dict(num_values=p, num_processes=n, steps=len(values),
                      median_us=float(np.median(values)), p99_us=float(np.percentile(values, 99)))
        measurements.append(record)
        log(f"{p:>10,} {n:>3} {record['median_us']:>8.1f}us {record['p99_us']:>8.1f}us")
    cleanup, cpu = report_cleanup(load)
    headline = next(m for m in measurements if m["num_values"] == 1_000 and
                    m["num_processes"] == cores)
    path = write_results("step_overhead", args, measurements, target_us=30, cleanup=cleanup,
                         cpu=cpu, quiet=quiet.report())
    log(f"results written to {path}")
    print(f"step_overhead overhead_us={headline['median_us']:.0f}")


if __name__ == "__main__":
    main()
