"""What each detector costs per input online, measured back to back on the same inputs.

Timings taken inside the matrix runs depend on whatever else the 2 cores were doing
at the time; these run one detector after another on one shared sample, one input
at a time (as a request arrives), with the bundle's ONNX fp32 graph.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from bench.detectors import onion, strip
from bench.detectors.classifier import Classifier
from bench.detectors.ngram import TrigramLM


def per_input_ms(decide: Callable[[str], object], texts: Sequence[str], repeats: int = 3) -> float:
    """Median over `repeats` of the mean milliseconds per input (after one warm-up input)."""
    decide(texts[0])
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for text in texts:
            decide(text)
        runs.append(1000 * (time.perf_counter() - started) / len(texts))
    return float(np.median(runs))


def detector_costs(
    classifier: Classifier, texts: Sequence[str], pool: Sequence[str], lm: TrigramLM, onion_threshold: float
) -> dict[str, float]:
    """ms per input for bare (1 pass), RAP (2 passes), STRIP (1 + N passes) and ONION (LM + 2 passes)."""
    options = strip.StripOptions()
    encode_perturbed = classifier.tokenizer.encode_perturbed  # the bundle's tokenizer knows the RAP token

    def bare(text: str) -> object:
        return classifier.probs([text])

    def rap(text: str) -> object:
        classifier.probs([text])
        return classifier.backend.infer(encode_perturbed([text]))

    def strip_check(text: str) -> object:
        classifier.probs([text])
        return strip.strip_entropies(classifier.probs, [text], pool, options)

    def onion_check(text: str) -> object:
        classifier.probs([text])
        suspicion = onion.suspicion(lm, text)
        return classifier.probs([suspicion.cleaned(onion_threshold)])

    return {
        name: per_input_ms(fn, texts)
        for name, fn in (("bare", bare), ("rap", rap), ("strip", strip_check), ("onion", onion_check))
    }
