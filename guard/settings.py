"""The ONE settings object of the server. Nothing else reads the environment.

Sources, highest first: CLI flags (passed as init values), `GUARD_*` environment
variables, the optional YAML file (`--config`), these defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

DEFAULT_PASSTHROUGH = (
    "GET /",
    "GET /health",
    "GET /healthz",
    "GET /readyz",
    "GET /v2",
    "GET /v2/health/live",
    "GET /v2/health/ready",
    "GET /v2/models/*",
    "GET /v2/models/*/ready",
    "HEAD /",
    "OPTIONS /",
)


# String values under these keys are structure in the bodies upstreams take (OIP tensors, HF parameters).
DEFAULT_STRUCTURAL_KEYS = ("id", "name", "datatype", "content_type", "function_to_apply")
# A form body holds percent-encoded fields an upstream binds one by one: never readable as one text.
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

DETECTORS = ("rap", "features", "reader", "switch", "none")  # "none" stands alone: a bare classifier


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GUARD_", extra="forbid", validate_default=True)

    bundle: Path = Field(description="Guard bundle directory written by `calibrate rap`.")
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in containers).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve /metrics on this port instead of the service port (so the service port can stay "
        "closed to the scraper, and the scraper's port to clients).",
    )
    backend: Literal["onnx", "onnx-int8", "torch"] = Field(
        "onnx",
        description="Inference backend: ONNX Runtime fp32 (default), its int8 graph if the bundle has one, or torch.",
    )
    optimized_graphs: bool = Field(
        True,
        description="Serve the bundle's optimised graph (model.opt.onnx, model.int8.opt.onnx: ONNX Runtime's "
        "transformer fusions) when it has one; false: the exported graph as it is.",
    )
    detectors: list[str] | None = Field(
        None,
        description="What checks each input (default: every detector the bundle has): rap (the two-pass RAP "
        "check), features (the one-pass feature detector), reader (a clean classifier's second opinion, "
        "`calibrate rap --reader`), switch (RAP's word inserted untrained, `calibrate rap --switch`), several "
        "(flagged when any flags), or none: a "
        "bare pass-through classifier (one pass, no check, nothing flagged; for baselines, logged as a "
        "warning and reported by guard_detectors).",
    )
    threads: int | None = Field(None, ge=1, description="Intra-op threads for the backend (default: runtime's choice).")
    spinning: bool = Field(
        False,
        description="Let ONNX Runtime's threads spin-wait between operators: lower latency on idle dedicated "
        "cores, but about twice the CPU per request (measured on 2 shared cores, where latency was lower without).",
    )
    schedule: Literal["fused", "lazy"] = Field(
        "lazy",
        description=(
            "fused: x and x+RAP in one batch (lowest latency); "
            "lazy: pass 2 only for protect-label predictions (least compute)."
        ),
    )
    mode: Literal["enforce", "shadow"] = Field(
        "enforce", description="enforce: flagged requests get 403; shadow: answered, flag reported in a header."
    )
    frr: float | None = Field(None, gt=0, lt=1, description="FRR target for thresholds (default: the bundle's).")
    failure_mode: Literal["closed", "open"] = Field(
        "closed",
        description=(
            "On a backend fault (backend error, non-finite output): closed answers 503; open lets the request "
            "through, counted and marked. A timeout is always 503 (a client could aim for one); work that cannot "
            "finish in time gets 429 before it starts."
        ),
    )
    max_batch_size: int = Field(32, ge=1, description="Most rows (texts, both passes counted) in one backend call.")
    max_batch_tokens: int = Field(
        8192, ge=16, description="Most padded tokens (rows x longest row) in one backend call."
    )
    max_padding_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description=(
            "Length-aware batching: a queued row joins a batch only while padding stays at most this share of "
            "the batch's tokens (rows of similar length are grouped; the oldest row always goes). 1: no grouping, "
            "first come first served."
        ),
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description=(
            "How long an idle batcher waits for more rows before running the first one. Under load batches "
            "form anyway while the backend is busy, so 0 (default) adds no latency at low traffic."
        ),
    )
    max_queue: int | None = Field(
        None,
        ge=1,
        description=(
            "Rows waiting for the backend before new requests get 429 (default: what this machine computes "
            "within request_timeout_s, measured at start). Work that cannot finish before its deadline gets "
            "429 at once in any case."
        ),
    )
    request_timeout_s: float = Field(10.0, gt=0, description="Per-request deadline for the guard check.")
    max_text_chars: int = Field(20000, ge=1, description="Longest text accepted (413 above).")
    max_texts_per_request: int = Field(64, ge=1, description="Most texts in one request (413 above).")
    max_request_chars: int | None = Field(
        None,
        ge=1,
        description=(
            "Most characters in one request, all its texts together (413 above). Default: the text the queue can "
            "hold in windows (max_queue rows of half the guard's window, at 4 characters per token, about English "
            "text's), and at least max_text_chars. Tokenising is also admitted against the deadline (429)."
        ),
    )
    max_body_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="Largest request body, checked before it is read or parsed (413 above)."
    )
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="Largest request head (request line + headers; 431 above)."
    )
    read_timeout_s: float = Field(
        10.0, gt=0, description="Time a client has to send its headers, and then its body (408 or closed above)."
    )
    max_connections: int = Field(
        256,
        ge=1,
        description="Requests handled at once (counted from a complete request head); more get a fast 429, "
        "except health and metrics probes. Open connections are bounded at 2x: above that, the oldest one "
        "still awaiting a request head is closed (counted in guard_connections_dropped_total).",
    )
    long_text: Literal["windows", "refuse"] = Field(
        "windows",
        description=(
            "Text longer than the guard's window but read by the protected classifier: windows checks it in "
            "half-overlapping windows (flagged if any window is); refuse answers 413."
        ),
    )
    classifier_max_length: int | None = Field(
        None,
        ge=4,
        description=(
            "Tokens the protected classifier reads, [CLS] and [SEP] included. Default: as a sidecar, the whole "
            "text (in windows; set it to the upstream's window, e.g. 512, to check no more); standalone, the "
            "bundle's record, else the guard's own window."
        ),
    )
    special_tokens: Literal["text", "special"] | None = Field(
        None,
        description=(
            "How '[SEP]', '[PAD]', ... inside a text are read: text (plain characters) or special (their special "
            "ids, as a Hugging Face classifier does). Default: text standalone, special as a sidecar."
        ),
    )
    api_key: SecretStr | None = Field(
        None,
        description="If set, requests need `Authorization: Bearer KEY`, checked before the body is read "
        "(health and metrics stay open).",
    )
    feedback_api_key: SecretStr | None = Field(
        None, description="If set, /v1/feedback needs this key instead of api_key (ground truth from a trusted source)."
    )
    expose_scores: bool = Field(
        False,
        description="Return RAP deltas and thresholds in /v1/check (off by default: they help tune a trigger).",
    )
    model_name: str = Field("guard", description="Model name in the Open Inference Protocol paths and in metrics.")
    upstream: str | None = Field(None, description="Sidecar mode: forward clean requests to this base URL.")
    upstream_text_pointer: str | None = Field(
        None,
        description="Sidecar: check only the texts at this JSON pointer (e.g. /inputs), for an upstream known to "
        "read that one field. Default: every string value at any depth is checked (except upstream_structural_keys).",
    )
    upstream_structural_keys: list[str] = Field(
        default_factory=lambda: list(DEFAULT_STRUCTURAL_KEYS),
        description="Sidecar: keys whose string values are structure, not text, and are not checked (compared "
        "case-insensitively): OIP tensor names and types, request ids.",
    )
    upstream_query_keys: list[str] = Field(
        default_factory=list,
        description="Sidecar: query parameters a forwarded request may carry (their values are checked as texts); "
        "any other query parameter is 422, since an upstream may bind text from it.",
    )
    upstream_text_content_types: list[str] = Field(
        default_factory=list,
        description="Sidecar: media types (e.g. text/plain) whose body is one UTF-8 text, checked whole and "
        "forwarded as is. Bodies of any other type than JSON are 415. Form types cannot be listed.",
    )
    upstream_timeout_s: float = Field(30.0, gt=0, description="Timeout for the upstream call (504 above).")
    upstream_passthrough: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PASSTHROUGH),
        description=(
            "Sidecar: 'METHOD /path' requests without a body forwarded unchecked ('*' matches one path segment). "
            "A request with a body is always checked; any other request without one gets 403."
        ),
    )
    upstream_forward_authorization: bool = Field(
        False, description="Sidecar: forward the client's Authorization header upstream (default: stripped)."
    )
    max_json_depth: int = Field(32, ge=2, description="Sidecar: deepest JSON nesting accepted in a body (422 above).")
    canary_interval_s: float = Field(
        0.0, ge=0, description="Replay one bundle canary (held-out clean row) every N seconds for live FRR; 0 = off."
    )
    live_rates_min_observations: int = Field(
        50,
        ge=1,
        description="Observations (feedback, canaries or probes) a source needs in its window before its live "
        "FAR/FRR gauge is exported: one answer is not a rate.",
    )
    otel_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP endpoint for OpenTelemetry traces (e.g. http://otel-collector:4318/v1/traces): "
        "a span per request and per upstream call. Unset: no tracing.",
    )
    log_json: bool = Field(True, description="JSON log lines (false: plain text).")
    access_log: bool = Field(True, description="One log line per request: method, path, status, milliseconds.")
    # FilePath, not Path: the YAML source skips a missing file silently, so a typo would go unnoticed.
    config: FilePath | None = Field(None, description="YAML file with any of these settings.")

    @field_validator("upstream_text_pointer")
    @classmethod
    def _pointer(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("a JSON pointer starts with '/' (e.g. /inputs)")
        return value

    @field_validator("upstream_text_content_types")
    @classmethod
    def _text_types(cls, value: list[str]) -> list[str]:
        value = [v.strip().lower() for v in value]
        for kind in value:
            if kind in FORM_TYPES or "/" not in kind:
                raise ValueError(f"{kind!r} cannot be read as one text (a media type like text/plain, not a form)")
        return value

    @field_validator("detectors")
    @classmethod
    def _detectors(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        unknown = [d for d in value if d not in DETECTORS]
        if unknown:
            raise ValueError(f"unknown detector {unknown[0]!r}; choose from {', '.join(DETECTORS)}")
        if not value or len(set(value)) != len(value):
            raise ValueError("list each detector once, at least one (none for a bare classifier)")
        if "none" in value and len(value) > 1:
            raise ValueError("none (a bare classifier) cannot be combined with another detector")
        return value

    @field_validator("upstream_passthrough")
    @classmethod
    def _passthrough(cls, value: list[str]) -> list[str]:
        for entry in value:
            method, _, path = entry.partition(" ")
            if not method.isalpha() or not method.isupper() or not path.startswith("/"):
                raise ValueError(f"{entry!r} is not 'METHOD /path' (e.g. 'GET /v2/models/*')")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if not self.bundle.is_dir():
            raise ValueError(f"bundle {self.bundle} is not a directory")
        if self.metrics_port == self.port:
            raise ValueError(f"metrics_port {self.metrics_port} is the service port; leave it unset or pick another")
        if self.max_queue is not None and self.max_queue < self.max_texts_per_request:
            raise ValueError(
                f"max_queue {self.max_queue} cannot hold one full request (max_texts_per_request "
                f"{self.max_texts_per_request}); raise max_queue or lower max_texts_per_request"
            )
        if self.max_text_chars * self.max_texts_per_request > self.max_body_bytes:
            raise ValueError(
                f"max_body_bytes {self.max_body_bytes} is smaller than max_texts_per_request x max_text_chars "
                f"({self.max_texts_per_request * self.max_text_chars}); requests within the text limits would get 413"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        config = init_settings.init_kwargs.get("config") or env_settings().get("config")
        if config:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config))
        return tuple(sources)
