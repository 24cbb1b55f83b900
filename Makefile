# One entry point: each target creates the virtual environment it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
EXPERIMENTS_STAMP := $(VENV)/.installed-experiments

.PHONY: test lint format bench experiments clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

$(EXPERIMENTS_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[experiments]"
	touch $(EXPERIMENTS_STAMP)

# The default suite, into results/ (resumes: finished runs are skipped).
experiments: $(EXPERIMENTS_STAMP)
	$(PY) -m experiments run all

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

lint: $(STAMP)
	$(VENV)/bin/ruff format --check fnnet tests bench experiments
	$(VENV)/bin/ruff check fnnet tests bench experiments

format: $(STAMP)
	$(VENV)/bin/ruff format fnnet tests bench experiments
	$(VENV)/bin/ruff check --fix fnnet tests bench experiments

bench: $(STAMP)
	$(PY) -m bench.core
	$(PY) -m bench.step_overhead
	$(PY) -m bench.floor
	$(PY) -m bench.train --repeats 3

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
