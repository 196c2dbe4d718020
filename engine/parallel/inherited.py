"""The caller's data arrays, which a forked worker inherits and never reads: dropped from it.

A worker started by fork maps every page of the owner, the caller's examples included (72 MiB
on the reference IMU workload), and reads them never: its rows come from the copy in shared
memory. Still those pages count in full in its RSS, as if it held a copy of its own. So the
owner lists the pages of the call's arrays (``page_ranges``) and a new worker drops its
mappings of them (``forget``) first thing; the owner's memory is not touched.

Dropped are only whole pages inside a C-contiguous array of at least ``MIN_BYTES``, which hold
nothing but that array's values, and only if nothing the worker is given (model, layout, ...)
refers to memory overlapping them; a reference to them found in the worker's inputs keeps them.
"""
import ctypes
import gc
import mmap
import types
import weakref

import numpy as np

MIN_BYTES = 1 << 20
_MADV_DONTNEED, _MADV_NOHUGEPAGE = 4, 15
_MAX_OBJECTS = 20_000  # inputs larger than this are not searched: nothing is dropped
try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    byte_bounds = np.byte_bounds
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType,
           types.MethodType, str, bytes, int, float, complex, bool, type(None))


def page_ranges(arrays, worker_inputs):
    """``(start, length)`` of the whole pages inside each live array of ``arrays`` (ndarrays or
    weak references to them) that may be dropped in a worker receiving ``worker_inputs``."""
    page, ranges = mmap.PAGESIZE, []
    for array in arrays:
        if isinstance(array, weakref.ref):
            array = array()
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous or \
                array.nbytes < MIN_BYTES:
            continue
        address = array.__array_interface__["data"][0]
        start, stop = -(-address // page) * page, (address + array.nbytes) // page * page
        if stop > start:
            ranges.append((start, stop - start))
    if not ranges:
        return []
    referenced = _referenced_bounds(worker_inputs)
    if referenced is None:
        return []
    return [(start, length) for start, length in ranges
            if not any(low < start + length and start < high for low, high in referenced)]


def _referenced_bounds(root):
    """Byte bounds of every ndarray reachable from ``root`` through containers and instance
    attributes; None if there are too many objects to look through."""
    seen, stack, bounds = set(), [root], []
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, _OPAQUE):
            continue
        seen.add(id(item))
        if len(seen) > _MAX_OBJECTS:
            return None
        if isinstance(item, np.ndarray):
            low, high = byte_bounds(item)
            bounds.append((low, high))
            if item.base is not None:
                stack.append(item.base)
            continue
        if isinstance(item, memoryview):
            stack.append(item.obj)
            continue
        stack.extend(gc.get_referents(item))
    return bounds


def forget(ranges):
    """In this (forked) process, drop the mappings of ``ranges``; reading them would see zeros."""
    if not ranges:
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for start, length in ranges:
        # First no huge pages (numpy asks for them on large arrays): khugepaged would otherwise
        # fill the dropped range again with zeroed huge pages, resident as before.
        madvise(start, length, _MADV_NOHUGEPAGE)
        madvise(start, length, _MADV_DONTNEED)
