"""Inference latency (batch 1, one core) and batch throughput: the engine against Keras and torch.

    .venv/bin/python benchmarks/latency.py [--quick] [--model NAME]

Model: the native reference model ``imu_cnn_bilstm`` (``models.get_model``; inputs (128, 13), 26
classes) when it is registered, else ``cnn1d`` (``--model`` picks another native model). Its
twins: Keras (``model.to_keras(state)`` when the native model has it, so the same weights; else
the same weights copied into a Keras stack for ``mlp``/``cnn1d``, or the ``models.keras_zoo``
builder of the same name with its own weights) and torch when installed (the same architecture,
its own weights: timing only). Configurations, all in this process, one thread each (BLAS via
threadpoolctl, TensorFlow intra/inter-op 1, ``torch.set_num_threads(1)``):

* ``engine Predictor``: ``Predictor(model, state)(x_one)``, what a real-time user calls;
* ``engine model.predict``: the bare forward pass, to show the Predictor's own cost;
* ``keras call``: ``model(x, training=False)``; ``keras predict``: ``model.predict(x)``;
  ``keras tf.function``: the call inside a ``tf.function`` (traced once per shape);
* ``torch``: ``module(x)`` under ``torch.inference_mode()``.
They take turns round by round (each round starts with a different one); per round each runs
``repeats`` single-example calls, timed one by one, then one batch of ``batch`` examples (256;
32 with ``--quick``). The all-cores batch rate of the Predictor (its worker pool) is measured
first, before TensorFlow is imported (so its workers start by fork, as in a user's script).

Headline (last line): ``latency p50_us=X p99_us=Y vs_keras=Z``: the Predictor's p50 and p99 per
example, and the p50 of the fastest Keras configuration (usually ``keras tf.function``; eager
``model(x)`` runs a recurrent layer step by step in Python) over the Predictor's p50 (above 1:
the engine is faster). Targets: p99 under 10 ms for the reference model, vs_keras above 1.
"""
import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"  # before numpy, TensorFlow or torch start their thread pools
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _common  # noqa: E402,F401 - puts the repository root on sys.path

import time  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from _common import (QUIET_CORES, CpuLoad, QuietWaiter, log, parse_args,  # noqa: E402
                     report_cleanup, rotated, write_results)

# Per round and configuration: up to `repeats` batch-1 calls, fewer past `budget_s` seconds.
# quiet_budget_s: total wait for other processes to leave the cores alone before rounds.
FULL = dict(rounds=10, repeats=60, warmup=10, budget_s=3.0, parallel_rows=4096,
            quiet_budget_s=180.0, batch=256)
QUICK = dict(rounds=1, repeats=4, warmup=1, budget_s=0.3, parallel_rows=256, quiet_budget_s=0.0,
             batch=32)
TARGET_P99_S = 0.010


def build_native(name):
    """The native model, its state, and where the default name came from."""
    from models import available_models, get_model
    if name is None:
        name = "imu_cnn_bilstm" if "imu_cnn_bilstm" in available_models() else "cnn1d"
    model = get_model(name) if name != "mlp" else get_model("mlp", sizes=(40, 256, 10))
    return name, model, model.init_state(seed=0)


def keras_twin(name, model, state):
    """A Keras model of the same architecture (same weights when possible) and how it was made."""
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    if callable(getattr(model, "to_keras", None)):
        try:
            return model.to_keras(state), "model.to_keras(state): same weights"
        except ValueError as error:  # a layer interop does not map: the stack below may
            log(f"model.to_keras failed ({error}); building the Keras stack here")
    if name in ("mlp", "cnn1d"):
        return _keras_stack(model, state, keras), "Keras stack with the native weights copied"
    from models.keras_zoo import _BUILDERS
    if name in _BUILDERS:
        return _BUILDERS[name](), f"models.keras_zoo.{name}(): same architecture, own weights"
    raise SystemExit(f"no Keras twin for model {name!r}: give it to_keras(state) or use "
                     "--model mlp / cnn1d / imu_cnn_bilstm.")


def _keras_stack(model, state, keras):
    """Keras layers mirroring a native MLP or CNN1D, weights copied layer by layer."""
    from keras import layers
    stack, kernels = [keras.Input(model.input_shape)], []
    for index, layer in enumerate(model.layers):
        kind = type(layer).__name__
        if kind == "Reshape":
            stack.append(layers.Reshape(layer.target_shape))
        elif kind == "Conv1D":
            padding = layer.padding
            if not isinstance(padding, str):  # zeros on each side, then a valid convolution
                stack.append(layers.ZeroPadding1D(padding))
                padding = "valid"
            stack.append(layers.Conv1D(layer.filters, layer.kernel_size, strides=layer.stride,
                                       padding=padding,
                                       activation=getattr(layer, "activation", None)))
            kernels.append((stack[-1], f"conv1d_{index}"))
        elif kind == "Dense":
            last = index == len(model.layers) - 1
            stack.append(layers.Dense(layer.units, activation="softmax" if last else
                                      getattr(layer, "activation", None)))
            kernels.append((stack[-1], f"dense_{index}"))
        elif kind in ("ReLU", "Flatten"):
            stack.append(getattr(layers, kind)())
        elif kind not in ("Dropout", "Identity"):
            raise SystemExit(f"no Keras twin for layer {kind}")
    twin = keras.Sequential(stack)
    for layer, prefix in kernels:
        layer.set_weights([state.weights[f"{prefix}/kernel"], state.weights[f"{prefix}/bias"]])
    return twin


def torch_twin(name, model):
    """A torch module of the same architecture (own weights), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    from torch import nn
    if name == "imu_cnn_bilstm":
        return _torch_imu_class()(model.input_shape, model.num_outputs).eval()
    if name not in ("mlp", "cnn1d"):
        return None
    modules, channels = [], 1
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv1D":
            modules.append(nn.Conv1d(channels, layer.filters, layer.kernel_size, layer.stride,
                                     layer.padding))
            channels = layer.filters
        elif kind == "Dense":
            modules.append(nn.LazyLinear(layer.units))
        if getattr(layer, "activation", None) == "relu":
            modules.append(nn.ReLU())
        elif kind == "ReLU":
            modules.append(nn.ReLU())
        elif kind == "Flatten":
            modules.append(nn.Flatten())
    first = [nn.Unflatten(1, (1, model.input_shape[0]))] if name == "cnn1d" else []
    module = nn.Sequential(*first, *modules, nn.Softmax(dim=1)).eval()
    with torch.inference_mode():
        module(torch.zeros((1,) + tuple(model.input_shape)))  # materialise the lazy layers
    return module


def _torch_imu_class():
    import torch
    from torch import nn

    class TorchImu(nn.Module):
        """keras_zoo.imu_cnn_bilstm in torch: Conv1D(64,5)+BN, Conv1D(128,5), MaxPool(2),
        BiLSTM(128, sequences), BiLSTM(128), Dense(128), Dense(classes, softmax)."""

        def __init__(self, input_shape, classes):
            super().__init__()
            self.conv1, self.bn = nn.Conv1d(input_shape[1], 64, 5), nn.BatchNorm1d(64)
            self.conv2, self.pool = nn.Conv1d(64, 128, 5), nn.MaxPool1d(2)
            self.lstm1 = nn.LSTM(128, 128, batch_first=True, bidirectional=True)
            self.lstm2 = nn.LSTM(256, 128, batch_first=True, bidirectional=True)
            self.dense, self.out = nn.Linear(256, 128), nn.Linear(128, classes)

        def forward(self, x):
            x = self.bn(torch.relu(self.conv1(x.transpose(1, 2))))
            x = self.pool(torch.relu(self.conv2(x))).transpose(1, 2)
            x, _ = self.lstm1(x)
            _, (h, _) = self.lstm2(x)
            x = torch.relu(self.dense(torch.cat([h[0], h[1]], dim=1)))
            return torch.softmax(self.out(x), dim=1)

    return TorchImu


def configurations(model, state, keras_model, torch_module):
    """name -> function(x) returning probabilities, all on one thread."""
    from engine import Predictor
    import tensorflow as tf
    predictor = Predictor(model, state, num_processes=1)
    # The strongest Keras baseline: the call traced once per input shape, no eager dispatch.
    @tf.function(autograph=False)
    def compiled(x):
        return keras_model(x, training=False)

    calls = {"engine Predictor": predictor,
             "engine model.predict": lambda x: model.predict(state, x),
             "keras call": lambda x: np.asarray(keras_model(x, training=False)),
             "keras tf.function": lambda x: np.asarray(compiled(x)),
             "keras predict": lambda x: keras_model.predict(x, verbose=0, batch_size=len(x))}
    if torch_module is not None:
        import torch

        def run_torch(x):
            with torch.inference_mode():
                return torch_module(torch.from_numpy(x)).numpy()
        calls["torch"] = run_torch
    return calls


def percentiles(seconds):
    values = np.asarray(seconds)
    return dict(count=int(values.size), p50_us=float(np.percentile(values, 50) * 1e6),
                p90_us=float(np.percentile(values, 90) * 1e6),
                p99_us=float(np.percentile(values, 99) * 1e6),
                max_us=float(values.max() * 1e6), mean_us=float(values.mean() * 1e6))


def measure(calls, x, plan):
    """Interleaved rounds: per config, ``repeats`` batch-1 calls timed one by one, one batch.

    Each round first waits (within the plan's budget) for other processes to go quiet and
    records their load; the percentiles are given over all rounds and over the quiet ones."""
    one = {label: [] for label in calls}
    batch = {label: [] for label in calls}
    rounds_of = {label: [] for label in calls}  # the round of each batch-1 sample
    others, quiet = [], QuietWaiter(plan["quiet_budget_s"])
    for label, call in calls.items():  # tracing, page faults, lazy initialisation
        for index in range(plan["warmup"]):
            call(x[index:index + 1])
        call(x)
    for turn in range(plan["rounds"]):
        quiet.wait()
        load = CpuLoad()
        for label in rotated(calls, turn):
            call, round_began = calls[label], time.perf_counter()
            for index in range(plan["repeats"]):
                row = x[index % len(x)][None]
                began = time.perf_counter()
                call(row)
                one[label].append(time.perf_counter() - began)
                rounds_of[label].append(turn)
                if index >= 2 and began - round_began > plan["budget_s"]:
                    break  # a slow configuration (eager Keras) gets fewer samples, not hours
            began = time.perf_counter()
            call(x)
            batch[label].append(len(x) / (time.perf_counter() - began))
        others.append(load.other_cores())
        log(f"round {turn + 1}/{plan['rounds']}: " + "  ".join(
            f"{label} {np.median(one[label][-3:]) * 1e6:,.0f} us" for label in calls)
            + f"  (other processes: {others[-1]:.2f} cores)")
    quiet_rounds = {turn for turn, cores in enumerate(others) if cores < QUIET_CORES}
    records = {}
    for label in calls:
        calm = [t for t, r in zip(one[label], rounds_of[label]) if r in quiet_rounds]
        records[label] = dict(
            batch_1=percentiles(one[label]),
            batch_1_quiet_rounds=percentiles(calm) if len(calm) >= 3 else None,
            batch_samples_per_s=float(np.median(batch[label])),
            batch_samples_per_s_per_round=batch[label])
    return records, dict(other_processes_cores=others, quiet_rounds=sorted(quiet_rounds),
                         **quiet.report())


def all_cores_rate(model, state, x, rows):
    """Samples/s of the Predictor's worker pool on ``rows`` examples (pool started beforehand)."""
    from engine import Predictor, usable_cores
    big = np.resize(x, (rows,) + x.shape[1:])
    with Predictor(model, state, parallel_min_examples=1) as predictor:
        predictor(big[:usable_cores() * 4])  # starts the pool
        rates = []
        for _ in range(2):
            began = time.perf_counter()
            predictor(big)
            rates.append(rows / (time.perf_counter() - began))
    return dict(num_processes=usable_cores(), rows=rows, samples_per_s=float(np.median(rates)),
                samples_per_s_each=rates)


def main():
    args = parse_args(__doc__.splitlines()[0], lambda parser: parser.add_argument(
        "--model", default=None, help="native model name (default: imu_cnn_bilstm if "
                                      "registered, else cnn1d)"))
    plan = QUICK if args.quick else FULL
    load = CpuLoad()
    name, model, state = build_native(args.model)
    x = np.random.default_rng(0).normal(size=(plan["batch"],) + tuple(model.input_shape)).astype(
        np.float32)
    log(f"latency: {name} {model!r}, {state.num_params:,} values")
    # First, before TensorFlow is imported: workers then start by fork, as in a user's script.
    log("all cores: the Predictor's worker pool on a large batch")
    parallel = all_cores_rate(model, state, x, plan["parallel_rows"])
    log(f"all cores: {parallel['samples_per_s']:,.0f} samples/s; building the twins")
    keras_model, keras_source = keras_twin(name, model, state)
    torch_module = torch_twin(name, model)
    native = model.predict(state, x[:16])
    keras_difference = float(np.max(np.abs(np.asarray(keras_model(x[:16], training=False))
                                           - native)))
    same_weights = "weights" in keras_source and "own" not in keras_source
    log(f"keras twin: {keras_source}; max |keras - engine| on 16 examples "
        f"{keras_difference:.2e}{'' if same_weights else ' (different weights: timing only)'}; "
        f"torch: {'installed' if torch_module is not None else 'not installed'}")
    with threadpool_limits(limits=1):
        records, rounds = measure(configurations(model, state, keras_model, torch_module), x,
                                  plan)
    cleanup, cpu = report_cleanup(load)
    engine = records["engine Predictor"]
    # Against the fastest of the Keras ways to run the model, not the slowest (eager call).
    fastest = min((label for label in records if label.startswith("keras")),
                  key=lambda label: records[label]["batch_1"]["p50_us"])
    headline = dict(p50_us=engine["batch_1"]["p50_us"], p99_us=engine["batch_1"]["p99_us"],
                    vs_keras=records[fastest]["batch_1"]["p50_us"] / engine["batch_1"]["p50_us"],
                    vs_keras_against=fastest, p99_target_us=TARGET_P99_S * 1e6)
    path = write_results("latency", args, records, model=name, model_repr=repr(model),
                         num_values=state.num_params, keras_twin=keras_source,
                         keras_max_abs_difference=keras_difference, batch=plan["batch"], plan=plan,
                         all_cores=parallel, headline=headline, rounds=rounds,
                         cleanup=cleanup, cpu_load=cpu)
    print(f"\n{name}, one thread; batch 1 latency per example and batch-{len(x)} throughput")
    print(f"  {'configuration':<22} {'p50':>10} {'p90':>10} {'p99':>10} {'batch samples/s':>16}")
    for label, record in records.items():
        one = record["batch_1"]
        print(f"  {label:<22} {one['p50_us']:>8,.0f}us {one['p90_us']:>8,.0f}us "
              f"{one['p99_us']:>8,.0f}us {record['batch_samples_per_s']:>16,.0f}")
    calm = len(rounds["quiet_rounds"])
    if calm and engine["batch_1_quiet_rounds"]:
        print(f"  over the {calm}/{len(rounds['other_processes_cores'])} rounds with other "
              f"processes below {QUIET_CORES} cores: engine Predictor p50 "
              f"{engine['batch_1_quiet_rounds']['p50_us']:,.0f}us p99 "
              f"{engine['batch_1_quiet_rounds']['p99_us']:,.0f}us")
    else:
        print(f"  no round ran with other processes below {QUIET_CORES} cores: the figures are "
              "disturbed")
    print(f"  engine Predictor, {parallel['num_processes']} processes, {parallel['rows']:,} "
          f"examples: {parallel['samples_per_s']:,.0f} samples/s")
    print(f"  vs_keras against {fastest}; p99 target {TARGET_P99_S * 1e3:.0f} ms "
          f"{'met' if headline['p99_us'] <= TARGET_P99_S * 1e6 else 'missed'}")
    print(f"results: {path}")
    print(f"latency p50_us={headline['p50_us']:.0f} p99_us={headline['p99_us']:.0f} "
          f"vs_keras={headline['vs_keras']:.2f}", flush=True)
    if cleanup["our_shm_blocks"] or cleanup["live_children"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
