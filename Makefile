# `make demo` and `make test` create the virtual environment when it is missing (or when setup.py
# or this file changed since it was made), then run. The environment includes the `tf` extra
# (tensorflow-cpu), so CI runs the Keras backend tests too.
PYTHON_BASE ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench env clean

env: $(STAMP)

# aeon brings BasicMotions (real accelerometer + gyroscope recordings) for
# tests/models/test_recurrent_models.py: only its data files are read; --no-deps because aeon
# pins an older numba and is never imported.
$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,tf,mpi]'
	$(PY) -m pip install --quiet --no-deps aeon==1.6.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m engine.demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/sync_overhead.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/barrier_spin.py
	$(PY) benchmarks/vs_peers.py
	$(PY) benchmarks/layer_times.py
	$(PY) benchmarks/host_contention.py
	$(PY) benchmarks/vs_keras.py
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/freezing.py
	$(PY) benchmarks/soak.py

clean:
	rm -rf $(VENV) build *.egg-info runs
