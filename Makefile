# Two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint format test test-fast demo bench clean

install: $(STAMP)

# Reinstall when the dependency list changes; constraints.txt pins torch/torchvision.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -c "import vit_attn, torch, timm, onnxruntime, zarr, dask, distributed, xarray"
	touch $(STAMP)

# Style and types: what .ci/run checks before the tests.
LINTED := pipeline tests benchmarks scripts
lint: install
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

demo: install
	$(VENV)/bin/vit-attn demo

bench: install
	$(PY) benchmarks/inference.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo_out
