# One entry point: each target creates the virtual environment it needs.
#
# PYTHON is the interpreter the environment is built from, VENV the folder it
# lives in; one folder per interpreter (CI: make test PYTHON=python3.13 VENV=.venv-py313).
# An environment is never reused for a different interpreter: the venv target
# stops with a message instead.
PYTHON ?= python3
VENV ?= .venv
# They are make's settings, not the tests': make would otherwise export them (command-line
# variables are exported), and scripts under test read PYTHON (scripts/tpu_launch.sh).
unexport PYTHON VENV
PY := $(VENV)/bin/python
TEST_STAMP := $(VENV)/.installed-test
EXPERIMENTS_STAMP := $(VENV)/.installed-experiments
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: venv test golden lint format bench experiments versions clean

# Runs on every call (an order-only prerequisite of the stamps, so it never forces a
# reinstall): creates $(VENV) from $(PYTHON), or checks that the one there was.
# sys.version names the release and the build, so two interpreters differ in it.
venv:
	@want="$$($(PYTHON) -c 'import sys; print(sys.version)' 2>/dev/null)" || { \
	  echo "make: PYTHON=$(PYTHON) does not run; give an interpreter (PYTHON=python3.11)" >&2; exit 1; }; \
	if [ -e $(VENV) ]; then \
	  have="$$($(PY) -c 'import sys; print(sys.version)' 2>/dev/null)" || have="(does not run)"; \
	  if [ "$$have" != "$$want" ]; then \
	    echo "make: $(VENV) was made by Python $$have, not by PYTHON=$(PYTHON) ($$want)." >&2; \
	    echo "      Use another folder (VENV=.venv-py313) or remove it (make clean VENV=$(VENV))." >&2; \
	    exit 1; \
	  fi; \
	else \
	  echo "creating $(VENV) with $(PYTHON) ($$want)"; \
	  $(PYTHON) -m venv $(VENV) && $(PY) -m pip install --quiet --upgrade pip; \
	fi

$(TEST_STAMP): pyproject.toml | venv
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

$(EXPERIMENTS_STAMP): pyproject.toml | venv
	$(PY) -m pip install --quiet -e ".[experiments]"
	touch $@

$(BENCH_STAMP): pyproject.toml | venv
	$(PY) -m pip install --quiet -e ".[bench]"
	touch $@

# The default suite, into results/ (resumes: finished runs are skipped).
experiments: $(EXPERIMENTS_STAMP)
	$(PY) -m experiments run all

test: $(TEST_STAMP)
	$(PY) -m pytest -n 2 -q

# Records every registry case's parameter names and shapes (tests/golden/params.json),
# after adding a layer or an intended change; commit the diff.
golden: $(TEST_STAMP)
	FNNET_UPDATE_GOLDEN=1 $(PY) -m pytest -q tests/test_golden.py

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff format --check fnnet tests bench experiments scripts
	$(VENV)/bin/ruff check fnnet tests bench experiments scripts

format: $(TEST_STAMP)
	$(VENV)/bin/ruff format fnnet tests bench experiments scripts
	$(VENV)/bin/ruff check --fix fnnet tests bench experiments scripts

bench: $(BENCH_STAMP)
	$(PY) -m bench.core
	$(PY) -m bench.step_overhead
	$(PY) -m bench.floor
	$(PY) -m bench.stream
	$(PY) -m bench.train --repeats 3
	$(PY) -m bench.train --models transformer,transformer_tokens \
	  --contenders jnp,nnx_split,fnnet,fused,torch,torch1 --repeats 2
	$(PY) -m bench.runner --repeats 3 --steps 2000
	$(PY) -m bench.accelerator --size tiny
	$(PY) -m bench.checkpoint --repeats 5

# What `make test` runs with: the interpreter and the libraries that decide the results.
versions: $(TEST_STAMP)
	@$(PY) scripts/versions.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
