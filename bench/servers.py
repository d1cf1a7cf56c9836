"""The serving benchmark's comparison server (not product code).

- naive: what a user would hand-roll: a transformers pipeline inside FastAPI,
  one torch forward per request.

The bare baseline is the guard itself, `guard serve --detectors none` (one code path).

    python -m bench.servers naive --model HF_DIR --port 8002
"""

from __future__ import annotations

import argparse
import asyncio

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class Body(BaseModel):
    text: str


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
    p.add_argument("kind", choices=("naive",))
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    uvicorn.run(naive_app(args.model, args.threads), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
