# The two commands from the README. Each creates .venv if missing and installs the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench clean unpriv-venv system-deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

## Run the main job offline on the bundled data.
demo: $(STAMP)
	$(BIN)/moondev-lab demo

## What the tests need from the OS: Debian's chromium (the browser test) and python3-venv (the
## unprivileged sandbox battery builds a venv on /usr/bin/python3). Installed only when missing, as root.
system-deps:
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  /usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	  if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (apt)"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  elif [ -n "$$missing" ]; then echo "note: missing$$missing; the tests that need them are skipped"; fi

## Run the test suite on two pytest-xdist workers, a test file each at a time (module fixtures such as
## the unprivileged venv are built once), the slowest files first (tests/conftest.py, SLOW_FIRST).
## Most tests wait on subprocesses, kernels or servers, so two workers on two cores take about half
## the time of one.
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

## Run the benchmarks (slow; prints ratios against the baselines).
bench: $(STAMP)
	$(BIN)/python bench/data_bench.py

## Build the unprivileged test venv (uid 64123, /usr/bin/python3) used by tests/test_sandbox_unprivileged.py.
unpriv-venv: $(STAMP)
	$(BIN)/python tests/test_sandbox_unprivileged.py

clean:
	rm -rf $(VENV) build *.egg-info
