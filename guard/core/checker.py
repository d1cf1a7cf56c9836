"""The offline two-pass check: texts -> verdicts, synchronously, behind `guard check`,
`calibrate evaluate`, the demo and the benchmarks.

It drives the server's steps (guard.core.runner: the same windows over long texts, the
same refusal of a text with no token, the same non-finite check) with plain backend calls
in batches of `batch_size` rows instead of the server's micro-batcher.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from guard.core.backends.base import Backend, load_reader, precision_of
from guard.core.bundle import Bundle
from guard.core.detection import Detection, RowScores
from guard.core.runner import Pass, TwoPass, drive
from guard.core.tokenizer import ClassifierWindow
from guard.core.types import Verdict


class Checker:
    def __init__(
        self,
        two_pass: TwoPass,
        backend: Backend,
        classifier_max_length: ClassifierWindow = None,
        batch_size: int = 32,
        reader: Backend | None = None,
    ) -> None:
        """`reader`: the reader detector's graph (guard.core.backends.base.load_reader), when it is on."""
        if two_pass.uses_reader and reader is None:
            raise ValueError("the reader detector is on but no reader graph was given")
        self.two_pass = two_pass
        self.tokenizer = two_pass.tokenizer
        self.classifier_max_length = classifier_max_length
        self.batch_size = batch_size
        model = two_pass.backend_call(backend)
        self._infer = {"1": model, "2": model, "S": model}
        if reader is not None:
            self._infer["R"] = reader.infer

    @classmethod
    def for_bundle(
        cls, bundle: Bundle, backend: Backend, chosen: Detection | None = None, frr: float | None = None
    ) -> Checker:
        """A checker of `chosen` (default: every detector of the bundle, on the backend's thresholds) at
        `frr`, reading what the bundle's classifier reads (its recorded window), as `guard serve` does."""
        chosen = chosen or Detection.of(bundle, precision=precision_of(backend.name))
        classes = len(bundle.manifest.model.labels)
        two_pass = TwoPass.of(bundle.tokenizer(), chosen, classes, frr)
        reader = load_reader(bundle.path) if "reader" in chosen.detectors else None
        return cls(two_pass, backend, bundle.manifest.model.classifier_max_length, reader=reader)

    def check(self, texts: Sequence[str]) -> list[Verdict]:
        """One verdict per text; InputError for a text with no token, GuardFailure on non-finite output."""
        return self.two_pass.verdicts(self.scores(texts))

    def scores(self, texts: Sequence[str]) -> RowScores:
        """Every detector's score per window of each text (guard.core.detection.RowScores)."""
        windows = self.tokenizer.windows(list(texts), self.classifier_max_length)
        return drive(self.two_pass.run(windows).steps(), self._pass)

    def _pass(self, step: Pass) -> np.ndarray:
        rows, infer = step.rows, self._infer[step.name]
        chunks = [
            infer(self.tokenizer.pad(rows[i : i + self.batch_size])) for i in range(0, len(rows), self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.empty((0, 0))
