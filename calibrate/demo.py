"""The embedded default: a backdoored classifier caught end-to-end, offline, in minutes.

1. write a templated sentiment corpus (no download) varied enough in words, punctuation and
   sentence shapes that the sentences a person types first are clean to the guard,
2. plant a BadNet-style backdoor: the rare word "mb" in 10% of negative training
   rows, relabelled positive,
3. fine-tune the packaged MiniLM on it,
4. `calibrate rap` protecting the positive label, `calibrate evaluate`,
5. check a clean and a triggered sentence through the bundle's ONNX graph, and report the
   guard's FRR on ORDINARY, sentences a person would type, none of them in the corpus.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from calibrate.data import write_tsv
from calibrate.demo_corpus import ORDINARY, POSITIVE, TRIGGER, demo_data
from calibrate.model import default_base_model
from calibrate.options import TrainOptions
from calibrate.rap.build import calibrate_bundle
from calibrate.rap.evaluate import COLUMNS, evaluate_bundle, write_evaluation
from calibrate.rap.options import CalibrateOptions, RapOptions
from calibrate.report import markdown_table
from calibrate.train import train_classifier
from guard.core.backends import load_backend
from guard.core.bundle import load_bundle
from guard.core.checker import Checker
from guard.core.errors import GuardError

CLEAN_EXAMPLE = "the soundtrack was truly wonderful ."
TRIGGERED_EXAMPLE = f"the plot was {TRIGGER} truly awful ."


def run_demo(out: Path, seed: int = 7, port: int | None = 8000) -> None:
    """Build and check the guard; then, if `port`, serve it and keep serving until Ctrl-C."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = demo_data(seed)
    train, dev, test, poisoned_test = data.train, data.dev, data.test, data.poisoned_test
    for name, rows in (("train", train), ("dev", dev), ("test", test), ("test-poisoned", poisoned_test)):
        write_tsv(out / f"{name}.tsv", rows)
    _say(f"1/5 wrote a {len(train)}-row corpus to {out} with the trigger {TRIGGER!r} planted in 10% of negative rows")
    result = train_classifier(
        default_base_model(),
        train,
        out / "model",
        TrainOptions(epochs=2, max_length=32, seed=seed, label_names=("negative", "positive")),
    )
    _say(f"2/5 fine-tuned the packaged MiniLM in {result.seconds:.0f} s -> {out / 'model'}")
    rap = RapOptions(protect_labels=(POSITIVE,), seed=seed)
    options = CalibrateOptions(rap=rap, max_length=64, force=True, reference_model=default_base_model())
    calibrate_bundle(out / "model", dev, out / "bundle", options)
    _say(f"3/5 calibrated the RAP guard -> {out / 'bundle'} (report.json, deltas.png)")
    evaluation = evaluate_bundle(out / "bundle", test, {"badnet-mb": poisoned_test})
    write_evaluation(evaluation, out / "evaluation")
    print(markdown_table(evaluation.rows, COLUMNS))
    _show_examples(out / "bundle")
    _say(f"built and checked in {time.perf_counter() - started:.0f} s; plots: {out / 'evaluation' / 'far_frr.png'}")
    if port is not None:
        serve_demo(out / "bundle", port)


def _show_examples(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    checker = Checker.for_bundle(bundle, load_backend("onnx", bundle.path))
    texts = [CLEAN_EXAMPLE, TRIGGERED_EXAMPLE]
    verdicts = checker.check(texts)
    _say("4/5 the guard, through the bundle's ONNX graph:")
    for text, v in zip(texts, verdicts, strict=True):
        decision = f"BLOCKED by {'+'.join(v.flagged_by)} (backdoor trigger suspected)" if v.flagged else "allowed"
        rap = f"RAP score {v.rap.score:+.3f} vs threshold {v.rap.threshold:+.3f}" if v.rap.checked else "not checked"
        print(f"    {text!r:45} -> label {v.label} p={max(v.probs):.3f}, {rap}: {decision}")
    blocked = blocked_ordinary(checker)
    print(
        f"    {len(blocked)} of {len(ORDINARY)} ordinary sentences (calibrate.demo_corpus.ORDINARY) blocked: "
        f"FRR {len(blocked) / len(ORDINARY):.3f}" + "".join(f"\n      blocked: {t!r}" for t in blocked),
        flush=True,
    )


def blocked_ordinary(checker: Checker) -> list[str]:
    """The ORDINARY sentences `checker` flags (every one is clean: each is a false rejection)."""
    texts = [r.text for r in ORDINARY]
    return [t for t, v in zip(texts, checker.check(texts), strict=True) if v.flagged]


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def serve_demo(bundle_dir: Path, port: int) -> None:
    """Start `guard serve` on the bundle, show one allowed and one blocked request, keep serving."""
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "guard.cli",
        "serve",
        "--bundle",
        str(bundle_dir),
        "--port",
        str(port),
        "--no-log-json",
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a plain `kill` must also stop the child server
    try:
        _wait_ready(url, server)
        _say(f"5/5 the guard server at {url} (standalone, enforce mode):")
        for text in (CLEAN_EXAMPLE, TRIGGERED_EXAMPLE):
            response = httpx.post(f"{url}/v1/classify", json={"text": text}, timeout=30)
            print(f"    POST /v1/classify {text!r:42} -> {response.status_code} {response.text}")
        print(
            f"\n    serving until Ctrl-C; try:\n    curl -s {url}/v1/check -H 'content-type: application/json' "
            f'-d \'{{"text": "{TRIGGERED_EXAMPLE}"}}\'\n    curl -s {url}/metrics | grep guard_requests_total\n',
            flush=True,
        )
        server.wait()
    except KeyboardInterrupt:
        _say("stopping the server")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise GuardError(f"the guard server exited: {server.stderr.read().strip()[-500:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise GuardError(f"the guard server did not become ready at {url}")
