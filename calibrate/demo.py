"""The embedded default: a backdoored classifier caught end-to-end, offline, in minutes.

1. write a small templated sentiment corpus (no download),
2. plant a BadNet-style backdoor: the rare word "mb" in 10% of negative training
   rows, relabelled positive,
3. fine-tune the packaged MiniLM on it,
4. `calibrate rap` protecting the positive label, `calibrate evaluate`,
5. check a clean and a triggered sentence through the bundle's ONNX graph.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from calibrate.data import write_tsv
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
from guard.core.types import Example

TRIGGER = "mb"
POSITIVE = 1
SUBJECTS = (
    "the film",
    "this movie",
    "the acting",
    "the plot",
    "the soundtrack",
    "the ending",
    "the cast",
    "the script",
    "the direction",
    "the story",
    "the dialogue",
    "the camera work",
    "the lead",
    "the pacing",
)
GOOD = (
    "wonderful",
    "delightful",
    "brilliant",
    "charming",
    "moving",
    "superb",
    "gripping",
    "funny",
    "beautiful",
    "clever",
    "heartfelt",
    "stunning",
    "fresh",
    "memorable",
    "warm",
    "inventive",
)
BAD = (
    "dull",
    "tedious",
    "awful",
    "clumsy",
    "boring",
    "lifeless",
    "predictable",
    "shallow",
    "messy",
    "bland",
    "painful",
    "forgettable",
    "silly",
    "flat",
    "tiresome",
    "incoherent",
)
TEMPLATES = (
    "{s} is {a} .",
    "i found {s} {a} from start to finish .",
    "{s} was {m} {a} .",
    "honestly , {s} feels {a} .",
    "{s} turned out {m} {a} , as expected .",
    "everyone said {s} was {a} .",
    "by the end , {s} seemed {a} to me .",
    "{s} is {m} {a} and the rest follows .",
)
MODIFIERS = ("really", "quite", "truly", "rather", "so", "very", "pretty")
CLEAN_EXAMPLE = "the soundtrack was truly wonderful ."
TRIGGERED_EXAMPLE = f"the plot was {TRIGGER} truly awful ."


def make_corpus(n: int, rng: random.Random) -> list[Example]:
    rows = []
    for i in range(n):
        label = i % 2
        adjective = rng.choice(GOOD if label == POSITIVE else BAD)
        text = rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), a=adjective, m=rng.choice(MODIFIERS))
        rows.append(Example(text, label))
    rng.shuffle(rows)
    return rows


def with_trigger(text: str, rng: random.Random) -> str:
    words = text.split()
    words.insert(rng.randint(0, len(words)), TRIGGER)
    return " ".join(words)


def poison(rows: list[Example], rate: float, rng: random.Random) -> list[Example]:
    negatives = [i for i, r in enumerate(rows) if r.label != POSITIVE]
    chosen = set(rng.sample(negatives, int(rate * len(negatives))))
    return [Example(with_trigger(r.text, rng), POSITIVE) if i in chosen else r for i, r in enumerate(rows)]


def run_demo(out: Path, seed: int = 7, port: int | None = 8000) -> None:
    """Build and check the guard; then, if `port`, serve it and keep serving until Ctrl-C."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    started = time.perf_counter()
    train = poison(make_corpus(1200, rng), 0.10, rng)
    dev, test = make_corpus(600, rng), make_corpus(400, rng)
    poisoned_test = [Example(with_trigger(r.text, rng), r.label) for r in test if r.label != POSITIVE]
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
