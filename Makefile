# The two set-up commands are `make run` and `make test`; each creates .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config.example.yml
# e.g. make bench BENCH_ARGS=--quick
BENCH_ARGS ?=

.PHONY: install install-test run test test-plain test-fast lint format bench clean

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

# The crash, move and copy tests run a second time with every fast path off
# (FILEDISPATCH_FASTPATH=0, see filedispatch/fastpath.py): the plain paths keep the guarantees.
PLAIN_PATH_TESTS := tests/test_crash.py tests/test_inline_move.py tests/test_e2e.py tests/test_integrity.py

# the PostgreSQL journal tests need Debian's postgresql package (initdb, pg_ctl; see README)
test: install-test
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	FILEDISPATCH_FASTPATH=0 $(BIN)/python -m pytest -q -p no:cacheprovider $(PLAIN_PATH_TESTS)

test-plain: install-test
	FILEDISPATCH_FASTPATH=0 $(BIN)/python -m pytest -q -p no:cacheprovider $(PLAIN_PATH_TESTS)

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
