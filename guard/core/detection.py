"""What a bundle detects with, and the one rule that flags a row.

The detectors, each a score where higher means more suspicious:
- "rap": the RAP score of pass 2 (guard.core.rap), flagged above the label's RAP threshold;
- "features": pass 1's feature distance (guard.core.features), flagged above its threshold;
- "token": a blocklisted input token (outlier embedding norm, a row that moved from the
  reference checkpoint, a flip-scan hit), flagged wherever the feature detector is on;
- "reader": the suspect's log-odds minus a clean reader's (guard.core.reader);
- "switch" (opt-in): how far the label falls when RAP's init word is inserted untrained
  (guard.core.switch), against a backdoor taught to switch off under insertions.
Only rows predicted as a protected label are checked. A row is flagged when any detector
flags it; a text when any of its windows is. The server, `guard check`, `calibrate
evaluate` and the benchmarks all flag with `flags`, and calibration fits every threshold
with `fit_label`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from guard.core import rap, thresholds
from guard.core.bundle import Bundle, JointThreshold, ProtectedLabel
from guard.core.errors import BundleError
from guard.core.features import FeatureStats
from guard.core.rap import Statistic
from guard.core.types import LabelThresholds, RapCheck, Verdict

DETECTORS = ("rap", "features", "reader", "switch")  # what a bundle is calibrated for and a setting chooses
FLAGS = ("rap", "features", "token", "reader", "switch")  # what may flag a row (the blocklist comes with "features")
SCORED = ("rap", "features", "reader", "switch")  # RowScores' float scores, NaN where not scored
CALIBRATED_PASSES = ("reader", "switch")  # detectors whose thresholds only the fp32 graph's calibration fits


@dataclass(frozen=True)
class Detection:
    """The detectors chosen from a bundle: the statistic, per protected label its thresholds by FRR
    target (`labels`), the feature statistics with their token blocklist (None without "features")
    and the word the switch pass inserts (None without "switch")."""

    statistic: Statistic
    detectors: tuple[str, ...]
    labels: Mapping[int, ProtectedLabel]
    stats: FeatureStats | None
    default_frr: float
    switch_id: int | None = None

    @classmethod
    def of(cls, bundle: Bundle, detectors: Sequence[str] | None = None, precision: str = "fp32") -> Detection:
        """`detectors` (default: every one the bundle has; () checks nothing) on `precision`'s thresholds."""
        chosen = bundle.detectors if detectors is None else tuple(d for d in DETECTORS if d in detectors)
        missing = [d for d in chosen if d not in bundle.detectors]
        if missing:
            raise BundleError(f"{bundle.path} has no {', '.join(missing)} detector; rebuild it with `calibrate rap`")
        stats = bundle.feature_stats() if "features" in chosen else None
        labels = {p.label: p for p in bundle.protected(precision)}
        for name in (d for d in CALIBRATED_PASSES if d in chosen):
            if not all(getattr(p, f"{name}_thresholds") for p in labels.values()):
                raise BundleError(f"{bundle.path}: the {name} detector is calibrated on the fp32 graph only; serve "
                                  "the onnx backend, or choose the detectors rap,features")  # fmt: skip
        statistic = bundle.manifest.statistic
        if statistic in rap.FLOORED and not all(p.floor is not None and np.isfinite(p.floor) for p in labels.values()):
            raise BundleError(f"{bundle.path}: the {statistic} statistic needs every protected label's (finite) "
                              "floor; rebuild it with `calibrate rap`")  # fmt: skip
        switch = bundle.manifest.switch.token_id if "switch" in chosen else None  # chosen: the bundle has it
        return cls(statistic, chosen, labels, stats, bundle.manifest.default_frr, switch)

    @property
    def floors(self) -> dict[int, float]:
        """Per protected label its floor (the floored statistic; empty under the others)."""
        if self.statistic not in rap.FLOORED:
            return {}
        return {label: p.floor for label, p in self.labels.items() if p.floor is not None}

    @property
    def targets(self) -> list[float]:
        """The FRR targets with stored thresholds."""
        return [float(k) for k in next(iter(self.labels.values())).thresholds]

    def thresholds(self, frr: float | None = None) -> dict[int, LabelThresholds]:
        """Per protected label, the chosen detectors' thresholds at `frr` (default: the bundle's).

        Several detectors use the thresholds chosen jointly at calibration (RAP and the features;
        every detector of a bundle with a reader or a switch detector); otherwise, or at a target not stored, each
        gets an even share of it, read from its own table (their union then flags at most the
        target on the held-out rows). No detector: no label is checked."""
        frr = self.default_frr if frr is None else frr
        return {label: _at(p, set(self.detectors), frr) for label, p in self.labels.items() if self.detectors}


def _at(p: ProtectedLabel, detectors: set[str], frr: float) -> LabelThresholds:
    key = f"{frr:g}"
    stored = {"rap": p.thresholds, "features": p.features_thresholds, "reader": p.reader_thresholds,
              "switch": p.switch_thresholds}  # fmt: skip
    tables = {"rap": p.percentiles, "features": p.features_percentiles, "reader": p.reader_percentiles,
              "switch": p.switch_percentiles}  # fmt: skip
    if len(detectors) == 1:
        (only,) = detectors
        return LabelThresholds(**{only: _read(stored[only], tables[only], frr)})
    for chosen_together in (p.joint.get(key), p.joint_reader.get(key)):  # each holds the detectors it was fitted for
        if chosen_together is not None and {d for d in SCORED if getattr(chosen_together, d) is not None} == detectors:
            return LabelThresholds(**{d: getattr(chosen_together, d) for d in detectors})
    share = frr / len(detectors)  # from the tables: the stored values are each detector's alone at a whole target
    return LabelThresholds(**{d: thresholds.threshold_from_table(tables[d], share) for d in detectors})


def _read(stored: Mapping[str, float], table: Mapping[str, float], frr: float) -> float:
    value = stored.get(f"{frr:g}")
    return value if value is not None else thresholds.threshold_from_table(table, frr)


# ------------------------------------------------------------------ scores and the rule


@dataclass(frozen=True)
class RowScores:
    """Per pass-1 row (a window of a text, `owner[i]` its text): pass-1 probabilities and each
    detector's score; NaN (False for `token`) where that detector did not score the row."""

    probs: np.ndarray
    owner: np.ndarray
    rap: np.ndarray
    features: np.ndarray
    token: np.ndarray
    reader: np.ndarray
    switch: np.ndarray

    @classmethod
    def unscored(cls, probs: np.ndarray, owner: np.ndarray) -> RowScores:
        """Pass 1's rows before any detector scored them."""
        n = len(owner)
        return cls(probs, owner, token=np.zeros(n, dtype=bool), **{d: np.full(n, np.nan) for d in SCORED})

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1) if len(self.probs) else np.empty(0, dtype=np.intp)

    @property
    def texts(self) -> int:
        return int(self.owner.max()) + 1 if len(self.owner) else 0

    @classmethod
    def concat(cls, parts: Sequence[RowScores]) -> RowScores:
        """Scores of consecutive batches of texts as one."""
        offsets = np.cumsum([0, *(p.texts for p in parts[:-1])])
        fields = {name: np.concatenate([getattr(p, name) for p in parts]) for name in ("probs", *SCORED)}
        owner = np.concatenate([p.owner + o for p, o in zip(parts, offsets, strict=True)])
        return cls(owner=owner, token=np.concatenate([p.token for p in parts]), **fields)


def flags(scores: RowScores, limits: Mapping[int, LabelThresholds]) -> dict[str, np.ndarray]:
    """THE rule: per detector of FLAGS, which rows it flags (each row with its predicted label's
    thresholds; a row of an unprotected label, or unscored, is never flagged)."""
    predicted = scores.predicted
    limit = {d: rap.per_label(predicted, {label: getattr(t, d) for label, t in limits.items()}) for d in SCORED}
    with np.errstate(invalid="ignore"):  # NaN (unscored, detector off) compares False
        return {
            "rap": scores.rap > limit["rap"],
            "features": scores.features > limit["features"],
            "token": scores.token & ~np.isnan(limit["features"]),
            "reader": scores.reader > limit["reader"],
            "switch": scores.switch > limit["switch"],
        }


def flagged_texts(scores: RowScores, limits: Mapping[int, LabelThresholds]) -> np.ndarray:
    """Per text: flagged by any detector in any of its windows."""
    rows = np.logical_or.reduce(list(flags(scores, limits).values()))
    return per_text(rows, scores.owner, scores.texts)


def per_text(rows: np.ndarray, owner: np.ndarray, texts: int) -> np.ndarray:
    """Whether any window of each text has `rows` set."""
    out = np.zeros(texts, dtype=bool)
    np.logical_or.at(out, owner, rows)
    return out


def first_windows(owner: np.ndarray) -> np.ndarray:
    """Index of each text's first window."""
    return np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if len(owner) else np.empty(0, dtype=np.intp)


def verdicts(scores: RowScores, limits: Mapping[int, LabelThresholds]) -> list[Verdict]:
    """One verdict per text. Its label and probabilities are its first window's; flagged_by joins
    every window's; the scores shown are the first flagged window's, else the first checked one's."""
    by_detector = flags(scores, limits)
    flagged = np.logical_or.reduce(list(by_detector.values()))
    checked = np.logical_or.reduce([~np.isnan(getattr(scores, d)) for d in SCORED])
    predicted = scores.predicted
    out = []
    for text, first in enumerate(first_windows(scores.owner).tolist()):
        windows = np.flatnonzero(scores.owner == text)
        shown = next((w for w in windows if flagged[w]), next((w for w in windows if checked[w]), first))
        names = tuple(d for d in FLAGS if by_detector[d][windows].any())
        limit = limits.get(int(predicted[shown]), LabelThresholds(None))
        feature_score = _shown(scores.features[shown], limit.features)
        out.append(
            Verdict(
                label=int(predicted[first]),
                probs=tuple(float(x) for x in scores.probs[first]),
                flagged=bool(names),
                rap=_rap_check(scores.rap[shown], limit.rap),
                flagged_by=names,
                feature_score=feature_score,
                feature_threshold=None if feature_score is None else limit.features,
            )
        )
    return out


def _rap_check(score: float, threshold: float | None) -> RapCheck:
    if threshold is None or np.isnan(score):
        return RapCheck(checked=False)
    return RapCheck(checked=True, score=float(score), threshold=threshold)


def _shown(score: float, threshold: float | None) -> float | None:
    return None if threshold is None or np.isnan(score) else float(score)


# ------------------------------------------------------------------ calibration


def fit_label(
    label: int,
    name: str,
    frr_targets: Sequence[float],
    rap_scores: np.ndarray,
    feature_scores: np.ndarray | None = None,
    blocked: np.ndarray | None = None,
    floor: float | None = None,
    reader_scores: np.ndarray | None = None,
    switch_scores: np.ndarray | None = None,
) -> ProtectedLabel:
    """Every threshold of one protected label from its held-out clean rows: RAP alone and, given the
    same rows' feature scores and blocklist hits, the features alone and both together (a blocked
    row counts against the target at any threshold); given their reader or switch scores, each of
    those alone and every detector together. `floor`: the floored statistic's, kept with them."""
    fields = {}
    if feature_scores is not None:
        held_out = feature_scores if blocked is None else np.where(blocked, np.inf, feature_scores)
        fields = {
            "features_thresholds": {f"{frr:g}": thresholds.threshold_at_frr(held_out, frr) for frr in frr_targets},
            "features_percentiles": thresholds.percentile_table(held_out),
            "joint": {f"{frr:g}": _joint(rap_scores, held_out, frr) for frr in frr_targets},
        }
    passes = {"reader": reader_scores, "switch": switch_scores}
    passes = {d: v for d, v in passes.items() if v is not None}
    for detector, values in passes.items():
        fields |= {
            f"{detector}_thresholds": {f"{frr:g}": thresholds.threshold_at_frr(values, frr) for frr in frr_targets},
            f"{detector}_percentiles": thresholds.percentile_table(values),
        }
    if passes:
        together = {"rap": rap_scores, "features": None if feature_scores is None else held_out, **passes}
        together = {d: v for d, v in together.items() if v is not None}
        fields["joint_reader"] = {f"{frr:g}": _union(together, frr) for frr in frr_targets}
    return ProtectedLabel(
        label=label,
        name=name,
        thresholds={f"{frr:g}": thresholds.threshold_at_frr(rap_scores, frr) for frr in frr_targets},
        percentiles=thresholds.percentile_table(rap_scores),
        calibration_rows=len(rap_scores),
        floor=floor,
        **fields,
    )


def _union(scores: Mapping[str, np.ndarray], frr: float) -> JointThreshold:
    chosen, _ = thresholds.union(list(scores.values()), frr)
    return JointThreshold(**dict(zip(scores, chosen, strict=True)))


def _joint(rap_scores: np.ndarray, feature_scores: np.ndarray, frr: float) -> JointThreshold:
    pair = thresholds.joint(rap_scores, feature_scores, frr)
    return JointThreshold(rap=pair.rap, features=pair.features)
