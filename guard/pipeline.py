"""check(texts) -> verdicts: encode -> pass 1 (+ pass 2) -> rap.decide.

Two schedules:
- lazy: pass 1 for every text, then pass 2 only for texts predicted as a
  protected label. Compute = (1 + share of protect-label traffic) x bare.
- fused: pass 1 and pass 2 for every text submitted together, so both land in
  the same backend batch. One round trip (lowest latency), 2 x bare compute.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from guard.batcher import Batcher, BatcherClosedError, QueueFullError, Timing
from guard.core import rap
from guard.core.errors import GuardError, InputError
from guard.core.tokenizer import RapTokenizer
from guard.core.types import Verdict

Schedule = Literal["fused", "lazy"]


class GuardFailure(GuardError):
    """The guard could not finish its check (backend error or timeout).

    `probs` holds pass-1 probabilities when pass 1 finished: failure_mode=open
    can then still answer with an (unchecked) prediction.
    """

    def __init__(self, message: str, reason: str, probs: np.ndarray | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.probs = probs


@dataclass(frozen=True)
class CheckResult:
    verdicts: list[Verdict]
    queue_seconds: float
    compute_seconds: float


class GuardPipeline:
    def __init__(
        self,
        tokenizer: RapTokenizer,
        batcher: Batcher,
        thresholds: Mapping[int, float],
        schedule: Schedule = "lazy",
        timeout_s: float = 10.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.batcher = batcher
        self.thresholds = dict(thresholds)
        self.schedule = schedule
        self.timeout_s = timeout_s

    async def check(self, texts: Sequence[str]) -> CheckResult:
        """Verdicts for `texts`; raises GuardFailure on backend error or deadline."""
        state: dict[str, np.ndarray] = {}
        run = self._fused if self.schedule == "fused" else self._lazy
        try:
            return await asyncio.wait_for(run(texts, state), self.timeout_s)
        except TimeoutError:
            raise GuardFailure(f"guard check exceeded {self.timeout_s:g} s", "timeout", state.get("probs")) from None
        except (QueueFullError, BatcherClosedError, InputError):
            raise  # not a guard failure: the caller answers 429 / 503 / 422
        except Exception as exc:  # BackendError, or anything the runtime raised
            raise GuardFailure(f"backend failed: {exc}", "backend", state.get("probs")) from exc

    async def _lazy(self, texts: Sequence[str], state: dict) -> CheckResult:
        logits, t1 = await self.batcher.submit(self.tokenizer.ids(texts), "1")
        probs = state["probs"] = rap.softmax(logits)
        rows = rap.eligible_rows(probs, self.thresholds.keys())
        perturbed, t2 = np.empty((0, probs.shape[1])), Timing(0.0, 0.0)
        if len(rows):
            logits2, t2 = await self.batcher.submit(self.tokenizer.perturbed_ids([texts[i] for i in rows]), "2")
            perturbed = rap.softmax(logits2)
        verdicts = rap.decide(probs, perturbed, self.thresholds)
        return CheckResult(verdicts, t1.queue_seconds + t2.queue_seconds, t1.compute_seconds + t2.compute_seconds)

    async def _fused(self, texts: Sequence[str], state: dict) -> CheckResult:
        ids, perturbed_ids = self.tokenizer.ids(texts), self.tokenizer.perturbed_ids(texts)
        (logits, t1), (logits2, t2) = await asyncio.gather(
            self.batcher.submit(ids, "1"), self.batcher.submit(perturbed_ids, "2")
        )
        probs = state["probs"] = rap.softmax(logits)
        rows = rap.eligible_rows(probs, self.thresholds.keys())
        verdicts = rap.decide(probs, rap.softmax(logits2)[rows], self.thresholds)
        return CheckResult(
            verdicts, max(t1.queue_seconds, t2.queue_seconds), max(t1.compute_seconds, t2.compute_seconds)
        )
