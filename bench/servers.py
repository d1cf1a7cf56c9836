"""The two comparison servers of the serving benchmark (not product code).

- bare: the SAME batcher and backend as the guard, pass 1 only, no RAP: what the
  classifier costs without the guard.
- naive: what a user would hand-roll: a transformers pipeline inside FastAPI,
  one torch forward per request.

    python -m bench.servers bare --bundle DIR --backend onnx --port 8001
    python -m bench.servers naive --model HF_DIR --port 8002
"""

from __future__ import annotations

import argparse
import asyncio
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from guard.batcher import Batcher
from guard.core import rap
from guard.core.backends import load_backend
from guard.core.bundle import load_bundle


class Body(BaseModel):
    text: str


def bare_app(bundle_dir: str, backend: str, threads: int | None) -> FastAPI:
    bundle = load_bundle(bundle_dir)
    tokenizer = bundle.tokenizer()
    engine = load_backend(backend, bundle.path, threads)
    batcher = Batcher(engine.infer, tokenizer.pad)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        await batcher.submit(tokenizer.ids(["warm-up"]))
        yield
        await batcher.stop()

    app = FastAPI(lifespan=lifespan)

    @app.get("/readyz")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.post("/v1/classify")
    async def classify(body: Body) -> dict:
        logits, _ = await batcher.submit(tokenizer.ids([body.text]), "1")
        probs = rap.softmax(logits)[0]
        return {"results": [{"label": int(probs.argmax()), "probs": probs.tolist()}]}

    return app


def naive_app(model_dir: str, threads: int | None) -> FastAPI:
    import torch
    from transformers import pipeline

    if threads:
        torch.set_num_threads(threads)
    classifier = pipeline("text-classification", model=model_dir, device="cpu", top_k=None)
    lock = asyncio.Lock()  # one forward at a time, as a simple hand-rolled server would
    app = FastAPI()

    @app.get("/readyz")
    async def ready() -> dict:
        return {"status": "ready"}

    label2id = classifier.model.config.label2id

    @app.post("/v1/classify")
    async def classify(body: Body) -> dict:
        async with lock:
            scores = await asyncio.to_thread(classifier, body.text)
        while scores and isinstance(scores[0], list):  # one text in: some versions still nest the list
            scores = scores[0]
        best = max(scores, key=lambda s: s["score"])
        return {"results": [{"label": label2id[best["label"]], "scores": scores}]}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("bare", "naive"))
    p.add_argument("--bundle")
    p.add_argument("--backend", default="onnx")
    p.add_argument("--model")
    p.add_argument("--threads", type=int)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    app = (
        bare_app(args.bundle, args.backend, args.threads)
        if args.kind == "bare"
        else naive_app(args.model, args.threads)
    )
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
