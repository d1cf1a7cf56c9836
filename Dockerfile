# The serving image: `guard serve` on ONNX Runtime, without torch.
#
#   docker build -t backdoor-guard .                                  # CPU
#   docker build --build-arg VARIANT=gpu -t backdoor-guard:gpu .      # onnxruntime-gpu + CUDA/cuDNN wheels
#   docker run --read-only -p 8000:8000 -v "$PWD/bundle:/bundle:ro" backdoor-guard
#
# Build arguments: PYTHON_IMAGE (base of both stages), VARIANT (cpu | gpu).
# Settings are GUARD_* environment variables (see `guard serve --help`); the bundle is
# expected at /bundle. tests/deploy/test_image.py runs this file's install and start-up
# commands in a fresh virtualenv, since CI has no Docker engine.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml /src/
COPY guard /src/guard
COPY deploy/docker/install.sh /src/deploy/docker/install.sh
COPY deploy/docker/requirements-serve.lock /src/deploy/docker/requirements-serve.lock
COPY deploy/docker/requirements-gpu.lock /src/deploy/docker/requirements-gpu.lock
RUN sh /src/deploy/docker/install.sh /src /opt/guard "${VARIANT}"

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="backdoor-guard" \
      org.opencontainers.image.description="RAP inference guard against backdoor triggers in text classifiers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.backdoor-guard.variant="${VARIANT}"

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it without a passwd lookup.
# The base image's own pip (python:*-slim has one; Debian's python3 has none) goes too: nothing
# is installed at run time.
RUN groupadd --system --gid 10001 guard \
    && useradd --system --uid 10001 --gid guard --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin guard \
    && if python3 -m pip --version >/dev/null 2>&1; then \
         python3 -m pip uninstall --yes --disable-pip-version-check pip setuptools wheel; \
       fi

COPY --from=build /opt/guard /opt/guard

# Read-only root filesystem: byte code was compiled at install time and nothing else is
# written except under /tmp (declared a volume below; an emptyDir in the Helm chart).
ENV PATH=/opt/guard/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    GUARD_HOST=0.0.0.0 \
    GUARD_PORT=8000 \
    GUARD_BUNDLE=/bundle \
    GUARD_LOG_JSON=true

VOLUME ["/tmp"]
USER 10001:10001
EXPOSE 8000

# Ready = bundle verified and backend warmed up (503 otherwise); urllib raises on both.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ['GUARD_PORT'], timeout=2)"]

ENTRYPOINT ["guard"]
CMD ["serve"]
