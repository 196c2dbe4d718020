"""Where a native model's training step goes: forward and backward time of every layer, one thread.

    .venv/bin/python benchmarks/layer_times.py [--quick] [--model imu_cnn_bilstm] [--batch 32]
                                               [--python-loops] [--parts]

Runs ``loss_and_grads`` of a native zoo model (default: the reference ``imu_cnn_bilstm``, at the
32-example shard a worker gets of the global batch of 64 on 2 cores) in this process, as a worker
runs it: BLAS limited to one thread, freed memory kept for reuse (``keep_freed_memory``). Each
layer's ``forward`` and ``backward`` are timed through wrappers on the layer objects (a few
microseconds per call; the table's last line compares their sum with the whole step).

``--parts`` also splits the recurrent layers' time: their compiled time loops (the per-timestep
products and gate kernels, forward and backward) and the backward's GEMMs over all timesteps
(weight and input gradients); the rest of a recurrent layer is mainly its forward's input
projection. It times module functions the layers call, so it needs the compiled loops.

Headline (last line): ``layer_times step_ms=X.X top=NAME:Y.Y``: median step time and the layer
with the largest forward + backward time.
"""
import _common  # noqa: F401 - first: puts the repository root on sys.path

import collections
import importlib
import time

import numpy as np

from _common import QuietWaiter, log, parse_args, warm_native_step, write_results
from engine.parallel.system import keep_freed_memory, limit_threads

REPEATS, QUICK_REPEATS = 20, 2


def timed_layers(model):
    """Wrap each layer's forward/backward with timers; returns {node: {"forward": [], ...}}."""
    seconds = collections.defaultdict(lambda: {"forward": 0.0, "backward": 0.0})
    nodes = getattr(model, "nodes", None)
    if nodes is None:  # a Sequential: its layers in order, named by position and kind
        nodes = [(f"{index}_{layer.kind}", layer, None) for index, layer in enumerate(model.layers)]
    for name, layer, _ in nodes:
        for method in ("forward", "backward"):
            setattr(layer, method, _timer(getattr(layer, method), seconds[name], method))
    return seconds


def _timer(function, totals, key):
    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - began
    return timed


# (module, function, label) of what --parts times; both loop kinds share a label.
_PARTS = (("models.layers._recurrent_loops", "lstm_forward", "time loop, forward"),
          ("models.layers._recurrent_loops", "gru_forward", "time loop, forward"),
          ("models.layers._recurrent_loops", "lstm_backward", "time loop, backward"),
          ("models.layers._recurrent_loops", "gru_backward", "time loop, backward"),
          ("models.layers.recurrent", "_input_and_weight_grads", "all-timestep gradient GEMMs"))


def timed_parts():
    """Wrap the recurrent layers' parts (``_PARTS``) with timers; returns {label: seconds}, in the
    order the parts first run."""
    seconds = collections.defaultdict(float)
    for module_name, function, label in _PARTS:
        module = importlib.import_module(module_name)
        setattr(module, function, _timer(getattr(module, function), seconds, label))
    return seconds


def main():
    def options(parser):
        parser.add_argument("--model", default="imu_cnn_bilstm", help="a native zoo model name")
        parser.add_argument("--batch", type=int, default=32, help="examples per step (32)")
        parser.add_argument("--parts", action="store_true",
                            help="also time the recurrent layers' time loops and gradient GEMMs")
        parser.add_argument("--python-loops", action="store_true",
                            help="run the recurrent layers' time loops in Python instead of "
                                 "compiled (to measure what compiling them gains)")
    args = parse_args(__doc__.splitlines()[0], options)
    if args.parts and args.python_loops:
        raise SystemExit("layer_times: --parts times the compiled time loops; it cannot be used "
                         "with --python-loops. Drop one of the two.")
    limit = limit_threads(1)  # noqa: F841 - as in a worker: the limit lasts while it lives
    keep_freed_memory()
    from models.layers import recurrent
    recurrent.COMPILED_LOOPS = not args.python_loops
    model, state, x, y = warm_native_step(args.model, args.batch)
    QuietWaiter(0.0 if args.quick else 60.0).wait()
    seconds = timed_layers(model)
    parts = timed_parts() if args.parts else {}
    repeats = QUICK_REPEATS if args.quick else REPEATS
    steps = []
    for _ in range(repeats):
        began = time.perf_counter()
        model.loss_and_grads(state, x, y)
        steps.append(time.perf_counter() - began)
    step_ms = 1e3 * float(np.median(steps))
    layers = {name: {key: 1e3 * value / repeats for key, value in times.items()}
              for name, times in seconds.items()}
    ranked = sorted(layers.items(), key=lambda item: -sum(item[1].values()))
    log(f"{args.model}, batch {args.batch}, one thread, {repeats} steps")
    print(f"  {'layer':<22} {'forward':>10} {'backward':>10} {'share':>7}")
    for name, times in ranked:
        total = times["forward"] + times["backward"]
        print(f"  {name:<22} {times['forward']:>8.2f} ms {times['backward']:>7.2f} ms "
              f"{total / step_ms:>6.0%}")
    covered = sum(sum(times.values()) for times in layers.values())
    print(f"  step {step_ms:.2f} ms (median); the layers' sum {covered:.2f} ms")
    parts = {label: 1e3 * value / repeats for label, value in parts.items()}
    if args.parts:
        print("  recurrent layers, by part (ms per step, share of the step)")
        for label, ms in parts.items():
            print(f"    {label:<32} {ms:>7.2f} ms {ms / step_ms:>6.0%}")
    path = write_results("layer_times", args, dict(step_ms=step_ms, step_s=steps, layers=layers,
                                                    recurrent_parts_ms=parts),
                         model=args.model, batch=args.batch,
                         compiled_loops=not args.python_loops)
    print(f"results: {path}")
    top, times = ranked[0]
    print(f"layer_times step_ms={step_ms:.1f} top={top}:{sum(times.values()):.1f}", flush=True)


if __name__ == "__main__":
    main()
