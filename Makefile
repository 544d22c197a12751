# `make train` and `make test` work on a fresh machine with only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The tests also run the interop parity tests against CPU torch; these pins are the wheels
# the development machines hold locally.
$(VENV)/.interop: $(VENV)/.installed
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 -e ".[dev,interop]"
	touch $@

train: $(VENV)/.installed
	$(PY) -m mmjax.train --config configs/siglip_shapes.py --workdir runs/siglip_shapes

test: $(VENV)/.interop
	$(PY) -m pytest -n 2 -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/loss_memory.py
	$(PY) benchmarks/attention.py

clean:
	rm -rf runs .pytest_cache
