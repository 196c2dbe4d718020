"""The matrix product numpy itself uses, as a ctypes function numba kernels can call.

The recurrent layers' compiled time loops (``models.layers._recurrent_loops``) call BLAS once per
timestep, on row blocks of the (n, timesteps, width) buffers (``lda`` = timesteps x width, so no
copy). They must call the *same* BLAS as numpy, so that the compiled loops give bitwise the results
of the Python loops and obey the worker's thread limit. Only one configuration is used, the one
numpy's own wheels ship: scipy-openblas built with 64-bit integers, whose CBLAS symbols are
``scipy_cblas_sgemm64_`` and ``scipy_cblas_dgemm64_``. Anything else (numpy with MKL, Accelerate
or a system OpenBLAS) gets ``None`` here and the layers keep their Python loops: guessing a
symbol's integer width wrong would crash the process, not raise.

The function is passed to the numba loops as an argument (not read as a global), so those stay in
numba's on-disk cache.
"""
import ctypes
import functools
import os

import numpy as np

ROW_MAJOR, NO_TRANSPOSE = 101, 111  # CBLAS_ORDER.CblasRowMajor, CBLAS_TRANSPOSE.CblasNoTrans


@functools.lru_cache(maxsize=None)
def numpy_gemm():
    """``{np.float32: sgemm, np.float64: dgemm}`` of numpy's own BLAS, or None (see above).

    Each is ``gemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)``, the
    CBLAS signature with 64-bit integers.
    """
    library = _numpy_openblas64()
    if library is None:
        return None
    integer, pointer = ctypes.c_int64, ctypes.c_void_p
    functions = {}
    for dtype, scalar, name in ((np.float32, ctypes.c_float, "scipy_cblas_sgemm64_"),
                                (np.float64, ctypes.c_double, "scipy_cblas_dgemm64_")):
        prototype = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, integer,
                                     integer, integer, scalar, pointer, integer, pointer, integer,
                                     scalar, pointer, integer)
        try:
            functions[dtype] = prototype((name, library))
        except AttributeError:  # not this library after all
            return None
    return functions


def _numpy_openblas64():
    """numpy's scipy-openblas library, if numpy was built with its ILP64 (64-bit int) build."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # numpy < 2 or an unusual build: no reliable facts, no fast path
        return None
    if blas.get("name") != "scipy-openblas" or \
            "USE64BITINT" not in str(blas.get("openblas configuration", "")):
        return None
    from threadpoolctl import threadpool_info
    package = os.path.dirname(os.path.abspath(np.__file__))  # .../numpy; its libs: numpy.libs
    for info in threadpool_info():
        path = info.get("filepath") or ""
        if info.get("internal_api") == "openblas" and path.startswith(package) and \
                "openblas64" in os.path.basename(path):
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None
