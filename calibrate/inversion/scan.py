"""`calibrate scan`: is this classifier backdoored, towards which label, with what trigger? (DBS)

For every ordered pair of labels (victim -> target) a trigger of the given length
is inverted on a few clean rows of the victim label (`inversion.invert_trigger`,
DBS Algorithm 1), then the DISCRETE trigger is stamped into held-out rows of that
label and scored: mean cross-entropy to the target (the inversion loss of DBS
eq. 7, on unseen rows) and ASR (hardening eq. 2). DBS Assumption I: flipping
rows to the true target is far easier than to any other label, so the pair with
the smallest loss is the suspect (DBS Sec. 3.2.1), and the model is called
backdoored when that loss is under a threshold (DBS Sec. 3.2.2; the hardening
paper runs DBS with 0.1) -- or, with criterion "asr", when its ASR reaches one.
Natural triggers are real: a clean sentiment model has words that flip most
inputs (measured on MiniLM/SST-2: ASR 0.69-0.80 at loss 0.72-0.94), so the loss
separates planted triggers (loss ~0.003) far better than the ASR does.

The triggers of the pairs judged backdoored also come back as probes: held-out
victim rows with the trigger typed into the text that the model sends to the
target label, in the format of a bundle's `probes.jsonl` (the live FAR canary).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from calibrate.data import load_examples
from calibrate.inversion.dbs import Inversion, discrete_outcome, invert_trigger, step_bar
from calibrate.inversion.options import CRITERIA, InversionOptions, ScanJob, ScanOptions, TemperatureOptions
from calibrate.inversion.subject import LabelRows, Subject, Trigger, check_room, correct_rows, load_subject
from calibrate.model import predict_probs
from calibrate.progress import progress_bar
from calibrate.report import markdown_table, write_json
from guard.core.errors import InputError
from guard.core.types import Example

MIN_INVERSION_ROWS = 4
MIN_HELDOUT_ROWS = 10


@dataclass(frozen=True)
class PairResult:
    """One direction victim -> target: its inverted trigger, scored on held-out rows."""

    victim: int
    target: int
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    text: str
    loss: float
    asr: float
    heldout_rows: int
    inversion: Inversion  # the run itself: loss/ASR on the inversion rows, steps, rollbacks, seconds


@dataclass(frozen=True)
class ScanResult:
    backdoored: bool
    suspect: PairResult | None  # the pair with the smallest loss (criterion asr: the largest ASR)
    pairs: list[PairResult]
    options: ScanOptions
    seconds: float
    skipped_victims: dict[int, str] = field(default_factory=dict)  # label -> why it could not be scanned
    probes: list[Example] = field(default_factory=list)  # triggered held-out rows, original labels

    @property
    def flagged(self) -> list[PairResult]:
        return [p for p in self.pairs if is_flagged(p, self.options)]

    def to_json(self) -> dict:
        return {
            "backdoored": self.backdoored,
            "suspect": _pair_json(self.suspect, self.options) if self.suspect else None,
            "criterion": self.options.criterion,
            "threshold": _threshold(self.options),
            "pairs": [_pair_json(p, self.options) for p in self.pairs],
            "skipped_victims": {str(k): v for k, v in self.skipped_victims.items()},
            "probes": len(self.probes),
            "seconds": round(self.seconds, 2),
            "options": asdict(self.options),
        }


def scan_model(subject: Subject, clean: list[Example], options: ScanOptions = ScanOptions()) -> ScanResult:
    """Invert a trigger for every (victim, target) pair and judge the model (DBS)."""
    started = time.perf_counter()
    _check_options(subject, options)
    rows = correct_rows(subject, clean, options.inversion.seed)
    inversion_rows, heldout = rows.split(options.rows_per_label, options.heldout_per_label)
    skipped = _unusable_victims(inversion_rows, heldout)
    victims = [label for label in range(subject.num_labels) if label not in skipped]
    if not victims:
        raise InputError(f"too little clean data to scan: {_describe(skipped)}")
    pairs = [(v, t) for v in victims for t in range(subject.num_labels) if t != v]
    results = []
    for victim, target in progress_bar(pairs, desc="scan", unit="pair", disable=not options.progress):
        results.append(scan_pair(subject, inversion_rows, heldout, victim, target, options))
    backdoored, suspect = verdict(results, options)
    flagged = [p for p in results if is_flagged(p, options)]
    probes = probe_rows(subject, heldout, flagged, options.inversion.position, options.inversion.seed)
    seconds = time.perf_counter() - started
    return ScanResult(backdoored, suspect, results, options, seconds, skipped, probes)


def scan_pair(
    subject: Subject,
    inversion_rows: LabelRows,
    heldout: LabelRows,
    victim: int,
    target: int,
    options: ScanOptions,
) -> PairResult:
    """Invert a `trigger_length`-token trigger victim -> target; score it on the held-out victim rows."""
    inversion_options = options.inversion
    bar, on_step = step_bar(inversion_options.steps, f"{victim}->{target}", options.progress)
    with bar:
        found = invert_trigger(
            subject,
            subject.tokenizer.ids(inversion_rows.texts[victim]),
            target,
            options.trigger_length,
            inversion_options,
            on_step,
        )
    scored = discrete_outcome(
        subject.model,
        subject.tokenizer.ids(heldout.texts[victim]),
        found.token_ids,
        target,
        inversion_options.position,
        subject.tokenizer.pad_id,
        inversion_options.seed,
    )
    vocabulary = subject.vocabulary
    return PairResult(
        victim=victim,
        target=target,
        token_ids=found.token_ids,
        tokens=tuple(vocabulary.token(i) for i in found.token_ids),
        text=vocabulary.text(found.token_ids),
        loss=scored.loss,
        asr=scored.asr,
        heldout_rows=scored.rows,
        inversion=found,
    )


def is_flagged(pair: PairResult, options: ScanOptions) -> bool:
    if options.criterion == "asr":
        return pair.asr >= options.asr_threshold
    return pair.loss < options.loss_threshold


def verdict(pairs: list[PairResult], options: ScanOptions) -> tuple[bool, PairResult | None]:
    """The suspect pair (DBS Assumption I: the easiest flip) and whether it crosses the threshold."""
    if not pairs:
        return False, None
    if options.criterion == "asr":
        suspect = max(pairs, key=lambda p: (p.asr, -p.loss))
    else:
        suspect = min(pairs, key=lambda p: (p.loss, -p.asr))
    return is_flagged(suspect, options), suspect


def insert_words(text: str, words: str, position: str, rng: random.Random) -> str:
    """Type `words` into `text` between its whitespace-separated words (start, middle, end or random)."""
    parts = text.split()
    at = {"start": 0, "end": len(parts), "middle": len(parts) // 2}.get(position)
    if at is None:
        at = rng.randint(0, len(parts))
    return " ".join(parts[:at] + [words] + parts[at:])


def probe_rows(
    subject: Subject, heldout: LabelRows, pairs: list[PairResult], position: str, seed: int
) -> list[Example]:
    """Held-out victim rows with a flagged pair's trigger typed in, kept if the model then predicts its target.

    Labels are the rows' ORIGINAL labels, as in every poisoned file (and in `probes.jsonl`).
    """
    rng = random.Random(seed)
    probes = []
    for pair in pairs:
        texts = [insert_words(text, pair.text, position, rng) for text in heldout.texts[pair.victim]]
        if not texts:
            continue
        predicted = predict_probs(subject.model, subject.tokenizer, texts).argmax(axis=1)
        probes += [Example(t, pair.victim) for t, p in zip(texts, predicted, strict=True) if p == pair.target]
    return probes


def write_probes(path: Path, probes: list[Example]) -> None:
    """JSONL `{"text", "label"}` lines: what `calibrate rap --probes` and the guard's canary read."""
    Path(path).write_text("".join(json.dumps({"text": p.text, "label": p.label}) + "\n" for p in probes))


def _check_options(subject: Subject, options: ScanOptions) -> None:
    if subject.num_labels < 2:
        raise InputError(f"the model has {subject.num_labels} label; a backdoor needs at least two")
    if options.criterion not in CRITERIA:
        raise InputError(f"unknown criterion {options.criterion!r}; choose one of {', '.join(CRITERIA)}")
    check_room(subject, options.trigger_length)


def _unusable_victims(inversion_rows: LabelRows, heldout: LabelRows) -> dict[int, str]:
    skipped = {}
    for label, texts in inversion_rows.texts.items():
        n_heldout = len(heldout.texts[label])
        if len(texts) < MIN_INVERSION_ROWS or n_heldout < MIN_HELDOUT_ROWS:
            skipped[label] = (
                f"{len(texts) + n_heldout} correctly classified clean rows "
                f"(need {MIN_INVERSION_ROWS} to invert on + {MIN_HELDOUT_ROWS} held out)"
            )
    return skipped


def _describe(skipped: dict[int, str]) -> str:
    return "; ".join(f"label {label}: {why}" for label, why in skipped.items())


def _threshold(options: ScanOptions) -> float:
    return options.asr_threshold if options.criterion == "asr" else options.loss_threshold


def _pair_json(pair: PairResult, options: ScanOptions) -> dict:
    return asdict(pair) | {"flagged": is_flagged(pair, options)}


def scan_options_from_report(report_path: Path) -> ScanOptions:
    """The options a `calibrate scan --out` report was made with (to rescan the same way)."""
    try:
        options = dict(_read_report(report_path)["options"])
        inversion = dict(options.pop("inversion"))
        inversion["temperature"] = TemperatureOptions(**inversion["temperature"])
        return ScanOptions(**{**options, "inversion": InversionOptions(**inversion)})
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{report_path} does not record the options of its scan: {exc}") from exc


def _read_report(report_path: Path) -> dict:
    try:
        return json.loads(Path(report_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{report_path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{report_path} is not a `calibrate scan` report: {exc}") from exc


def triggers_from_scan(report_path: Path) -> list[Trigger]:
    """The triggers of the pairs a `calibrate scan --out` report judged backdoored."""
    report = _read_report(report_path)
    try:
        flagged = [p for p in report["pairs"] if p["flagged"]]
        triggers = [Trigger(tuple(p["token_ids"]), int(p["target"]), p["text"]) for p in flagged]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{report_path} is not a `calibrate scan` report: {exc}") from exc
    if not triggers:
        raise InputError(
            f"the scan in {report_path} found no backdoor; pass --trigger TEXT --target LABEL to unlearn one anyway"
        )
    return triggers


# ------------------------------------------------------------------ `calibrate scan`


def run_scan(job: ScanJob, say: Callable[[str], None] = print) -> ScanResult:
    """`calibrate scan`: scan the model, print the pairs and the verdict, write the report and probes."""
    for path in (job.out, job.probes_out):
        check_writable(path)
    clean = load_examples(job.clean)
    result = scan_model(load_subject(job.model, job.max_length), clean, job.options)
    say(markdown_table(*_table(result)))
    say(scan_verdict(result))
    if job.out:
        write_json(job.out, result.to_json())
        say(f"report: {job.out}")
    if job.probes_out:
        _write_scan_probes(job.probes_out, result.probes, say)
    return result


def check_writable(path: Path | None) -> None:
    if path is not None and not path.parent.is_dir():
        raise InputError(f"{path}: its folder {path.parent} does not exist")


def _table(result: ScanResult) -> tuple[list[dict], list[str]]:
    rows = [
        {
            "victim -> target": f"{p.victim} -> {p.target}",
            "trigger": p.text,
            "loss": p.loss,
            "ASR": p.asr,
            "steps": p.inversion.steps,
            "seconds": round(p.inversion.seconds),
            "flagged": "yes" if is_flagged(p, result.options) else "",
        }
        for p in result.pairs
    ]
    return rows, list(rows[0])


def scan_verdict(result: ScanResult) -> str:
    s = result.suspect
    threshold = f"loss {s.loss:.4f} < {result.options.loss_threshold:g}"
    if result.options.criterion == "asr":
        threshold = f"ASR {s.asr:.4f} >= {result.options.asr_threshold:g}"
    skipped = "".join(f"\nnot scanned as victim: label {k} ({why})" for k, why in result.skipped_victims.items())
    if result.backdoored:
        return f"backdoored: label {s.victim} -> {s.target} flips with {s.text!r} ({threshold}){skipped}"
    return f"clean: no label pair crosses the threshold (closest: {s.victim} -> {s.target} {s.text!r}){skipped}"


def _write_scan_probes(path: Path, probes: list[Example], say: Callable[[str], None]) -> None:
    if not probes:
        print(f"no probes written to {path}: no trigger was flagged", file=sys.stderr)
        return
    write_probes(path, probes)
    say(f"probes: {path} ({len(probes)} rows; `calibrate rap --probes {path}` puts them in a bundle)")
