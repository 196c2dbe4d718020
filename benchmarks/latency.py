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
``repeats`` single-example calls, timed one by one, then one batch of ``BATCH`` examples. The
all-cores batch rate of the Predictor (its worker pool) is measured first, before TensorFlow
is imported (so its workers start by fork, as in a user's script).

Headline (last line): ``latency p50_us=X p99_us=Y vs_keras=Z``: the Predictor's p50 and p99 per
example, and Keras call p50 / Predictor p50 (above 1: the engine is faster). Targets: p99 under
10 ms for the reference model, vs_keras above 1.
"""
import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"  # before numpy, TensorFlow or torch start their thread pools
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _common  # noqa: E402,F401 - puts the repository root on sys.path

import time  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from _common import CpuLoad, log, parse_args, report_cleanup, rotated, write_results  # noqa: E402

BATCH = 256
FULL = dict(rounds=10, repeats=60, warmup=10, parallel_rows=8192)
QUICK = dict(rounds=2, repeats=8, warmup=3, parallel_rows=1024)
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
        return model.to_keras(state), "model.to_keras(state): same weights"
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
                                       padding=padding, activation=getattr(layer, "activation", None)))
            kernels.append((stack[-1], f"conv1d_{index}"))
        elif kind == "Dense":
            last = index == len(model.layers) - 1
            stack.append(layers.Dense(layer.units, activation="softmax" if last else
                                      getattr(layer, "activation", None)))
            kernels.append((stack[-1], f"dense_{index}"))
        elif kind in ("ReLU", "Flatten"):
            stack.append(getattr(layers, kind)())
        elif kind != "Dropout":
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
    compiled = tf.function(lambda x: keras_model(x, training=False))
    calls = {"engine Predictor": predictor,
             "engine model.predict": lambda x: model.predict(state, x),
             "keras call": lambda x: np.asarray(keras_model(x, training=False)),
             "keras tf.function": lambda x: np.asarray(compiled(x)),
             "keras predict": lambda x: keras_model.predict(x, verbose=0, batch_size=BATCH)}
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
    """Interleaved rounds: per config, ``repeats`` batch-1 calls timed one by one, one batch."""
    one = {label: [] for label in calls}
    batch = {label: [] for label in calls}
    for label, call in calls.items():  # tracing, page faults, lazy initialisation
        for index in range(plan["warmup"]):
            call(x[index:index + 1])
        call(x[:BATCH])
    for turn in range(plan["rounds"]):
        for label in rotated(calls, turn):
            call = calls[label]
            for index in range(plan["repeats"]):
                row = x[index % len(x)][None]
                began = time.perf_counter()
                call(row)
                one[label].append(time.perf_counter() - began)
            began = time.perf_counter()
            call(x[:BATCH])
            batch[label].append(BATCH / (time.perf_counter() - began))
        log(f"round {turn + 1}/{plan['rounds']}: " + "  ".join(
            f"{label} {np.median(one[label][-plan['repeats']:]) * 1e6:,.0f} us" for label in calls))
    return {label: dict(batch_1=percentiles(one[label]),
                        batch_samples_per_s=float(np.median(batch[label])),
                        batch_samples_per_s_per_round=batch[label]) for label in calls}


def all_cores_rate(model, state, x, rows):
    """Samples/s of the Predictor's worker pool on ``rows`` examples (pool started beforehand)."""
    from engine import Predictor, usable_cores
    big = np.resize(x, (rows,) + x.shape[1:])
    with Predictor(model, state, parallel_min_examples=1) as predictor:
        predictor(big[:usable_cores() * 4])  # starts the pool
        rates = []
        for _ in range(3):
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
    x = np.random.default_rng(0).normal(size=(BATCH,) + tuple(model.input_shape)).astype(
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
        records = measure(configurations(model, state, keras_model, torch_module), x, plan)
    cleanup, cpu = report_cleanup(load)
    engine, keras_call = records["engine Predictor"], records["keras call"]
    headline = dict(p50_us=engine["batch_1"]["p50_us"], p99_us=engine["batch_1"]["p99_us"],
                    vs_keras=keras_call["batch_1"]["p50_us"] / engine["batch_1"]["p50_us"],
                    p99_target_us=TARGET_P99_S * 1e6)
    path = write_results("latency", args, records, model=name, model_repr=repr(model),
                         num_values=state.num_params, keras_twin=keras_source,
                         keras_max_abs_difference=keras_difference, batch=BATCH, plan=plan,
                         all_cores=parallel, headline=headline, cleanup=cleanup, cpu_load=cpu)
    print(f"\n{name}, one thread; batch 1 latency per example and batch-{BATCH} throughput")
    print(f"  {'configuration':<22} {'p50':>10} {'p90':>10} {'p99':>10} {'batch samples/s':>16}")
    for label, record in records.items():
        one = record["batch_1"]
        print(f"  {label:<22} {one['p50_us']:>8,.0f}us {one['p90_us']:>8,.0f}us "
              f"{one['p99_us']:>8,.0f}us {record['batch_samples_per_s']:>16,.0f}")
    print(f"  engine Predictor, {parallel['num_processes']} processes, {parallel['rows']:,} "
          f"examples: {parallel['samples_per_s']:,.0f} samples/s")
    print(f"results: {path}")
    print(f"latency p50_us={headline['p50_us']:.0f} p99_us={headline['p99_us']:.0f} "
          f"vs_keras={headline['vs_keras']:.2f}", flush=True)
    if cleanup["our_shm_blocks"] or cleanup["live_children"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
