"""The ONE settings object of the server. Nothing else reads the environment.

Sources, highest first: CLI flags (passed as init values), `GUARD_*` environment
variables, the optional YAML file (`--config`), these defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GUARD_", extra="forbid", validate_default=True)

    bundle: Path = Field(description="Guard bundle directory written by `calibrate rap`.")
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in containers).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    backend: Literal["onnx", "onnx-int8", "torch"] = Field(
        "onnx",
        description="Inference backend: ONNX Runtime fp32 (default), its int8 graph if the bundle has one, or torch.",
    )
    threads: int | None = Field(None, ge=1, description="Intra-op threads for the backend (default: runtime's choice).")
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
            "On guard failure (backend error, timeout): closed answers 503; "
            "open lets the request through, counted and marked."
        ),
    )
    max_batch_size: int = Field(32, ge=1, description="Most rows (texts, both passes counted) in one backend call.")
    max_batch_tokens: int = Field(
        8192, ge=16, description="Most padded tokens (rows x longest row) in one backend call."
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description=(
            "How long an idle batcher waits for more rows before running the first one. Under load batches "
            "form anyway while the backend is busy, so 0 (default) adds no latency at low traffic."
        ),
    )
    max_queue: int = Field(1024, ge=1, description="Rows waiting for the backend before new requests get 429.")
    request_timeout_s: float = Field(10.0, gt=0, description="Per-request deadline for the guard check.")
    max_text_chars: int = Field(20000, ge=1, description="Longest text accepted (413 above).")
    max_texts_per_request: int = Field(64, ge=1, description="Most texts in one request (413 above).")
    api_key: SecretStr | None = Field(
        None, description="If set, requests need `Authorization: Bearer KEY` (health and metrics stay open)."
    )
    model_name: str = Field("guard", description="Model name in the Open Inference Protocol paths and in metrics.")
    upstream: str | None = Field(None, description="Sidecar mode: forward clean requests to this base URL.")
    upstream_text_pointer: str = Field(
        "/inputs",
        description='JSON pointer to the text in proxied bodies (HF style `{"inputs": ...}`; OIP: /inputs/0/data).',
    )
    upstream_timeout_s: float = Field(30.0, gt=0, description="Timeout for the upstream call (504 above).")
    canary_interval_s: float = Field(
        0.0, ge=0, description="Replay one bundle canary (held-out clean row) every N seconds for live FRR; 0 = off."
    )
    log_json: bool = Field(True, description="JSON log lines (false: plain text).")
    access_log: bool = Field(True, description="One log line per request: method, path, status, milliseconds.")
    # FilePath, not Path: the YAML source skips a missing file silently, so a typo would go unnoticed.
    config: FilePath | None = Field(None, description="YAML file with any of these settings.")

    @field_validator("upstream_text_pointer")
    @classmethod
    def _pointer(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError("a JSON pointer starts with '/' (e.g. /inputs)")
        return value

    @model_validator(mode="after")
    def _bundle_exists(self) -> Settings:
        if not self.bundle.is_dir():
            raise ValueError(f"bundle {self.bundle} is not a directory")
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
