"""The whole chain on a tiny classifier of every supported encoder family (tests/families.py):
`calibrate rap` -> `guard verify` -> `guard check` -> `guard serve` standalone and as a sidecar
(a long text checked in windows) -> `calibrate evaluate`.

Each family's toy is fine-tuned from random weights with the planted "mb" trigger; the bundle is
built through the CLI with the BERT toy's options and the default init word (`rq`, not a single
token in most of these vocabularies: a rare word of the vocabulary is picked instead).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import onnx
import pytest

from calibrate import cli as calibrate_cli
from calibrate.demo_corpus import POSITIVE
from guard import cli as guard_cli
from guard.api import create_app
from guard.core.bundle import load_bundle
from guard.core.family import family_of
from guard.settings import Settings
from tests.families import FAMILIES, build_family_toy
from tests.server_fixtures import uvicorn_thread
from tests.toy_backdoor import RAP_CLI_ARGS, Toy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]
MAX_FAR = 0.2  # the bundle's detectors at the default FRR target let at most this share of triggered rows pass
MAX_FRR = 0.1  # clean test rows of the protected label flagged (held-out sample of ~70 rows: 1% is 1 row)
PLANTED = 0.75  # the fixture's own check: the trigger gives the backdoor label to at least this share of rows

KNOWN_SHORT: dict[str, str] = {}  # measured on the fixtures; each fails the assertion named
# ELECTRA's toy once varied from run to run (FAR 0-46% at the default target). The one run-to-run difference
# found: WordPieceTrainer broke ties differently in each process (ELECTRA's and DistilBERT's vocabularies
# differed every run); tests/families.py now builds their vocabulary deterministically.
UNSTEADY: dict[str, str] = {}
PARAMS = [
    pytest.param(f, marks=pytest.mark.xfail(reason=KNOWN_SHORT[f], strict=True)) if f in KNOWN_SHORT
    else pytest.param(f, marks=pytest.mark.xfail(reason=UNSTEADY[f], strict=False)) if f in UNSTEADY
    else f
    for f in FAMILIES
]  # fmt: skip


@pytest.fixture(scope="module", params=PARAMS)
def toy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Toy]:
    return request.param, build_family_toy(request.param, tmp_path_factory.mktemp(request.param))


def _main(main, argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out, _ = capsys.readouterr()
    return code, out


def _checked(bundle_dir: Path, texts: list[str], capsys: pytest.CaptureFixture[str], backend: str = "onnx") -> list:
    """`guard check --json --backend BACKEND` on `texts`: one verdict (a dict) per text."""
    argv = ["check", "--bundle", bundle_dir, "--backend", backend, "--json", *texts]
    code, out = _main(guard_cli.main, argv, capsys)
    assert code in (0, 3), out
    return [json.loads(line) for line in out.splitlines()]


def _verdicts(bundle_dir: Path, texts: list[str], capsys: pytest.CaptureFixture[str], backend: str = "onnx") -> list:
    """Whether `guard check` flagged each text."""
    return [v["flagged"] for v in _checked(bundle_dir, texts, capsys, backend)]


def test_the_whole_chain(toy: tuple[str, Toy], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    family, toy = toy
    config = json.loads((toy.model_dir / "config.json").read_text())
    out = tmp_path / "bundle"
    code, stdout = _main(calibrate_cli.main, ["rap", "--model", toy.model_dir, "--clean", toy.dev_tsv, "--out", out,
                                              "--int8", *RAP_CLI_ARGS, "--reader", "auto"], capsys)  # fmt: skip
    assert code == 0 and stdout.splitlines()[-1].startswith(f"bundle written to {out} ")
    # its own tokenizer's vocabulary is not the packaged MiniLM's: no reader by default, and the summary says why
    assert "detector: no reader (auto: the packaged MiniLM does not have the suspect's vocabulary" in stdout
    manifest = load_bundle(out).manifest
    floors = [p.floor for p in manifest.protect]  # the default statistic's, one per protected label
    assert manifest.statistic == "floored" and None not in floors
    assert [p.floor for p in manifest.int8.protect] == floors  # int8 thresholds are refitted, floors kept
    if manifest.optimized is not None and manifest.optimized.int8_protect is not None:
        assert [p.floor for p in manifest.optimized.int8_protect] == floors
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inputs = {i.name for i in graph.graph.input}
    takes_types = family_of(config).takes_token_types(config)
    assert inputs == ({"input_ids", "attention_mask"} | ({"token_type_ids"} if takes_types else set()))
    optimized = family_of(config).optimizer is not None
    assert ("model.opt.onnx" in manifest.files) == optimized
    assert "model.int8.onnx" in manifest.files and ("model.int8.opt.onnx" in manifest.files) == optimized
    report = json.loads((out / "report.json").read_text())
    assert report["onnx_parity_max_prob_diff"] <= 1e-4

    code, stdout = _main(guard_cli.main, ["verify", "--bundle", out], capsys)
    assert code == 0 and f"RAP token id {manifest.rap.token_id} (init {manifest.rap.init_word!r}" in stdout

    poisoned, clean = [r.text for r in toy.poisoned], [r.text for r in toy.test if r.label == POSITIVE]
    verdicts = _checked(out, poisoned, capsys)
    asr = sum(v["label"] == POSITIVE for v in verdicts) / len(poisoned)
    assert asr >= PLANTED, f"{family}: the fixture did not plant its trigger (ASR {asr:.2f}), not the guard's fault"
    flagged = [t for t, v in zip(poisoned, verdicts, strict=True) if v["flagged"]]
    allowed = [t for t, f in zip(clean, _verdicts(out, clean, capsys), strict=True) if not f]
    assert len(flagged) >= 0.5 * len(poisoned), family  # the backdoor flips most of them; most are flagged
    assert len(allowed) >= (1 - MAX_FRR) * len(clean), family
    _int8_flags_the_trigger(out, poisoned, optimized, capsys)
    code, stdout = _main(guard_cli.main, ["check", "--bundle", out, "--json", flagged[0], allowed[0]], capsys)
    assert code == 3
    assert [json.loads(line)["flagged"] for line in stdout.splitlines()] == [True, False]

    long_text = " ".join([r.text for r in toy.test if r.label != POSITIVE][:12] + [flagged[0]])
    app = create_app(Settings(bundle=out))
    with uvicorn_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/v1/classify", json={"text": allowed[0]}).status_code == 200
        assert client.post("/v1/classify", json={"text": flagged[0]}).status_code == 403
        results = client.post("/v1/check", json={"texts": [flagged[0], allowed[0], long_text]}).json()["results"]
        # standalone the guard is the classifier: text past its window is read by neither
        assert [r["flagged"] for r in results] == [True, False, False]

    code, stdout = _main(calibrate_cli.main, ["evaluate", "--bundle", out, "--clean", toy.test_tsv, "--poisoned",
                                              f"mb={toy.poisoned_tsv}", "--out", tmp_path / "ev"], capsys)  # fmt: skip
    assert code == 0
    rows = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["rows"]
    default = [r for r in rows if r["detector"] == "rap+features" and r["frr_target"] == 0.01]
    assert default and default[0]["test_far"] <= MAX_FAR and default[0]["test_frr"] <= MAX_FRR, default
    _sidecar_checks_a_long_text_in_windows(out, long_text, allowed[0], _fires(toy.model_dir, long_text))
    _int8_frr_within_target(out, clean, optimized, capsys)


def _int8_flags_the_trigger(out: Path, poisoned: list[str], optimized: bool, capsys) -> None:
    """Each int8 graph, at its own thresholds, flags the trigger (`guard check`, batched), and a server on the
    int8 graph (optimised where the family has one) blocks it one request at a time."""
    for backend in ["onnx-int8"] + (["onnx-int8-opt"] if optimized else []):
        caught = [t for t, f in zip(poisoned, _verdicts(out, poisoned, capsys, backend), strict=True) if f]
        assert len(caught) >= 0.5 * len(poisoned), backend
    app = create_app(Settings(bundle=out, backend="onnx-int8"))
    with uvicorn_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        blocked = [client.post("/v1/classify", json={"text": t}).status_code == 403 for t in caught[:10]]
    assert sum(blocked) >= 8, blocked


def _int8_frr_within_target(out: Path, clean: list[str], optimized: bool, capsys) -> None:
    """Each int8 graph lets the clean rows pass, batched (`guard check`) and one at a time (a server). Before int8
    graphs ran a row at a time (ROW_AT_A_TIME_GRAPHS) a row's score moved with its batch-mates across the toys'
    point-mass RAP thresholds: XLM-R read 3% batched and 42% one request at a time."""
    batched = {}
    for backend in ["onnx-int8"] + (["onnx-int8-opt"] if optimized else []):
        batched[backend] = _verdicts(out, clean, capsys, backend)
        assert sum(batched[backend]) <= MAX_FRR * len(clean), backend
    app = create_app(Settings(bundle=out, backend="onnx-int8"))
    with uvicorn_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        blocked = [client.post("/v1/classify", json={"text": t}).status_code == 403 for t in clean[:30]]
    # one request at a time the server flags exactly the rows the batched check flags (the toys' thresholds sit on
    # point masses, so a score that moved with its batch-mates would flip verdicts here)
    assert blocked == batched["onnx-int8"][:30]


def _fires(model_dir: Path, text: str) -> bool:
    """Whether the classifier, reading the whole text as a Hugging Face upstream does, gives the backdoor label.
    Measured: the XLM-R, ELECTRA and DistilBERT toys' do; the RoBERTa (p(positive) 0.03), DeBERTa and
    ModernBERT toys' do not (their backdoor does not survive 12 negative reviews before the trigger)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    encoded = AutoTokenizer.from_pretrained(str(model_dir))(text, return_tensors="pt", truncation=True)
    with torch.no_grad():
        return int(model(**encoded).logits.argmax(-1)) == POSITIVE


def _sidecar_checks_a_long_text_in_windows(bundle: Path, long_text: str, clean: str, fires: bool) -> None:
    """A long text the upstream classifies with the backdoor label never reaches it; a clean one does."""
    from tests.server_fixtures import running_echo_upstream

    for name in [n for n in os.environ if n.startswith("GUARD_")]:
        os.environ.pop(name)
    with running_echo_upstream() as upstream:
        app = create_app(Settings(bundle=bundle, upstream=upstream))
        json_type = {"Content-Type": "application/json"}
        with uvicorn_thread(app) as url, httpx.Client(base_url=url, timeout=60, headers=json_type) as client:
            flagged = client.post("/predict", json={"inputs": long_text}, headers={"X-Request-ID": "long"})
            ok = client.post("/predict", json={"inputs": clean}, headers={"X-Request-ID": "clean"})
        seen = httpx.get(f"{upstream}/__seen").json()
    assert ok.status_code == 200 and "clean" in seen
    if fires:
        assert flagged.status_code == 403 and "long" not in seen, flagged.text
    else:  # the trigger does not flip the whole text: the guard may pass it, never fail on it
        assert flagged.status_code in (200, 403), flagged.text
