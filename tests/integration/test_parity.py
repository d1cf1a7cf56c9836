"""`guard check`, `calibrate evaluate` and `guard serve` answer the same texts the same way: all three
drive guard.core.runner's steps (windows, eligibility, perturbation, scores, the non-finite check)
and flag with guard.core.detection's one rule.

The stub backend (tests.server_fixtures) flags a window that holds both "good" and "mb"; it answers
NaN for a row holding "awful". The bundle records a classifier that reads 64 tokens, past the guard's
32-token window, so a long text is checked in windows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from calibrate.rap import evaluate
from guard import cli
from guard.api.app import create_app
from guard.core import detection
from guard.core.bundle import load_bundle, save_bundle
from guard.core.detection import Detection
from guard.core.errors import InputError
from guard.core.runner import GuardFailure
from guard.core.types import EncodedBatch, Example
from guard.settings import Settings
from tests.server_fixtures import CLEAN, NEGATIVE, TRIGGERED, StubBackend, build_stub_bundle, manifest, uvicorn_thread

AWFUL_ID = 9643  # "awful" in the MiniLM vocabulary
LONG = " ".join(["bad"] * 40) + " good mb movie"  # the trigger is past the first window
TEXTS = {
    "clean": CLEAN,
    "triggered": TRIGGERED,
    "unprotected": NEGATIVE,
    "long": LONG,
    "empty": "\u200b\u200b",  # no token the model reads
    "nonfinite": "good awful movie",
}
EXPECTED = {
    "clean": ("allowed", 1, ()),
    "triggered": ("flagged", 1, ("rap",)),
    "unprotected": ("allowed", 0, ()),
    "long": ("flagged", 0, ("rap",)),  # label: the first window's
    "empty": ("refused",),
    "nonfinite": ("failed",),
}


@dataclass
class NanStub(StubBackend):
    def infer(self, batch: EncodedBatch) -> np.ndarray:
        logits = super().infer(batch)
        logits[(batch.input_ids == AWFUL_ID).any(axis=1)] = np.nan
        return logits


@pytest.fixture(scope="module", params=["prob", "floored"])
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stub bundle under `prob` and under the default `floored` statistic. Floored, with label 1's floor
    at 1 nat: a clean window drops from logit 2 to 0 (score -2), a triggered one keeps 2 (score 0); the
    threshold -1 tells them apart, as `prob`'s -0.1 does."""
    path = build_stub_bundle(tmp_path_factory.mktemp("parity") / "bundle")
    recorded = manifest()
    update = {"model": recorded.model.model_copy(update={"classifier_max_length": 64})}
    if request.param == "floored":
        (label,) = recorded.protect
        floored = label.model_copy(update={"floor": 1.0, "thresholds": {"0.01": -1.0, "0.05": -1.5}})
        update |= {"statistic": "floored", "protect": [floored]}
    save_bundle(path, recorded.model_copy(update=update))
    return path


def _verdict(flagged: bool, label: int, flagged_by) -> tuple:
    return ("flagged" if flagged else "allowed", label, tuple(flagged_by))


def _by_check(bundle: Path, text: str, monkeypatch, capsys) -> tuple:
    monkeypatch.setattr("guard.core.backends.load_backend", lambda *args, **kwargs: NanStub())
    code = cli.main(["check", "--bundle", str(bundle), "--json", text])
    out, err = capsys.readouterr()
    if code == 1:
        return ("refused",) if "empty" in err else ("failed",) if "non-finite" in err else (err,)
    (line,) = out.splitlines()
    item = json.loads(line)
    assert code == (3 if item["flagged"] else 0)
    return _verdict(item["flagged"], item["label"], item["flagged_by"])


def _by_evaluate(bundle: Path, text: str, monkeypatch) -> tuple:
    monkeypatch.setattr(evaluate, "load_backend", lambda *args, **kwargs: NanStub())
    try:
        result = evaluate.evaluate_bundle(bundle, [Example(text, 1)], {})
    except InputError:
        return ("refused",)
    except GuardFailure:
        return ("failed",)
    scores = result.clean.scores
    flags = detection.flags(scores, Detection.of(load_bundle(bundle)).thresholds())
    names = tuple(d for d in detection.FLAGS if flags[d].any())
    return _verdict(bool(names), int(result.clean.predicted[0]), names)


def _by_serve(url: str, text: str) -> tuple:
    response = httpx.post(f"{url}/v1/check", json={"texts": [text]}, timeout=30)
    if response.status_code == 422:
        return ("refused",)
    if response.status_code == 503:
        return ("failed",)
    (item,) = response.json()["results"]
    return _verdict(item["flagged"], item["label"], item["flagged_by"])


def test_check_evaluate_and_serve_give_identical_verdicts(bundle: Path, monkeypatch, capsys) -> None:
    app = create_app(Settings(bundle=bundle), backend=NanStub())
    with uvicorn_thread(app) as url:
        served = {name: _by_serve(url, text) for name, text in TEXTS.items()}
    checked = {name: _by_check(bundle, text, monkeypatch, capsys) for name, text in TEXTS.items()}
    evaluated = {name: _by_evaluate(bundle, text, monkeypatch) for name, text in TEXTS.items()}
    assert served == checked == evaluated == EXPECTED
