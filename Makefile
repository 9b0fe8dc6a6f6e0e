# The two commands from the README. Each creates .venv if missing and installs the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench clean unpriv-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

## Run the main job offline on the bundled data.
demo: $(STAMP)
	$(BIN)/moondev-lab demo

## Run the test suite.
test: $(STAMP)
	$(BIN)/python -m pytest

## Run the benchmarks (slow; prints ratios against the baselines).
bench: $(STAMP)
	$(BIN)/python bench/data_bench.py

## Build the unprivileged test venv (uid 64123, /usr/bin/python3) used by tests/test_sandbox_unprivileged.py.
unpriv-venv: $(STAMP)
	$(BIN)/python tests/test_sandbox_unprivileged.py

clean:
	rm -rf $(VENV) build *.egg-info
