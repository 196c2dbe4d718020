"""Checks of HDF5 objects from files we may not have written, made before anything is read.

A crafted file can declare a dataset of terabytes in a few kilobytes (HDF5 allocates storage
lazily and reads missing chunks as the fill value), point a dataset at the bytes of any other file
(external storage), assemble one from other files (virtual datasets), or link a group to another
file (external and soft links). Every dataset read from a state, checkpoint or data file passes
:func:`checked_dataset` first: a hard link in this file, plain contiguous or chunked storage, a
numeric dtype, and storage that really holds the declared bytes.
"""
import json

import numpy as np

__all__ = ["checked_child", "checked_dataset", "check_total_storage", "json_attribute",
           "write_checksummed", "DAMAGED_FILE_ERRORS"]

# How h5py reports damaged metadata while a file is read: OSError, KeyError ("Unable to open
# object (corrupt object header)"), RuntimeError ("Link iteration failed") or TypeError ("Unknown
# string encoding"). Readers turn these into one ValueError naming the file.
DAMAGED_FILE_ERRORS = (OSError, KeyError, RuntimeError, TypeError)

# HDF5 filter ids: deflate, shuffle, fletcher32, szip, nbit, scaleoffset, lzf.
_COMPRESSING = {1, 4, 5, 6, 32000}
_HARMLESS = {2, 3}
# Deflate cannot expand data more than about 1032:1; lzf and szip less. A larger declared size
# per stored byte is a decompression bomb, not data.
MAX_COMPRESSION_RATIO = 1100


def _fail(where, what):
    raise ValueError(f"{where}: {what}")


def checked_child(group, key, where, kind="dataset"):
    """``group[key]`` if it is a ``kind`` ("dataset" or "group") stored in this file, else
    ValueError."""
    import h5py
    link = group.get(key, getlink=True)
    path = f"{group.name.rstrip('/')}/{key}"
    if link is None:
        _fail(where, f"{path} is missing; the file is incomplete or damaged.")
    if not isinstance(link, h5py.HardLink):
        _fail(where, f"{path} is a {type(link).__name__} to another place; only objects stored "
                     "in this file are read.")
    child = group[key]
    if not isinstance(child, h5py.Dataset if kind == "dataset" else h5py.Group):
        _fail(where, f"{path} is not an HDF5 {kind}.")
    return child


def checked_dataset(dataset, where, file_size, kinds="fiu"):
    """Raise ValueError unless ``dataset`` can be read safely; return its size in bytes.

    Args:
        dataset: an open ``h5py.Dataset``. where: how messages name the file.
        file_size: the file's real size in bytes. kinds: accepted numpy dtype kinds.
    """
    name = dataset.name
    if dataset.is_virtual:
        _fail(where, f"dataset {name} is a virtual dataset (made of other files); refused.")
    if dataset.external:
        _fail(where, f"dataset {name} keeps its data in external file(s) "
                     f"{[entry[0] for entry in dataset.external]}; refused.")
    dtype = dataset.dtype
    if dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
        _fail(where, f"dataset {name} has dtype {dtype}; expected a plain numeric array.")
    plist = dataset.id.get_create_plist()
    filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
    unknown = filters - _COMPRESSING - _HARMLESS
    if unknown:
        _fail(where, f"dataset {name} needs HDF5 filter(s) {sorted(unknown)}; refused.")
    declared = int(np.prod(dataset.shape, dtype=object)) * dtype.itemsize
    stored = dataset.id.get_storage_size()
    if stored > file_size:
        _fail(where, f"dataset {name} claims {stored} bytes of storage but the file has only "
                     f"{file_size}; the file is truncated or crafted.")
    if filters & _COMPRESSING:
        if declared > MAX_COMPRESSION_RATIO * max(stored, 1):
            _fail(where, f"dataset {name} declares shape {dataset.shape} ({declared} bytes) but "
                         f"stores {stored} compressed bytes; refused as a decompression bomb.")
    elif stored < declared:
        _fail(where, f"dataset {name} declares shape {dataset.shape} ({declared} bytes) but the "
                     f"file stores only {stored} bytes of it; the file is truncated or crafted.")
    return declared


def json_attribute(attrs, key, where, default=None, kind=dict):
    """The JSON attribute ``attrs[key]`` decoded and checked to be a ``kind``, or ValueError."""
    if key not in attrs:
        if default is not None:
            return default
        _fail(where, f"attribute {key!r} is missing; the file is incomplete or damaged.")
    text = attrs[key]
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        _fail(where, f"attribute {key!r} is not a JSON string.")
    try:
        value = json.loads(text)
    except ValueError as error:
        _fail(where, f"attribute {key!r} is not valid JSON ({error}).")
    if not isinstance(value, kind):
        _fail(where, f"attribute {key!r} must be a JSON {kind.__name__}; found "
                     f"{type(value).__name__}.")
    return value


def check_total_storage(datasets, where, file_size):
    """Raise ValueError if ``datasets`` together claim more storage than the file has (crafted
    datasets sharing one region of the file)."""
    total = sum(dataset.id.get_storage_size() for dataset in datasets)
    if total > file_size:
        _fail(where, f"its datasets claim {total} bytes of storage together, more than the "
                     f"file's {file_size}; the file is crafted or damaged.")


def write_checksummed(group, name, array):
    """Write ``array`` as dataset ``name`` with a Fletcher-32 checksum, so that flipped bytes in
    the data are an error when read instead of silently different weights. (A checksum needs
    chunked storage, which a scalar or an empty array cannot have; those are written plainly.)"""
    if array.ndim and array.size:
        return group.create_dataset(name, data=array, fletcher32=True)
    return group.create_dataset(name, data=array)
