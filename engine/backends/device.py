"""Which path trains a model: the engine's CPU worker processes, or tf.distribute on GPUs.

The rule, in order (``describe_device_path`` reports the step that decided):
1. ``device="cpu"``: the engine.
2. A model that is not a ``KerasModel`` (a NumPy model): the engine; ``device="gpu"`` is an error.
3. TensorFlow not installed: the engine (``device="gpu"`` is an error).
4. ``device="gpu"``, or ``"auto"`` and TensorFlow sees a GPU: ``MirroredProcessor`` over every GPU.
5. Otherwise the engine.
Looking for GPUs needs TensorFlow: without a GPU device node (/dev/nvidia*, /dev/kfd, /dev/dxg)
the answer is "none" at once; with one, a short-lived child process asks TensorFlow.
"""
import glob
import os

from engine.backends.keras import KerasModel, in_tensorflow_process, tensorflow_available

__all__ = ["DEVICES", "describe_device_path", "make_processor", "visible_gpus"]

DEVICES = ("auto", "cpu", "gpu")
ENGINE, TF_DISTRIBUTE = "engine", "tf_distribute"
# Options of ParallelBatchProcessor that mean nothing to MirroredProcessor.
_ENGINE_ONLY = ("num_processes", "update_interval", "start_method", "timeout_s",
                "micro_batch_size", "max_restarts", "timeline", "bind_cores", "cluster")
_gpus = None


def visible_gpus():
    """Names of the GPUs TensorFlow sees (cached), without loading TensorFlow in this process."""
    global _gpus
    if _gpus is None:
        nodes = [path for pattern in ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")
                 for path in glob.glob(pattern)]
        if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1") or not nodes or \
                not tensorflow_available():
            _gpus = []
        else:
            _gpus = in_tensorflow_process(_list_gpus)
    return list(_gpus)


def _list_gpus():
    import tensorflow as tf
    return [device.name for device in tf.config.list_physical_devices("GPU")]


def describe_device_path(model=None, device="auto"):
    """Which path ``fit`` and the CLI take, and why.

    Args:
        model: the model to train; None asks about a Keras model.
        device: "auto", "cpu" or "gpu".
    Returns:
        dict with ``path`` ("engine" or "tf_distribute"), ``reason`` (a sentence), ``gpus`` (names)
        and ``tensorflow`` (the installed version, None when it is not installed).
    Raises:
        ValueError: for an unknown device, or device="gpu" where the GPU path cannot run.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}. Received: device={device!r}.")
    info = dict(tensorflow=_tensorflow_version(), gpus=[])
    if device == "cpu":
        return dict(info, path=ENGINE, reason='device="cpu" was asked.')
    if model is not None and not isinstance(model, KerasModel):
        if device == "gpu":
            raise ValueError(f'device="gpu" runs Keras models (engine.backends.KerasModel) under '
                             f"tf.distribute; {type(model).__name__} is a CPU engine model. Use "
                             'device="cpu" or "auto".')
        return dict(info, path=ENGINE, reason=f"{type(model).__name__} is not a Keras model; only "
                                              "Keras models can use tf.distribute.")
    if info["tensorflow"] is None:
        if device == "gpu":
            raise ValueError('device="gpu" needs TensorFlow: pip install -e .[tf] (and a GPU build '
                             "of TensorFlow).")
        return dict(info, path=ENGINE, reason="TensorFlow is not installed.")
    gpus = visible_gpus()
    info["gpus"] = gpus
    if device == "gpu":
        if not gpus:
            raise ValueError('device="gpu" was asked but TensorFlow sees no GPU. Use device="auto" '
                             'or "cpu" to train on the CPU with the engine.')
        return dict(info, path=TF_DISTRIBUTE, reason=f'device="gpu" was asked: MirroredStrategy '
                                                     f"over {len(gpus)} GPU(s).")
    if gpus:
        return dict(info, path=TF_DISTRIBUTE, reason=f"TensorFlow sees {len(gpus)} GPU(s): "
                                                     "MirroredStrategy over all of them.")
    return dict(info, path=ENGINE, reason="TensorFlow sees no GPU: the engine trains on every "
                                          "usable CPU core.")


def make_processor(model, *, device="auto", mixed_precision=False, xla=False, devices=None,
                   **options):
    """A ParallelBatchProcessor, or a MirroredProcessor when the GPU path is taken.

    Args:
        model, options: as for ``ParallelBatchProcessor`` (engine-only options such as
            ``num_processes`` are ignored on the GPU path; ``sync="states"`` is refused there).
        device: "auto", "cpu" or "gpu" (see :func:`describe_device_path`).
        mixed_precision, xla, devices: GPU path options (see ``MirroredProcessor``); ``devices``
            given explicitly (e.g. logical CPUs in tests) takes the GPU path on them.
    """
    if devices is None:
        path = describe_device_path(model, device)["path"]
    else:
        path = TF_DISTRIBUTE
    if path == ENGINE:
        from engine.parallel.processor import ParallelBatchProcessor
        return ParallelBatchProcessor(model, **options)
    if options.get("sync", "gradients") != "gradients":
        raise ValueError(f'the tf.distribute path steps in sync="gradients" mode only. Received: '
                         f"sync={options['sync']!r}.")
    from engine.backends.tf_distribute import MirroredProcessor
    kept = {k: v for k, v in options.items() if k not in _ENGINE_ONLY + ("sync",)}
    return MirroredProcessor(model, devices=devices, mixed_precision=mixed_precision, xla=xla,
                             **kept)


def _tensorflow_version():
    import sys
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"].__version__
    if not tensorflow_available():
        return None
    from importlib import metadata
    for distribution in ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-nightly"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "installed"
