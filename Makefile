# `make train` and `make test` work on a fresh machine with only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# A second environment on the newest jax (jax >= 0.11 needs Python >= 3.12) for the tests that depend
# most on jax's version: the kernels, the attention door, ahead-of-time compiles and recipe lowering.
# PYTHON_LATEST is the first of: python3.12 on PATH (a pyenv shim answers only when 3.12 is a selected
# pyenv version), pyenv's newest installed 3.12.x found by path (no PYENV_VERSION needed). Override
# with e.g. `make test-latest-jax PYTHON_LATEST=/usr/bin/python3.13`.
PYTHON_LATEST ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || \
                   ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1)
VENV_LATEST ?= .venv312
PY_LATEST := $(VENV_LATEST)/bin/python
LATEST_JAX_TESTS := tests/test_flash_attention.py tests/test_attention.py tests/test_cudnn_attention.py \
                    tests/test_tpu_compile.py tests/test_recipes.py tests/test_architecture.py

.PHONY: train seeds test test-latest-jax bench clean

# Both environments take the `tpu` extra: libtpu is what compiles for a TPU topology on a CPU host.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,tpu]"
	touch $@

# The tests also run the interop parity tests against CPU torch; these pins are the wheels
# the development machines hold locally.
$(VENV)/.interop: $(VENV)/.installed
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 -e ".[dev,interop,tpu]"
	touch $@

$(VENV_LATEST)/.installed: setup.py
	@test -n "$(PYTHON_LATEST)" || { echo "No Python 3.12: set PYTHON_LATEST=/path/to/python3.12" >&2; exit 1; }
	$(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install -q --upgrade pip
	$(PY_LATEST) -m pip install -q -e ".[dev,tpu]"
	touch $@

train: $(VENV)/.installed
	$(PY) -m mmjax.train --config configs/siglip_shapes.py --workdir runs/siglip_shapes

# `make train` for seeds 0, 1 and 2, with mean and range (README "Results").
seeds: $(VENV)/.installed
	$(PY) benchmarks/seeds.py

test: $(VENV)/.interop
	$(PY) -m pytest -n 2 -q tests

test-latest-jax: $(VENV_LATEST)/.installed
	@ls $(LATEST_JAX_TESTS) >/dev/null  # pytest-xdist would only say "no tests ran" for a missing file.
	$(PY_LATEST) -m pytest -n 2 -q $(LATEST_JAX_TESTS)

bench: $(VENV)/.installed
	$(PY) benchmarks/loss_memory.py
	$(PY) benchmarks/attention.py

clean:
	rm -rf runs .pytest_cache
