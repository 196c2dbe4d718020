"""Crafted and damaged state files are refused before anything is allocated, in one line naming
the file and the problem (issue 10, item 6). Each file is a valid state edited the way an
attacker or a broken disk would."""
import json
import os

import h5py
import numpy as np
import pytest

from engine import NetworkState
from models import MLP

MODEL = MLP(sizes=(4, 5, 3))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "state.h5"
    MODEL.init_state(0).save(path)
    return path


def _edit(path, change):
    with h5py.File(path, "a") as f:
        change(f)
    return path


def _refused(path, match, **kwargs):
    with pytest.raises(ValueError, match=match) as caught:
        NetworkState.load(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_missing_group_is_named(saved):
    _refused(_edit(saved, lambda f: f.__delitem__("weights")), "/weights is missing")


def test_a_name_list_longer_than_its_arrays_is_refused(saved):
    def longer(f):
        names = json.loads(f["weights"].attrs["names"])
        f["weights"].attrs["names"] = json.dumps(names + ["extra/kernel"])
    _refused(_edit(saved, longer), "lists 5 names but holds 4 arrays")


def test_a_huge_declared_array_in_a_small_file_is_refused_before_allocating(saved):
    def huge(f):
        del f["weights/0"]
        f["weights"].create_dataset("0", shape=(10**6, 10**6), dtype="f4")  # 4 TB, no storage
    path = _edit(saved, huge)
    assert os.path.getsize(path) < 100_000
    _refused(path, r"declares shape \(1000000, 1000000\) \(4000000000000 bytes\) but the file "
                   r"stores only 0 bytes")


def test_external_storage_would_read_another_files_bytes_and_is_refused(saved, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(20, dtype=np.float32).tobytes())

    def external(f):
        shape = f["weights/1"].shape
        del f["weights/1"]
        f["weights"].create_dataset("1", shape=shape, dtype="f4",
                                    external=[(str(secret), 0, 4 * int(np.prod(shape)))])
    _refused(_edit(saved, external), "keeps its data in external file")


def test_a_virtual_dataset_is_refused(saved, tmp_path):
    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as f:
        f["data"] = np.ones(5, np.float32)

    def virtual(f):
        layout = h5py.VirtualLayout(shape=(5,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(source), "data", shape=(5,))
        del f["weights/1"]
        f["weights"].create_virtual_dataset("1", layout)
    _refused(_edit(saved, virtual), "virtual dataset")


def test_links_out_of_the_file_are_refused(saved, tmp_path):
    other = tmp_path / "other.h5"
    MODEL.init_state(1).save(other)

    def link(f):
        del f["theta"]
        f["theta"] = h5py.ExternalLink(str(other), "/theta")
    _refused(_edit(saved, link), "/theta is a ExternalLink")


def test_non_numeric_data_and_broken_json_are_refused(saved, tmp_path):
    def strings(f):
        del f["weights/0"]
        f["weights"].create_dataset("0", data=np.array([b"cos\nsystem\n"]))
    _refused(_edit(saved, strings), "dtype")
    MODEL.init_state(0).save(saved)
    _refused(_edit(saved, lambda f: f.attrs.__setitem__("metadata", "{not json")),
             "'metadata' is not valid JSON")


def test_a_compressed_array_that_would_expand_a_thousandfold_is_refused(saved):
    def bomb(f):
        del f["weights/0"]
        f["weights"].create_dataset("0", shape=(10**5, 10**4), dtype="f4", compression="gzip",
                                    chunks=(1000, 1000))
    _refused(_edit(saved, bomb), "decompression bomb")


def test_the_model_layout_is_checked_before_reading(saved):
    other = MLP(sizes=(4, 6, 3)).init_state(0).layout
    _refused(saved, r"does not match the expected layout: weights key .* expected shape",
             layout=other)
    assert NetworkState.load(saved, layout=MODEL.init_state(0).layout).num_params == 43


def test_a_flipped_byte_in_the_stored_weights_is_detected_not_loaded(saved):
    with h5py.File(saved, "r") as f:
        chunks = [f["weights"][name].id.get_chunk_info(0) for name in f["weights"]
                  if f["weights"][name].chunks]
    assert chunks  # every non-scalar array is written with a Fletcher-32 checksum
    for chunk in chunks:
        data = bytearray(saved.read_bytes())
        data[chunk.byte_offset + 1] ^= 0x40  # one bit of one weight
        damaged = saved.with_name("damaged.h5")
        damaged.write_bytes(data)
        _refused(damaged, "it is damaged")


def _load_in_a_child(path, reference):
    """Load ``path`` in a forked child: "same", "different", "ValueError", another exception's
    name, or "signal N" when the HDF5 C library itself crashes (no Python code can catch that)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read)
        try:
            state = NetworkState.load(path)
            outcome = "same" if state.layout == reference.layout and np.array_equal(
                state.buffer, reference.buffer) else "different"
        except ValueError as error:
            outcome = "ValueError" if str(path) in str(error) and "\n" not in str(error) else \
                f"ValueError without the file's name: {error}"
        except BaseException as error:  # noqa: B902 - anything else is the finding
            outcome = f"{type(error).__name__}: {error}"
        os.write(write, outcome.encode()[:4000])
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcome = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    return outcome or f"signal {os.WTERMSIG(status)}"


@pytest.mark.slow
def test_random_corruption_loads_the_same_state_or_raises_one_value_error(saved):
    reference, good = NetworkState.load(saved), saved.read_bytes()
    rng, outcomes = np.random.default_rng(0), {}
    for trial in range(150):
        data = bytearray(good)
        for _ in range(rng.integers(1, 8)):
            data[rng.integers(0, len(data))] = rng.integers(0, 256)
        damaged = saved.with_name(f"damaged-{trial}.h5")
        damaged.write_bytes(data)
        outcome = _load_in_a_child(damaged, reference)
        outcomes.setdefault(outcome, []).append(trial)
    unexpected = {k: v for k, v in outcomes.items()
                  if k not in ("same", "different", "ValueError") and not k.startswith("signal")}
    assert not unexpected, unexpected  # KeyError, RuntimeError, TypeError... would be tracebacks
    assert "ValueError" in outcomes  # the corruptions did reach the checks
