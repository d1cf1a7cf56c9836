"""The two-pass check, written once: windows -> eligible rows -> perturb -> score -> finite check -> merge.

`TwoPass.run(windows)` returns a `Run` whose `steps()` is a generator: it yields the passes
it needs (a list of `Pass`), is sent their outputs (the backend call's rows, in order) and
returns the rows' scores. It does no I/O, so the async server (guard.pipeline, through its
batcher) and the offline checker (guard.core.checker: `guard check`, `calibrate evaluate`)
drive the same steps and cannot answer differently. `verdicts` then applies the flag rule
(guard.core.detection) and merges a text's windows.

Two schedules: lazy (pass 1 for every row, then pass 2 for the rows predicted as a
protected label) and fused (both passes for every row at once, one round trip). With
the feature detector on, each backend row is the logits and the features packed
(`backend_call`), so the batcher moves one array per row. With the reader detector on,
the rows predicted as a protected label also go, unchanged, to the reader's graph
(pass "R", guard.core.reader): beside pass 2 when lazy, after both passes when fused; with the
switch detector on, they go to the model's graph once more with RAP's init word inserted
untrained (pass "S", guard.core.switch), at the same point.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from guard.core import detection, features, rap, reader, switch
from guard.core.detection import Detection, RowScores
from guard.core.errors import GuardError
from guard.core.tokenizer import RapTokenizer, Windows
from guard.core.types import EncodedBatch, LabelThresholds, Verdict

Schedule = Literal["fused", "lazy"]
BACKEND_FAULTS = ("backend", "nonfinite")  # the failures failure_mode=open may let through


class GuardFailure(GuardError):
    """The guard could not finish its check (backend error, non-finite output, timeout).

    `probs` holds pass-1 probabilities (one row per text) when pass 1 finished:
    failure_mode=open can then still answer with an (unchecked) prediction, for a backend fault only.
    """

    def __init__(self, message: str, reason: str, probs: np.ndarray | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.probs = probs

    @property
    def backend_fault(self) -> bool:
        """A backend error or non-finite output. A timeout is not: a client could aim for one
        (admitted work that ran late), so it must never become an unchecked pass."""
        return self.reason in BACKEND_FAULTS


@dataclass(frozen=True)
class Pass:
    """Rows for one backend pass: "1" (the text), "2" (the text with the RAP token), "R" (the
    text, for the reader's graph) or "S" (the text with the switch detector's word)."""

    name: Literal["1", "2", "R", "S"]
    rows: list[list[int]]
    priority: bool = False  # pass 2 of lazy scheduling: its pass 1 already waited once


Steps = Generator[list[Pass], list[np.ndarray], RowScores]


class TwoPass:
    """The check of one bundle's detectors at fixed thresholds (`limits`, per protected label)."""

    def __init__(
        self,
        tokenizer: RapTokenizer,
        limits: Mapping[int, LabelThresholds],
        statistic: rap.Statistic = rap.DEFAULT_STATISTIC,
        stats: features.FeatureStats | None = None,
        classes: int | None = None,
        schedule: Schedule = "lazy",
        floors: Mapping[int, float] | None = None,
        switch_id: int | None = None,
    ) -> None:
        self.tokenizer, self.limits, self.statistic, self.schedule = tokenizer, dict(limits), statistic, schedule
        self.floors = dict(floors or {})  # the floored statistic's, per protected label
        self.uses_rap = any(t.rap is not None for t in self.limits.values())
        self.stats = stats if any(t.features is not None for t in self.limits.values()) else None
        self.uses_reader = any(t.reader is not None for t in self.limits.values())
        self.uses_switch = any(t.switch is not None for t in self.limits.values())
        if self.uses_switch and switch_id is None:
            raise ValueError("the switch detector is on but no switch token id was given")
        self.switch_id = switch_id
        if self.stats is not None and classes is None:
            raise ValueError("the feature detector needs the number of labels to unpack the backend's rows")
        self.classes = classes

    @classmethod
    def of(
        cls,
        tokenizer: RapTokenizer,
        chosen: Detection,
        classes: int,
        frr: float | None = None,
        schedule: Schedule = "lazy",
    ) -> TwoPass:
        return cls(
            tokenizer, chosen.thresholds(frr), chosen.statistic, chosen.stats, classes, schedule, chosen.floors,
            chosen.switch_id,
        )  # fmt: skip

    @property
    def passes(self) -> int:
        """Backend passes a row may need."""
        return 1 + self.uses_rap + self.uses_reader + self.uses_switch

    def backend_call(self, backend) -> Callable[[EncodedBatch], np.ndarray]:
        """What to run per batch: the logits, or [logits | features] per row with the feature detector on."""
        if self.stats is None:
            return backend.infer

        def infer(batch: EncodedBatch) -> np.ndarray:
            logits, feats = backend.infer_with_features(batch)
            return np.concatenate([logits, feats.reshape(len(feats), -1)], axis=1)

        return infer

    def run(self, windows: Windows) -> Run:
        return Run(self, windows)

    def verdicts(self, scores: RowScores) -> list[Verdict]:
        """One verdict per text (guard.core.detection.verdicts at these thresholds)."""
        return detection.verdicts(scores, self.limits)

    def unpack(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, features or None) from the backend call's rows."""
        if self.stats is None:
            return outputs, None
        shape = (len(outputs), self.stats.layers, self.stats.hidden)
        return outputs[:, : self.classes], outputs[:, self.classes :].reshape(shape)


class Run:
    """One check of `windows`; `first_probs` (pass 1, a row per text) is set once pass 1 is in."""

    def __init__(self, two_pass: TwoPass, windows: Windows) -> None:
        self.two_pass, self.windows = two_pass, windows
        self.owner = np.asarray(windows.owner, dtype=np.intp)
        self.first_probs: np.ndarray | None = None

    def steps(self) -> Steps:
        tp, rows = self.two_pass, self.windows.rows
        if not rows:
            return _no_rows()
        fused = tp.schedule == "fused" and tp.uses_rap
        first = [Pass("1", rows)] + ([Pass("2", tp.tokenizer.perturb(rows))] if fused else [])
        outputs = yield first
        logits, feats = tp.unpack(outputs[0])
        probs = _softmax(logits, "pass 1", None)
        self.first_probs = probs[detection.first_windows(self.owner)]
        eligible = rap.eligible_rows(probs, tp.limits.keys())
        perturbed = _softmax(tp.unpack(outputs[1])[0], "pass 2", self.first_probs)[eligible] if fused else None
        scores = RowScores.unscored(probs, self.owner)
        if not len(eligible):
            return scores
        picked = [rows[i] for i in eligible]
        later = [Pass("2", tp.tokenizer.perturb(picked), priority=True)] if tp.uses_rap and not fused else []
        later += [Pass("R", picked, priority=True)] if tp.uses_reader else []
        later += [Pass("S", tp.tokenizer.insert(picked, tp.switch_id), priority=True)] if tp.uses_switch else []
        done = dict(zip((p.name for p in later), (yield later) if later else [], strict=True))
        label = probs[eligible].argmax(axis=1)
        if tp.uses_rap:
            if not fused:
                perturbed = _softmax(tp.unpack(done["2"])[0], "pass 2", self.first_probs)
            scores.rap[eligible] = rap.scores(probs[eligible], perturbed, tp.statistic, tp.floors)
        if tp.uses_reader:
            read = _softmax(done["R"], "the reader pass", self.first_probs)
            scores.reader[eligible] = reader.scores(probs[eligible], read, label)
        if tp.uses_switch:
            switched = _softmax(tp.unpack(done["S"])[0], "the switch pass", self.first_probs)
            scores.switch[eligible] = switch.scores(probs[eligible], switched, label)
        if tp.stats is not None:
            if not np.isfinite(feats[eligible]).all():
                raise GuardFailure("the model returned non-finite features in pass 1", "nonfinite", self.first_probs)
            scores.features[eligible] = features.scores(tp.stats, feats[eligible], label)
            scores.token[eligible] = features.blocked(tp.stats, picked)
        return scores


def _no_rows() -> RowScores:
    return RowScores.unscored(np.empty((0, 0)), np.empty(0, dtype=np.intp))


def _softmax(logits: np.ndarray, which: str, known: np.ndarray | None) -> np.ndarray:
    """Softmax of finite logits; NaN or inf is a guard failure, never an answer."""
    if not np.isfinite(logits).all():
        raise GuardFailure(f"the model returned non-finite logits in {which}", "nonfinite", known)
    return rap.softmax(logits)


def drive(steps: Steps, infer: Callable[[Pass], np.ndarray]) -> RowScores:
    """Run `steps` to the end synchronously, each pass through `infer`."""
    outputs = None
    while True:
        try:
            passes = steps.send(outputs)
        except StopIteration as done:
            return done.value
        outputs = [infer(p) for p in passes]
