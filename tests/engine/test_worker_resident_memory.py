"""What a worker keeps resident: no kernel compiled in a worker, no inherited copy of the caller's
examples, and a bounded part of a large shared data set mapped; the maths unchanged by any of it."""
import os

import numba.core.dispatcher
import numpy as np
import psutil
import pytest

import engine.parallel.resident as resident
from engine import ParallelBatchProcessor
from engine.parallel import inherited
from engine.parallel.pool import default_start_method
import models
from engine.core.optim import SGD, make_optimizer
from models import MLP

forked = pytest.mark.skipif(default_start_method() != "fork", reason="workers are not forked here")


def _data(rows, features, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, features)).astype(np.float32), rng.integers(0, 3, rows)


@forked
@pytest.mark.parametrize("optimizer", ["adam", "sgd", SGD(momentum=0)])
def test_forked_workers_compile_no_kernel_the_owner_did_not(tmp_path, monkeypatch, optimizer):
    # A kernel compiled in a worker costs it LLVM: about half a second and 100 MB of RSS each.
    log = tmp_path / "compiled"
    compile_ = numba.core.dispatcher.Dispatcher.compile

    def logging_compile(self, signature):
        with open(log, "a") as file:
            file.write(f"{os.getpid()} {self.py_func.__qualname__}\n")
        return compile_(self, signature)

    monkeypatch.setattr(numba.core.dispatcher.Dispatcher, "compile", logging_compile)
    model = MLP(sizes=(12, 8, 3))
    with ParallelBatchProcessor(model, num_processes=2, batch_size=50, optimizer=optimizer) as p:
        p.run_parallel(*_data(200, 12), model.init_state(0), {"learning_rate": 1})
        workers = {str(pid) for pid in p.worker_pids}
    in_workers = [line for line in log.read_text().splitlines()
                  if line.split()[0] in workers] if log.exists() else []
    assert in_workers == []


def _resident_bytes_in(pid, start, stop):
    """Bytes of [start, stop) of process ``pid``'s address space that are resident."""
    resident_bytes, inside = 0, False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            field = line.split()
            if "-" in field[0] and not field[0].endswith(":"):
                low, high = (int(value, 16) for value in field[0].split("-"))
                inside, covered = low < stop and start < high, min(high, stop) - max(low, start)
                size = high - low
            elif inside and field[0] == "Rss:":  # pro rata where a mapping sticks out
                resident_bytes += int(field[1]) * 1024 * covered // size
    return resident_bytes


@forked
def test_a_worker_does_not_keep_the_callers_examples_it_inherited_resident():
    # It reads its rows from the copy in shared memory; the caller's 8 MiB would count in full
    # in each worker's RSS.
    examples, labels = _data(8192, 256)
    address = examples.__array_interface__["data"][0]
    model = MLP(sizes=(256, 8, 3))
    with ParallelBatchProcessor(model, num_processes=2, batch_size=256) as processor:
        processor.run_parallel(examples, labels, model.init_state(0), {"learning_rate": 0.1})
        owner = _resident_bytes_in(os.getpid(), address, address + examples.nbytes)
        workers = [_resident_bytes_in(pid, address, address + examples.nbytes)
                   for pid in processor.worker_pids]
    assert owner >= examples.nbytes * 0.9  # the measure sees the caller's own copy
    assert max(workers) < examples.nbytes // 8, f"resident in the workers: {workers}"


class _RemembersItsData(MLP):
    """A model that keeps a view of its training data and adds its mean to every loss."""

    def __init__(self, sizes, reference):
        super().__init__(sizes)
        self.reference = reference

    def loss_and_grads(self, state, x, y, *, rng=None):
        loss, grads = super().loss_and_grads(state, x, y, rng=rng)
        return loss + float(self.reference.mean()), grads


def test_a_model_that_refers_to_the_data_reads_it_in_its_workers():
    examples, labels = _data(2048, 256)
    model = _RemembersItsData((256, 8, 3), examples[:, 1:])
    losses = []
    for processes in (1, 2):
        with ParallelBatchProcessor(model, num_processes=processes, batch_size=256) as processor:
            _, results = processor.run_parallel(examples, labels, model.init_state(0),
                                                {"learning_rate": 0.1})
            losses.append(results["loss"])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_only_whole_pages_inside_large_contiguous_unreferenced_arrays_are_dropped():
    page = inherited.mmap.PAGESIZE
    large, small = np.ones((1024, 512), np.float32), np.ones(100, np.float32)
    (start, length), = inherited.page_ranges([large, small, large[:, ::2]], {"model": None})
    address = large.__array_interface__["data"][0]
    assert start % page == 0 and length % page == 0
    assert address <= start and start + length <= address + large.nbytes
    assert length >= large.nbytes - 2 * page
    assert inherited.page_ranges([large], {"model": [large[10:20]]}) == []
    assert inherited.page_ranges([large], {"model": {"view": memoryview(large)}}) == []


class _OwnModel:
    """A model class of the user's own: its methods may read anything through its globals."""


@pytest.mark.parametrize("name", ["imu_cnn_bilstm", "cnn1d", "mlp", "cnn_bilstm_attention"])
def test_pages_are_dropped_only_for_inputs_whose_code_cannot_reach_them(name):
    large = np.ones((1024, 512), np.float32)
    native = models.get_model(name) if name != "mlp" else MLP(sizes=(4, 3))
    spec = dict(model=native, layout=native.init_state(0).layout,
                optimizer=make_optimizer("adam"), workspace={"sizes": (1, 2)}, threads=1)
    assert inherited.page_ranges([large], spec) != []
    native.reference = large[3:5]  # an attribute that points into the data keeps it
    assert inherited.page_ranges([large], spec) == []
    del native.reference
    for unknown in (_OwnModel(), lambda x: x, _RemembersItsData((4, 3), None).loss_and_grads,
                    np.array([None, large], dtype=object)):
        assert inherited.page_ranges([large], dict(spec, model=unknown)) == []


class _FakeData:
    def __init__(self, rows, row_bytes):
        self.examples = np.zeros((rows, row_bytes // 4), np.float32)
        self.unmapped = 0

    def unmap(self, name):
        assert name == "examples"
        self.unmapped += 1


def _read(window, data, steps, rows, compute_s):
    for _ in range(steps):
        window.reading(data, rows)
        window.computed(compute_s)


def test_a_worker_unmaps_a_large_data_set_only_where_mapping_it_again_costs_little():
    rows_per_window = resident.WINDOW_BYTES // resident.FAULT_AROUND_BYTES
    row_bytes = resident.FAULT_AROUND_BYTES
    large = _FakeData(4 * rows_per_window, row_bytes)
    slow_step = 2 * 32 * resident.REFAULT_S / resident.MAX_SHARE  # 1% of it refaults 64 rows
    _read(resident.ExamplesWindow(), large, 4 * rows_per_window // 32, 32, slow_step)
    assert large.unmapped >= 3
    cheap = _FakeData(4 * rows_per_window, row_bytes)
    _read(resident.ExamplesWindow(), cheap, 4 * rows_per_window // 32, 32, slow_step / 20)
    assert cheap.unmapped == 0
    small = _FakeData(rows_per_window // 2, row_bytes)  # smaller than the window: stays mapped
    _read(resident.ExamplesWindow(), small, 100, 32, 10.0)
    assert small.unmapped == 0


def _data_block_rss(pid):
    return sum(m.rss for m in psutil.Process(pid).memory_maps(grouped=True)
               if os.path.basename(m.path).startswith("engine_") and m.path.endswith("_data"))


@forked
def test_unmapping_the_examples_bounds_what_a_worker_maps_and_changes_no_value(monkeypatch):
    examples, labels = _data(8192, 256)  # 8 MiB
    model = MLP(sizes=(256, 8, 3))

    def train():
        with ParallelBatchProcessor(model, num_processes=2, batch_size=32, seed=3) as processor:
            state, _ = processor.run_parallel(examples, labels, model.init_state(0),
                                              {"learning_rate": 0.1})
            return state, max(_data_block_rss(pid) for pid in processor.worker_pids)

    mapped_state, mapped = train()
    monkeypatch.setattr(resident, "WINDOW_BYTES", 1 << 20)
    monkeypatch.setattr(resident, "REFAULT_S", 0.0)  # as if refaulting cost nothing
    state, bounded = train()
    np.testing.assert_array_equal(state.buffer, mapped_state.buffer)
    assert mapped > examples.nbytes // 2 * 0.9  # each worker read (about) half of the rows
    assert bounded < 3 << 20, f"{bounded:,} bytes of the data block mapped"
