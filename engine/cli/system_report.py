"""What the ``info`` command reports: cores, memory, library versions and the GPUs seen, without
importing TensorFlow in this process.
"""
import json
import os
import platform
import shutil
import subprocess
import sys

from engine.parallel.system import available_memory_bytes, usable_cores

__all__ = ["system_info"]


def system_info(*, probe_tensorflow=True):
    """Cores, memory, library versions, and GPUs seen (nvidia-smi; TensorFlow in a subprocess)."""
    from importlib import metadata
    versions = {}
    for package in ("numpy", "numba", "scikit-learn", "h5py", "matplotlib", "tensorflow",
                    "tensorflow-cpu", "tensorboard"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    tensorflow = versions.pop("tensorflow") or versions.pop("tensorflow-cpu")
    versions.pop("tensorflow-cpu", None)
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "usable_cores": usable_cores(), "cpu_count": os.cpu_count(),
            "memory_total_bytes": _total_memory(),
            "memory_available_bytes": available_memory_bytes(),
            "versions": versions, "tensorflow": tensorflow, "gpus": _nvidia_gpus(),
            "tensorflow_gpus": None}
    try:
        import numba
        info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        info["numba_threads"] = None
    if tensorflow and probe_tensorflow:
        info["tensorflow_gpus"] = _tensorflow_gpus()
    return info


def _total_memory():
    import psutil
    return psutil.virtual_memory().total


def _nvidia_gpus():
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listing.stdout.splitlines() if line.startswith("GPU")]


def _tensorflow_gpus():
    """GPUs TensorFlow sees, asked in a child process: importing TensorFlow here would cost
    seconds and hundreds of MB in this process (and in every worker forked from it)."""
    code = ("import json, tensorflow as tf; print(json.dumps([d.name for d in "
            "tf.config.list_physical_devices('GPU')]))")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=120, env=env)
        return json.loads(child.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None
