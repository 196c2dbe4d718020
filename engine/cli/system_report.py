"""What the ``info`` command reports: cores, memory, library versions, the BLAS kernels and the
GPUs seen, without importing TensorFlow in this process.
"""
import json
import os
import platform
import shutil
import subprocess
import sys

from engine.parallel.system import available_memory_bytes, usable_cores

__all__ = ["system_info", "blas_kernel_hint", "blas_kernel_warning"]

# OpenBLAS kernel families that use AVX-512 (threadpoolctl's "architecture", lower case).
_AVX512_KERNELS = frozenset({"skylakex", "cooperlake", "sapphirerapids"})
_AVX512_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl")


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
            "tensorflow_gpus": None, "blas": _blas_pools()}
    info["blas_hint"] = blas_kernel_hint(
        [pool["architecture"] for pool in info["blas"]], os.environ.get("OPENBLAS_CORETYPE"),
        _cpu_flags())
    try:
        import numba
        info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        info["numba_threads"] = None
    if tensorflow and probe_tensorflow:
        info["tensorflow_gpus"] = _tensorflow_gpus()
    return info


def blas_kernel_hint(architectures, forced_core_type, cpu_flags):
    """A sentence when ``OPENBLAS_CORETYPE`` holds OpenBLAS to kernels older than the CPU's
    AVX-512 (None otherwise): on a Zen 5 host its SkylakeX kernels ran this engine's GEMMs 1.85x
    faster than the Haswell ones the variable forced (docs/performance.md)."""
    if not forced_core_type or not all(flag in cpu_flags for flag in _AVX512_FLAGS):
        return None
    slower = [name for name in architectures if name and name.lower() not in _AVX512_KERNELS]
    if not slower:
        return None
    return (f"OPENBLAS_CORETYPE={forced_core_type} holds OpenBLAS to its {slower[0]} kernels, but "
            "this CPU has AVX-512, whose kernels (SkylakeX) run float32 matrix products up to "
            "about 2x faster. Unless your OpenBLAS is known to fail on this CPU, start Python "
            "without OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (env -u OPENBLAS_CORETYPE -u "
            "OPENBLAS_L2_SIZE ...) and check the kernels again with this command.")


def blas_kernel_warning():
    """One line for ``train`` when ``OPENBLAS_CORETYPE`` holds numpy's BLAS below the CPU's
    AVX-512 (None otherwise): the native models' matrix products run at up to half speed."""
    forced = os.environ.get("OPENBLAS_CORETYPE")
    architectures = [pool["architecture"] for pool in _blas_pools()]
    if blas_kernel_hint(architectures, forced, _cpu_flags()) is None:
        return None
    return (f"OPENBLAS_CORETYPE={forced} holds OpenBLAS to older kernels than this CPU's AVX-512: "
            "native models train up to about 2x slower ('python -m engine info' says more).")


def _blas_pools():
    """The BLAS libraries numpy loaded (engine imports numpy): library, version, kernels,
    threads (threadpoolctl)."""
    from threadpoolctl import threadpool_info
    return [{"library": pool.get("internal_api"), "version": pool.get("version"),
             "architecture": pool.get("architecture"), "threads": pool.get("num_threads")}
            for pool in threadpool_info() if pool.get("user_api") == "blas"]


def _cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


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
