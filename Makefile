# Two commands: `make demo` and `make test`. Each sets up .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt

.PHONY: setup demo test lint format lab bench clean

setup: $(STAMP)

# Reinstall only when the dependency lists change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[notebooks,dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m diagnostics demo --out runs/demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

lab: setup
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --allow-root --no-browser notebooks/

clean:
	rm -rf $(VENV) runs .pytest_cache
