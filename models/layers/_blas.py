"""The matrix product numpy itself uses, as a ctypes function numba kernels can call.

The recurrent layers' compiled time loops (``models.layers._recurrent_loops``) call BLAS once per
timestep, on the step's block of the time-major (timesteps, n, width) buffers in place (no
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
    info = _numpy_openblas64_info()
    if info is None:
        return None
    try:
        return ctypes.CDLL(info["filepath"])
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def _numpy_openblas64_info():
    """threadpoolctl's record of numpy's own ILP64 scipy-openblas (path, kernel family), or None."""
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
            return info
    return None


def step_product_block(rows, inner, columns, dtype):
    """The block width for a time loop's (rows, inner) @ (inner, columns) product, or 0: one call.

    Blocks split the longer of ``inner`` and ``columns`` (the LSTM forward's 4 units columns,
    the backward's 4 units inner axis) into equal parts of at most ``STEP_BLOCK``, only where
    the product is past the small-matrix bound and each block is within it, in float32 or
    float64, with numpy's OpenBLAS on small-matrix kernels and one thread (a single product
    that size would use every BLAS thread; a block runs on one). The choice depends on the
    shapes, the kernel family and the thread limit, never on a timing: every worker with the
    same shard shape on the same host, and every run there, computes the same bits.
    """
    if np.dtype(dtype).type not in (np.float32, np.float64):
        return 0
    if rows > _MOST_BLOCKED_ROWS or rows * inner * columns <= SMALL_MATRIX_BOUND:
        return 0
    if rows * STEP_BLOCK * min(inner, columns) > SMALL_MATRIX_BOUND:
        return 0
    longer = max(inner, columns)
    width = -(-longer // -(-longer // STEP_BLOCK))  # equal blocks: no 1-wide one at the end
    if not small_matrix_kernels() or _blas_threads() != 1:
        return 0
    return width


@functools.lru_cache(maxsize=None)
def small_matrix_kernels():
    """True if numpy's OpenBLAS (the build ``numpy_gemm`` calls) runs AVX-512 small-matrix
    kernels: its kernel family, which ``OPENBLAS_CORETYPE`` can hold lower, is one of them.
    The family is fixed when OpenBLAS loads, so the answer is kept."""
    info = _numpy_openblas64_info()
    return info is not None and numpy_gemm() is not None and \
        str(info.get("architecture") or "").lower() in _SMALL_MATRIX_KERNELS


def _blas_threads():
    """The thread limit numpy's OpenBLAS runs with now (a worker's ``limit_threads`` sets it)."""
    return _get_num_threads()()


@functools.lru_cache(maxsize=None)
def _get_num_threads():
    function = getattr(_numpy_openblas64(), "scipy_openblas_get_num_threads64_", None)
    if function is None:  # no way to know: blocks would risk a slower product on many threads
        return lambda: 0
    function.restype = ctypes.c_int
    return function
