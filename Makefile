# The two set-up commands are `make run` and `make test`; each creates .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config.example.yml
# e.g. make bench BENCH_ARGS=--quick
BENCH_ARGS ?=

.PHONY: install install-test run test test-fast lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-dev

run: install
	$(BIN)/filedispatch -c $(CONFIG)

test: install-test
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install-test
	$(BIN)/python -m pytest -q -m "not slow and not browser" $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check filedispatch tests bench
	$(BIN)/ruff format --check filedispatch tests bench
	$(BIN)/mypy

format: install-test
	$(BIN)/ruff format filedispatch tests bench
	$(BIN)/ruff check --fix filedispatch tests bench

bench: install-test
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
