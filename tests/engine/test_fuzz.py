"""Property-based fuzzing of the public API: whatever arrays and arguments come in, only the
documented exceptions come out, nothing hangs, and nothing leaks (the autouse fixture checks
/dev/shm and child processes after each test).

Documented means NonFiniteLossError, or a ValueError / TypeError that the engine raises itself on
purpose (a ``raise`` statement in ``engine/`` or ``models/``, its message saying what was
received): a TypeError from deep inside numpy or a bug of ours is a failure, not a rejection."""
import os
import traceback

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine import NetworkState, NonFiniteLossError, ParallelBatchProcessor
from models import MLP

MODEL = MLP(sizes=(4, 5, 3))
DOCUMENTED = (ValueError, TypeError, NonFiniteLossError)
_OURS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), package) + os.sep for package in ("engine", "models"))


def check_documented(error):
    """Re-raise ``error`` unless it is one of the engine's deliberate rejections."""
    if isinstance(error, NonFiniteLossError):
        return
    innermost = traceback.extract_tb(error.__traceback__)[-1]
    deliberate = innermost.filename.startswith(_OURS) and \
        (innermost.line or "").lstrip().startswith("raise ")
    if not deliberate:
        raise AssertionError(f"{type(error).__name__} raised by {innermost.filename}:"
                             f"{innermost.lineno} ({innermost.line!r}) is not a deliberate "
                             f"rejection of bad input: {error}") from error
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

odd_dtypes = st.sampled_from([np.int64, np.int8, np.bool_, np.complex64, object])
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
finite_floats = st.floats(-1e6, 1e6, width=32)


@st.composite
def example_arrays(draw):
    """Mostly arrays the model takes (so training really runs), sometimes anything at all."""
    rows = draw(st.integers(0, 12))
    if draw(st.integers(0, 9)) < 7:
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        values = draw(st.sampled_from([finite_floats, floats]))
        return draw(hnp.arrays(dtype, (rows, 4), elements=values))
    dtype = draw(odd_dtypes)
    shape = draw(st.sampled_from([(rows, 4), (rows, 3), (rows,), (rows, 4, 1)]))
    if dtype is object:
        return np.array([None] * rows, dtype=object)
    elements = floats if np.dtype(dtype).kind in "fc" else None
    return draw(hnp.arrays(dtype, shape, elements=elements))


@st.composite
def label_arrays(draw, rows):
    kind = draw(st.sampled_from(["good"] * 6 + ["float", "negative", "large", "length", "object"]))
    n = rows + (draw(st.sampled_from([-1, 1])) if kind == "length" else 0)
    n = max(n, 0)
    if kind == "object":
        return np.array(["a"] * n, dtype=object)
    if kind == "float":
        return draw(hnp.arrays(np.float64, (n,), elements=floats))
    low, high = {"negative": (-5, -1), "large": (3, 1000)}.get(kind, (0, 2))
    return draw(hnp.arrays(np.int64, (n,), elements=st.integers(low, high)))


def _call(processor, method, x, y, state, params):
    try:
        state_out, results = getattr(processor, method)(x, y, state, params)
    except DOCUMENTED as error:
        check_documented(error)
        event(type(error).__name__)  # shown by --hypothesis-show-statistics
        return
    event("trained" if params.get("update_weights", True) else "evaluated")
    assert np.all(np.isfinite(state_out.buffer))
    assert results is not None


@FUZZ
@given(data=st.data(), batch_size=st.integers(1, 9),
       method=st.sampled_from(["run_parallel", "process_batch"]),
       update=st.booleans(),
       learning_rate=st.sampled_from([0.0, 0.1, 0.1, 1e30, 1e300, -1.0, float("nan")]))
def test_any_arrays_give_a_result_or_a_documented_error_in_process(data, batch_size, method,
                                                                   update, learning_rate):
    x = data.draw(example_arrays())
    y = data.draw(label_arrays(len(x)))
    params = {"learning_rate": learning_rate, "update_weights": update}
    with ParallelBatchProcessor(MODEL, num_processes=1, batch_size=batch_size) as processor:
        _call(processor, method, x, y, MODEL.init_state(0), params)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), batch_size=st.integers(2, 9))
@pytest.mark.slow
def test_any_arrays_give_a_result_or_a_documented_error_with_workers(data, batch_size):
    x = data.draw(example_arrays())
    y = data.draw(label_arrays(len(x)))
    with ParallelBatchProcessor(MODEL, num_processes=2, batch_size=batch_size) as processor:
        _call(processor, "run_parallel", x, y, MODEL.init_state(0), {"learning_rate": 0.1})


@FUZZ
@given(options=st.fixed_dictionaries({}, optional={
    "num_processes": st.one_of(st.none(), st.integers(-2, 3), st.floats(), st.text(max_size=2)),
    "batch_size": st.one_of(st.integers(-2, 64), st.floats(), st.none()),
    "sync": st.one_of(st.sampled_from(["gradients", "states", "GRADIENTS", ""]), st.integers()),
    "update_interval": st.one_of(st.integers(-1, 4), st.floats()),
    "optimizer": st.one_of(st.sampled_from(["sgd", "adam", "adamw", "lamb"]), st.integers()),
    "seed": st.one_of(st.integers(-3, 2**40), st.floats()),
    "timeout_s": st.one_of(st.none(), st.floats(-1, 10), st.booleans()),
    "micro_batch_size": st.one_of(st.none(), st.integers(-1, 5)),
    "max_restarts": st.one_of(st.integers(-1, 3), st.floats()),
    "start_method": st.one_of(st.none(), st.sampled_from(["fork", "spawn", "vfork"])),
}))
def test_any_options_build_a_processor_or_raise_a_documented_error(options):
    try:
        processor = ParallelBatchProcessor(MODEL, **options)
    except DOCUMENTED as error:
        check_documented(error)
        return
    processor.close()


@FUZZ
@given(shapes=st.dictionaries(st.sampled_from(["dense_0/kernel", "dense_0/bias", "extra"]),
                              hnp.array_shapes(min_dims=0, max_dims=3, max_side=5), max_size=3),
       fill=floats)
def test_any_state_is_accepted_only_if_it_matches_the_model(shapes, fill):
    state = NetworkState({name: np.full(shape, fill) for name, shape in shapes.items()})
    x = np.ones((4, 4), np.float32)
    with ParallelBatchProcessor(MODEL, num_processes=1, batch_size=2) as processor:
        with pytest.raises(DOCUMENTED) as caught:
            processor.run_parallel(x, np.zeros(4, int), state, {"learning_rate": 0.1})
        check_documented(caught.value)


def test_an_internal_type_error_is_not_counted_as_documented():
    # The checker itself must be able to fail: numpy's own TypeError is no rejection of ours.
    try:
        np.zeros(3) + "x"
    except TypeError as error:
        with pytest.raises(AssertionError, match="not a deliberate rejection"):
            check_documented(error)
    with pytest.raises(TypeError) as caught:
        NetworkState({"w": np.array([None], dtype=object)})
    check_documented(caught.value)
