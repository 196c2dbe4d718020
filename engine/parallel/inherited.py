"""The caller's data arrays, which a forked worker inherits and never reads: dropped from it.

A worker started by fork maps every page of the owner, the caller's examples included (72 MiB
on the reference IMU workload), and reads them never: its rows come from the copy in shared
memory. Still those pages count in full in its RSS, as if it held a copy of its own. So the
owner lists the pages of the call's arrays (``page_ranges``) and a new worker drops its
mappings of them (``forget``) first thing; the owner's memory is not touched.

A dropped page reads as zeros in the worker, so dropping is only for inputs whose code is known
not to reach the caller's arrays: every object the worker is given (model, its layers, loss,
optimizer, layout, ...) must be an instance of a class of ``engine``, ``models`` or numpy, or a
plain container or value, and no array among them may overlap the pages. Anything else (a model
class of the user's own, a function or a bound method, an object array, a C extension object)
may reach the data through globals, closures or native code that cannot be searched: then
nothing is dropped. Dropped are only whole pages inside a C-contiguous array of at least
``MIN_BYTES``, which hold nothing but that array's values.
"""
import ctypes
import gc
import mmap
import os
import sys
import types
import weakref

import numpy as np

MIN_BYTES = 1 << 20
_MAX_OBJECTS = 20_000  # inputs larger than this are not searched: nothing is dropped
try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    byte_bounds = np.byte_bounds
_VALUES = (str, bytes, int, float, complex, bool, type(None), slice, range, type(Ellipsis))
_CONTAINERS = (list, tuple, dict, set, frozenset)
_TRUSTED = ("engine", "models", "numpy")  # packages whose code never reads the caller's arrays


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


def _trusted(item):
    """True for a class, function or instance whose code comes from ``_TRUSTED`` packages."""
    owner = item if isinstance(item, (type, types.FunctionType, types.BuiltinFunctionType)) \
        else type(item)
    return (getattr(owner, "__module__", None) or "").split(".")[0] in _TRUSTED


def _referenced_bounds(root):
    """Byte bounds of every ndarray reachable from ``root``; None when something reachable is
    not known to leave the caller's arrays alone (see the module docstring), or when there are
    too many objects to look through."""
    seen, stack, bounds = set(), [root], []
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, _VALUES):
            continue
        seen.add(id(item))
        if len(seen) > _MAX_OBJECTS:
            return None
        if type(item) is np.ndarray:
            if item.dtype.hasobject:
                return None
            bounds.append(byte_bounds(item))
            if item.base is not None:
                stack.append(item.base)
        elif type(item) is memoryview:
            stack.append(item.obj)
        elif isinstance(item, (types.ModuleType, type, types.FunctionType,
                               types.BuiltinFunctionType)):
            if not _trusted(item):  # its code may read module globals or a closure
                return None
        elif type(item) in _CONTAINERS:
            stack.extend(gc.get_referents(item))
        elif isinstance(item, np.generic) or isinstance(item, np.dtype):
            continue
        elif _trusted(item):  # an instance of engine or models: search its attributes
            stack.extend(gc.get_referents(item))
        else:
            return None
    return bounds


def forget(ranges):
    """In this (forked) process, drop the mappings of ``ranges``; reading them would see zeros.

    A range the system refuses stays mapped (only RSS is at stake), and a warning on stderr (the
    worker's log) says why."""
    if not ranges:
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for start, length in ranges:
        # First no huge pages (numpy asks for them on large arrays): khugepaged would otherwise
        # fill the dropped range again with zeroed huge pages, resident as before.
        if madvise(start, length, mmap.MADV_NOHUGEPAGE) != 0 or \
                madvise(start, length, mmap.MADV_DONTNEED) != 0:
            print(f"engine worker: the caller's arrays stay mapped here ({length:,} bytes): "
                  f"madvise failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
