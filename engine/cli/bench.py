"""``engine bench sync|scaling|step``: measure the engine on this machine, with your model.

    python -m engine bench sync                       # averaging time against the memcpy floor
    python -m engine bench scaling --model cnn1d      # samples/s and efficiency, 1..cores
    python -m engine bench step --model mlp --model-arg hidden=1024,256 --input-shape 784

Each prints a table and writes ``DIR/KIND.json`` (every figure, the machine, the command) and
``DIR/KIND.png`` (``--output-dir``, default ``bench/``). Data is synthetic, of the model's input
shape: the timings do not depend on the values. Other processes on the machine distort them:
run it on a quiet machine, and compare only figures of one run.
"""
import datetime
import json
import os
import platform
import shlex
import sys

__all__ = ["add_bench_command", "run_bench"]

KINDS = ("sync", "scaling", "step")


def add_bench_command(commands):
    """Register ``bench`` on the CLI's subparsers."""
    command = commands.add_parser(
        "bench", help="measure sync overhead, scaling and step time on this machine",
        description="Measure the engine on this machine and model: 'sync' (averaging time "
        "against the memory-copy floor), 'scaling' (training samples/s and parallel efficiency "
        "at 1..N processes), 'step' (compute / sync / wait per step). Prints a table, writes "
        "JSON and a PNG plot.")
    command.add_argument("kind", choices=KINDS, help="what to measure")
    command.add_argument("--model", default="cnn1d", metavar="NAME",
                         help="registered model, see 'engine models' (default: cnn1d)")
    command.add_argument("--model-arg", action="append", metavar="K=V", dest="model_args",
                         help="model argument, repeatable, e.g. hidden=256,128")
    command.add_argument("--input-shape", metavar="D[,D]", help="shape of one example, e.g. 40 "
                         "or 128,13 (default: the model's own default, else 40)")
    command.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    command.add_argument("--batch-size", type=int, default=100, help="global batch (default 100)")
    command.add_argument("--examples", type=int, default=None, help="synthetic examples per "
                         "epoch (default: 40 batches; 10 with --quick)")
    command.add_argument("--workers", type=int, help="largest process count (default: every "
                         "usable core)")
    command.add_argument("--sizes", metavar="P[,P]", help="sync: float32 values to average "
                         "(default 100000,1000000,4000000,16000000, plus the model's size)")
    command.add_argument("--output-dir", default="bench", metavar="DIR",
                         help="where KIND.json and KIND.png go (default: bench/)")
    command.add_argument("--quick", action="store_true", help="few rounds: seconds, not minutes "
                         "(for a first look; noisier)")
    return command


def run_bench(kind, *, model="cnn1d", model_args=None, input_shape=None, classes=10,
              batch_size=100, examples=None, workers=None, sizes=None, output_dir="bench",
              quick=False, out=None):
    """Run one measurement, print its table, write its JSON and PNG; returns the JSON document.

    Raises:
        ValueError: for a bad kind, model, shape or count.
    """
    from engine.cli.benchmarking import runs
    from engine.cli.benchmarking.plots import plot
    from engine.parallel.system import usable_cores
    out = out or sys.stdout
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}. Received: {kind!r}.")
    for name, value in (("classes", classes), ("batch_size", batch_size),
                        ("examples", examples or 1), ("workers", workers or 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int. Received: {name}={value!r}.")
    cores = workers or usable_cores()
    counts = list(range(1, cores + 1))
    log = _logger(out)
    built, arguments, shape = _build_model(model, model_args, input_shape, classes)
    num_values = built.init_state(0).num_params
    if batch_size < cores:
        raise ValueError(f"batch_size must be at least the largest process count ({cores}). "
                         f"Received: batch_size={batch_size}. Use --batch-size {cores} or more.")
    print(f"bench {kind}: {model} {arguments} ({num_values:,} values), up to {cores} processes "
          f"(usable cores {usable_cores()}){', quick' if quick else ''}", file=out, flush=True)
    if kind == "sync":
        chosen = _sizes(sizes) if sizes else sorted(set(runs.SYNC_SIZES) | {num_values})
        record = runs.measure_sync(sizes=chosen, num_processes=cores, rounds=2 if quick else 10,
                                   repeats=3 if quick else 5, log=log)
        record["model_num_values"] = num_values
    else:
        x, y = _synthetic(shape, classes, examples or batch_size * (10 if quick else 40))
        if kind == "scaling":
            record = runs.measure_scaling(built, x, y, batch_size=batch_size, process_counts=counts,
                                          rounds=2 if quick else 5, log=log)
        else:
            record = runs.measure_step(built, x, y, batch_size=batch_size,
                                       process_counts=sorted({1, cores}),
                                       steps=10 if quick else 40, log=log)
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, f"{kind}.json")
    png_path = os.path.join(output_dir, f"{kind}.png")
    document = {"benchmark": f"engine bench {kind}", "quick": bool(quick), "model": model,
                "model_args": _jsonable(arguments), "input_shape": list(shape),
                "num_values": num_values, "machine": _machine(), "results": record}
    with open(json_path, "w") as f:
        json.dump(document, f, indent=1, default=_jsonable)
        f.write("\n")
    plot(kind, record, png_path, title=f"engine bench {kind}: {model} ({num_values:,} values), "
         f"{document['machine']['usable_cores']} usable cores, {document['machine']['cpu_model']}")
    _print_table(kind, record, out)
    print(f"results: {json_path}, plot: {png_path}", file=out, flush=True)
    return document


def _build_model(name, model_args, input_shape, classes):
    from engine.cli.config import build_model, parse_model_args
    arguments = parse_model_args(model_args) if isinstance(model_args, (list, tuple, type(None))) \
        else dict(model_args)
    if input_shape is not None:
        shape = _sizes(input_shape) if isinstance(input_shape, str) else tuple(input_shape)
    else:
        shape = _default_input_shape(name, arguments)
    model, resolved = build_model(name, arguments, tuple(int(d) for d in shape), classes)
    return model, resolved, tuple(int(d) for d in model.input_shape)


def _default_input_shape(name, arguments):
    """The input shape the model has with these arguments and its defaults, else (40,)."""
    from models import get_model
    try:
        shape = getattr(get_model(name, **arguments), "input_shape", None)
    except (TypeError, ValueError):  # e.g. mlp needs its sizes from the data
        shape = None
    return tuple(shape) if shape else (40,)


def _sizes(text):
    try:
        values = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"expected comma-separated positive ints. Received: {text!r}.")
    return values


def _synthetic(shape, classes, rows):
    import numpy as np
    rng = np.random.default_rng(0)
    return (rng.normal(size=(rows,) + tuple(shape)).astype(np.float32),
            rng.integers(0, classes, rows).astype(np.int64))


def _logger(out):
    import time
    began = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - began:6.1f}s] {message}", file=out, flush=True)
    return log


def _print_table(kind, record, out):
    print("", file=out)
    if kind == "sync":
        print(f"  {'values (P)':>12} {'sync median':>12} {'floor median':>13} {'ratio':>6}",
              file=out)
        for r in record["sizes"]:
            print(f"  {r['num_values']:>12,} {r['sync_s_median'] * 1e3:>9.3f} ms "
                  f"{r['floor_s_median'] * 1e3:>10.3f} ms {r['ratio_to_floor']:>6.2f}", file=out)
        print("  (sync = averaging + SGD update, as process_batch reports it; floor = N "
              "processes copying the same bytes)", file=out)
    elif kind == "scaling":
        print(f"  {'processes':>9} {'samples/s':>11} {'speedup':>8} {'efficiency':>10} "
              f"{'step':>9} {'sync':>9}", file=out)
        for c in record["configurations"]:
            print(f"  {c['num_processes']:>9} {c['samples_per_s_median']:>11,.0f} "
                  f"{c['speedup']:>7.2f}x {c['parallel_efficiency']:>10.0%} "
                  f"{c['step_wall_s_median'] * 1e3:>6.2f} ms {c['step_sync_s_median'] * 1e3:>6.2f}"
                  " ms", file=out)
        print("  (1 process runs in this process with one BLAS thread: the baseline)", file=out)
        ceiling = record.get("host_ceiling")
        if ceiling:
            print(f"  host ceiling: {ceiling['num_processes']} processes that exchange nothing "
                  f"(the same model, shards and Adam) {ceiling['samples_per_s_median']:,.0f} "
                  f"samples/s,\n  {ceiling['speedup']:.2f}x the baseline; the engine at "
                  f"{ceiling['num_processes']} processes keeps {ceiling['engine_share']:.0%} of "
                  "it (no data-parallel split beats it)", file=out)
    else:
        print(f"  {'processes':>9} {'step':>9} {'compute':>9} {'sync':>9} {'wait':>9} "
              f"{'other':>9} {'sync %':>7} {'samples/s':>10}", file=out)
        for c in record["configurations"]:
            print(f"  {c['num_processes']:>9} " + " ".join(
                f"{c[f'{key}_median'] * 1e3:>6.2f} ms" for key in
                ("wall_s", "compute_s", "sync_s", "wait_s", "other_s"))
                + f" {c['sync_fraction']:>7.1%} {c['samples_per_s']:>10,.0f}", file=out)
    print("", file=out)


def _machine():
    from engine.parallel.system import usable_cores
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), None)
    except OSError:
        pass
    import numpy
    return {"usable_cores": usable_cores(), "cpu_count": os.cpu_count(),
            "cpu_model": cpu or platform.processor() or "unknown CPU",
            "python": platform.python_version(), "numpy": numpy.__version__,
            "platform": platform.platform(), "command": shlex.join(sys.argv),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "load_average": list(os.getloadavg())}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value
