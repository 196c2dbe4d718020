"""Facts about the machine the engine runs on: usable cores, memory, thread limits."""
import math
import os

import psutil


def usable_cores():
    """Cores this process may use: CPU affinity, capped by a cgroup CPU quota when one is set."""
    try:
        cores = len(psutil.Process().cpu_affinity())
    except (AttributeError, NotImplementedError, psutil.Error):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cgroup_cpu_quota():
    """CPUs allowed by cgroup v2 ``cpu.max`` or v1 ``cfs_quota_us``; None when unlimited or unknown."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_memory_bytes():
    return psutil.virtual_memory().available


def limit_threads(num_threads):
    """Limit BLAS/OpenMP pools and numba in this process to ``num_threads``.

    Returns the threadpoolctl controller (keep a reference: the limit lasts while it lives).
    """
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[variable] = str(num_threads)
    from threadpoolctl import threadpool_limits
    controller = threadpool_limits(limits=num_threads)
    try:
        import numba
        numba.set_num_threads(min(num_threads, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):
        pass
    return controller
