# Two commands on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch is pinned here (the package itself only asks for a range).
# Elsewhere add the CPU wheel index, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv serve test lint typecheck pytest fuzz models bench clean

# Runtime dependencies at the image's versions (requirements.lock, written by `make lock`), so
# tests run against what ships and a new release upstream cannot change a fresh machine's build.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c requirements.lock -e '.[dev,train,eval]'
	touch $@

venv: $(VENV)/.installed

serve: venv
	$(PY) -m service serve --host $(HOST) --port $(PORT) --model-dir models

lint: venv
	$(PY) -m ruff check service tests bench models
	$(PY) -m ruff format --check service tests bench models

typecheck: venv
	$(PY) -m mypy

# Two phases, both part of `make test`: every test not marked serial on PYTEST_WORKERS processes
# (whole files to a worker, so a module's fixtures are built once), then the serial ones alone:
# they assert wall-clock bounds that another worker's load on the same cores would break.
PYTEST_WORKERS ?= 2
pytest: venv
	$(PY) -m pytest -q -ra -n $(PYTEST_WORKERS) --dist loadfile -m "not serial"
	$(PY) -m pytest -q -ra -m serial

test: lint typecheck pytest

# Schemathesis over the OpenAPI document (also part of `make test` through tests/fuzz).
fuzz: venv
	$(PY) -m pytest -q tests/fuzz

models: venv
	$(PY) -m models.build

bench: venv
	$(PY) -m bench.engine

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Container image targets (make image, make image-smoke); kept out of `make test`.
include deploy/image.mk
