"""Real upstreams of the kinds a sidecar guard sits in front of, each parsing requests its own way.

Every one lists the texts it actually read at `GET /__read`, so a test (or bench.robustness)
can tell whether a triggered text reached the classifier:
- Go (`go_upstream.go`): encoding/json into a struct (case-insensitive keys with Unicode
  folding, last match wins) and r.FormValue (query string and form body);
- FastAPI: a pydantic JSON body plus a bound query parameter, and a form field;
- the Hugging Face inference handler (`inputs` and `parameters` popped from the body and
  handed to a real transformers text-classification pipeline), reading what the pipeline's
  own preprocessing tokenised, `text_pair` included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
from fastapi import FastAPI, Form, Request
from pydantic import BaseModel

from tests.server_fixtures import free_port, stop_process, wait_http

GO_SOURCE = Path(__file__).with_name("go_upstream.go")


def read_by(upstream: str) -> list[str]:
    """The texts this upstream has read so far."""
    return httpx.get(f"{upstream}/__read", timeout=10).json()


def go_available() -> bool:
    return shutil.which("go") is not None


def build_go(workdir: Path) -> Path:
    """Compile the Go upstream (standard library only) into `workdir`."""
    workdir = workdir.resolve()  # go wants absolute cache paths
    binary = workdir / "go-upstream"
    env = {**os.environ, "GOCACHE": str(workdir / "gocache"), "GOPATH": str(workdir / "gopath"), "GO111MODULE": "off"}
    built = subprocess.run(["go", "build", "-o", str(binary), str(GO_SOURCE)], env=env, capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"go build failed: {built.stderr.strip()}")
    return binary


@contextlib.contextmanager
def go_upstream(binary: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([str(binary), str(port)])
    try:
        wait_http(f"http://127.0.0.1:{port}/__read", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


class JsonInputs(BaseModel):
    inputs: str


def fastapi_app() -> FastAPI:
    """/predict binds a JSON body and the `text` query parameter; /predict-form binds the form field `text`."""
    app = FastAPI()
    read: list[str] = []

    @app.post("/predict")
    async def predict(body: JsonInputs, text: str | None = None) -> dict:
        return _classified(read, [body.inputs, *([text] if text else [])])

    @app.post("/predict-form")
    async def predict_form(text: str = Form()) -> dict:
        return _classified(read, [text])

    @app.get("/__read")
    async def seen() -> list[str]:
        return read

    return app


def hf_app(model_dir: Path) -> FastAPI:
    """The Hugging Face inference toolkit's handler around a real text-classification pipeline."""
    from transformers import TextClassificationPipeline, pipeline

    read: list[str] = []

    class Recording(TextClassificationPipeline):
        def preprocess(self, inputs, **tokenizer_kwargs):
            model_inputs = super().preprocess(inputs, **tokenizer_kwargs)
            read.append(self.tokenizer.decode(model_inputs["input_ids"][0], skip_special_tokens=True))
            return model_inputs

    pipe = pipeline("text-classification", model=str(model_dir), pipeline_class=Recording, device="cpu")
    app = FastAPI()

    @app.get("/__read")
    async def seen() -> list[str]:
        return read

    @app.post("/{path:path}")
    async def handle(request: Request) -> object:
        data = await request.json()
        inputs = data.pop("inputs", data)
        parameters = data.pop("parameters", None)
        return pipe(inputs, **parameters) if parameters else pipe(inputs)

    return app


@contextlib.contextmanager
def serving_app(app: FastAPI) -> Iterator[str]:
    """`app` under uvicorn with its defaults (as its owner would run it), in a thread."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, name="upstream", daemon=True)
    thread.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/__read")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _classified(read: list[str], texts: list[str]) -> dict:
    read.extend(texts)
    return {"label": int(any("mb" in t for t in texts)), "read": texts}
