#!/bin/sh
# Installs the guard's serving environment into a fresh virtualenv: the project with
# its [serve] extra (ONNX Runtime, FastAPI, uvicorn; NO torch) and [otel] (traces, off
# unless GUARD_OTEL_ENDPOINT is set), exactly as pinned and hashed in
# requirements-serve.lock (and requirements-gpu.lock): `make lock` writes them.
#
# The Dockerfile's build stage runs this script, and tests/deploy/test_image.py runs
# the same RUN line outside Docker, so the image's install cannot drift from what CI
# exercises.
#
#   install.sh SOURCE_DIR VENV_DIR [cpu|gpu]
set -eu

src=$1
venv=$2
variant=${3:-cpu}

case $variant in
cpu | gpu) ;;
*)
	echo "install.sh: unknown variant '$variant' (expected cpu or gpu)" >&2
	exit 2
	;;
esac

locks=$(dirname "$0")
python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check --no-input "$@"; }

# Hash-checking mode: every package pinned, each download checked against the lock.
# --no-deps: a dependency missing from the lock fails the import test, not silently resolves.
pip install --require-hashes --no-deps -r "$locks/requirements-serve.lock"
# The project itself: a regular, not editable, install (the runtime stage copies the
# virtualenv only), built by the locked setuptools without going to an index.
pip install --no-deps --no-index --no-build-isolation "$src"

if [ "$variant" = gpu ]; then
	# onnxruntime (a core dependency) and onnxruntime-gpu (the [gpu] extra) install
	# the same `onnxruntime` package directory, so installing both leaves whichever
	# came last, partly overwritten. Remove the CPU build first, then install the GPU
	# build with NVIDIA's CUDA and cuDNN wheels (no CUDA base image needed).
	pip uninstall --yes onnxruntime
	pip install --require-hashes --no-deps -r "$locks/requirements-gpu.lock"
fi

# The image installs nothing at run time: no installer and no build backend in it.
pip uninstall --yes setuptools pip

# The serving image must not carry torch: fail the build if a dependency pulled it in.
if "$venv/bin/python" -c "import torch" 2>/dev/null; then
	echo "install.sh: torch ended up in the serving environment" >&2
	exit 1
fi
