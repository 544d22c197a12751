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

train: $(VENV)/.installed
	$(PY) -m mmjax.train --config configs/siglip_shapes.py --workdir runs/siglip_shapes

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/loss_memory.py
	$(PY) benchmarks/attention.py

clean:
	rm -rf runs .pytest_cache
