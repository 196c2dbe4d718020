"""Fixtures of the Keras backend tests: skip without TensorFlow, keep TensorFlow out of this
process, and run TensorFlow-side oracles (``keras_oracle.py``) in a child process."""
import functools
import os
import sys

import pytest

from engine.backends import tensorflow_available
from keras_oracle import run_oracle


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason="TensorFlow is not installed (pip install -e .[tf])")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.tf)
            if not tensorflow_available():
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def tensorflow_stays_out_of_this_process():
    """Every test here must leave the pytest process free of TensorFlow (see keras_oracle.py)."""
    loaded_before = "tensorflow" in sys.modules
    yield
    assert loaded_before or "tensorflow" not in sys.modules, \
        "a test imported TensorFlow into the pytest process; run TensorFlow code in the oracle"


@pytest.fixture
def oracle(tmp_path):
    """``oracle(task, *args, **kwargs)``: run a keras_oracle task in a fresh process."""
    return functools.partial(run_oracle, str(tmp_path))
