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

``step_product_block`` says how the loops split their per-timestep product. OpenBLAS's AVX-512
cores run a product of at most 100^3 multiply-adds in their small-matrix kernels, which read
the operands in place; a bigger one is first packed into blocks, and at the recurrent layers'
shapes (32 rows x 128 x 512) that packing is a third of the product's time. So a product just
past that bound runs faster as a few products inside it.
"""
import ctypes
import functools
import os

import numpy as np

ROW_MAJOR, NO_TRANSPOSE = 101, 111  # CBLAS_ORDER.CblasRowMajor, CBLAS_TRANSPOSE.CblasNoTrans

# OpenBLAS's bound on m n k for its small-matrix kernels (kernel/x86_64/*_small_kernel_permit_*).
SMALL_MATRIX_BOUND = 100 ** 3
# The kernel families (threadpoolctl's "architecture", lower case) that have those kernels.
_SMALL_MATRIX_KERNELS = frozenset({"skylakex", "cooperlake", "sapphirerapids"})
# Measured on a Zen 5 core with the SkylakeX kernels: at 32 rows and 128 units, blocks of 64 run
# the LSTM's h @ U in 17-18 us and dgates @ U.T in 17-18 us, against 17-29 and 25-29 us in one
# product (the single product's time varies with where its operands lie; the blocks' does not).
# At 64 rows and more, one product is faster.
STEP_BLOCK, _MOST_BLOCKED_ROWS = 64, 32


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


def step_product_block(rows, inner, columns):
    """The block width for a time loop's (rows, inner) @ (inner, columns) product, or 0: one call.

    Blocks split the longer of ``inner`` and ``columns`` (the LSTM forward's 4 units columns,
    the backward's 4 units inner axis), only where the product is past the small-matrix bound
    and each block is within it, and only on numpy's OpenBLAS with small-matrix kernels. The
    choice depends on the shapes and the BLAS alone, never on timings, so every worker and
    every run computes the same bits.
    """
    if rows > _MOST_BLOCKED_ROWS or rows * inner * columns <= SMALL_MATRIX_BOUND:
        return 0
    if rows * STEP_BLOCK * min(inner, columns) > SMALL_MATRIX_BOUND:
        return 0
    return STEP_BLOCK if small_matrix_kernels() else 0


@functools.lru_cache(maxsize=None)
def small_matrix_kernels():
    """True if numpy's OpenBLAS (the build ``numpy_gemm`` calls) runs AVX-512 small-matrix
    kernels: its kernel family, which ``OPENBLAS_CORETYPE`` can hold lower, is one of them."""
    if numpy_gemm() is None:
        return False
    from threadpoolctl import threadpool_info
    package = os.path.dirname(os.path.abspath(np.__file__))
    return any(info.get("internal_api") == "openblas" and
               (info.get("filepath") or "").startswith(package) and
               str(info.get("architecture") or "").lower() in _SMALL_MATRIX_KERNELS
               for info in threadpool_info())
