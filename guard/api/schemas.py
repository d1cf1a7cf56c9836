"""Request and response bodies (they are also the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TextsRequest(BaseModel):
    """Either `text` (one) or `texts` (several)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "a gripping, moving film"}]})

    text: str | None = Field(None, description="One text to check.")
    texts: list[str] | None = Field(None, description="Several texts to check in one call.")

    @model_validator(mode="after")
    def _exactly_one(self) -> TextsRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        if self.texts is not None and not self.texts:
            raise ValueError("'texts' is empty")
        return self

    def items(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class RapInfo(BaseModel):
    checked: bool = Field(description="Whether the RAP second pass ran (only for protect-label predictions).")
    score: float | None = Field(
        None,
        description="The RAP score in the bundle's statistic (default `floored`: logit p(label|x+RAP) - "
        "max(logit p(label|x), the label's floor)); higher means more "
        "suspicious (only with expose_scores).",
    )
    threshold: float | None = Field(None, description="Flagged when score is above this (only with expose_scores).")


class CheckItem(BaseModel):
    label: int
    label_name: str
    probs: list[float]
    flagged: bool
    flagged_by: list[str] = Field(
        default_factory=list,
        description="The detectors that flagged it: rap (the RAP score), features (the feature distance), "
        "token (a blocklisted token), reader (a clean reader disputes the label), switch (the label collapses "
        "under an untrained rare word).",
    )
    rap: RapInfo
    request_id: str


class CheckResponse(BaseModel):
    request_id: str
    decision_id: str | None = Field(None, description="Server-issued id of this decision; /v1/feedback takes it.")
    results: list[CheckItem]


class Prediction(BaseModel):
    label: int
    label_name: str
    probs: list[float]


class ClassifyResponse(BaseModel):
    request_id: str
    decision_id: str | None = Field(None, description="Server-issued id of this decision; /v1/feedback takes it.")
    results: list[Prediction]


class ErrorResponse(BaseModel):
    error: str
    error_type: str
    request_id: str


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision_id: str = Field(
        min_length=1,
        max_length=200,
        description="The decision_id of an earlier decision (response body or X-Guard-Decision-Id header).",
    )
    poisoned: bool = Field(description="Ground truth: was that input poisoned (carried a trigger)?")


class FeedbackResponse(BaseModel):
    recorded: bool
    outcome: Literal["true_accept", "false_accept", "true_reject", "false_reject"]


class HealthResponse(BaseModel):
    status: str


class InferTensor(BaseModel):
    """Open Inference Protocol tensor (v2)."""

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    id: str
    parameters: dict[str, Any] | None = Field(None, description="decision_id: the id /v1/feedback takes.")
    outputs: list[InferTensor]
