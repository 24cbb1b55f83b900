# One entry point: each target creates the virtual environment it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

.PHONY: test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

lint: $(STAMP)
	$(VENV)/bin/ruff format --check fnnet tests bench
	$(VENV)/bin/ruff check fnnet tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format fnnet tests bench
	$(VENV)/bin/ruff check --fix fnnet tests bench

bench: $(STAMP)
	$(PY) -m bench.core
	$(PY) -m bench.train --repeats 2

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
