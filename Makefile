# Two commands: `make demo` and `make test`. Each sets up .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt

.PHONY: setup chromium demo test lint format lab clean

setup: $(STAMP)

# Reinstall only when the dependency lists change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[notebooks,dev,models]'
	touch $(STAMP)

# Browser tests drive Debian's chromium (never a downloaded browser). Install it where missing;
# where that is impossible (no root, no apt) the browser tests skip and say why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; browser tests will skip"; \
	  else echo "warning: chromium missing and cannot apt-get install it; browser tests will skip"; fi; }

demo: setup
	$(PY) -m experiments demo --out runs/demo

test: setup chromium
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
