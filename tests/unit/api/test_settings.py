"""Settings sources and their precedence (flags > GUARD_* env > YAML > defaults); bad values are one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.cli import main
from guard.core.errors import InputError
from guard.server import build_settings
from guard.settings import Settings


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "guard.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults(stub_bundle: Path) -> None:
    settings = Settings(bundle=stub_bundle)
    assert (settings.host, settings.port, settings.schedule, settings.mode) == ("127.0.0.1", 8000, "lazy", "enforce")
    assert settings.failure_mode == "closed" and settings.api_key is None and settings.upstream is None


def test_environment(stub_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARD_BUNDLE", str(stub_bundle))
    monkeypatch.setenv("GUARD_PORT", "9001")
    monkeypatch.setenv("GUARD_MODE", "shadow")
    monkeypatch.setenv("GUARD_API_KEY", "s3cret")
    monkeypatch.setenv("GUARD_LOG_JSON", "false")
    settings = Settings()
    assert (settings.bundle, settings.port, settings.mode, settings.log_json) == (stub_bundle, 9001, "shadow", False)
    assert settings.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_precedence_flags_then_env_then_yaml(
    stub_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _yaml(tmp_path, f"bundle: {stub_bundle}\nport: 9001\nmode: shadow\nschedule: fused\nmax_queue: 70\n")
    monkeypatch.setenv("GUARD_PORT", "9002")
    monkeypatch.setenv("GUARD_SCHEDULE", "lazy")
    from_file_and_env = build_settings({"config": config})
    assert from_file_and_env.bundle == stub_bundle  # only the file sets it
    assert (from_file_and_env.port, from_file_and_env.schedule) == (9002, "lazy")  # env beats the file
    assert (from_file_and_env.mode, from_file_and_env.max_queue) == ("shadow", 70)
    with_flags = build_settings({"config": str(config), "port": "9003", "mode": "enforce"})
    assert (with_flags.port, with_flags.mode, with_flags.schedule) == (9003, "enforce", "lazy")  # flags beat both


def test_config_file_named_in_the_environment(
    stub_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARD_CONFIG", str(_yaml(tmp_path, f"bundle: {stub_bundle}\nmax_wait_ms: 5\n")))
    assert build_settings({}).max_wait_ms == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": "0"}, "invalid setting port: Input should be greater than or equal to 1"),
        ({"port": "http"}, "invalid setting port: Input should be a valid integer"),
        ({"schedule": "eager"}, "invalid setting schedule: Input should be 'fused' or 'lazy'"),
        ({"frr": "1.5"}, "invalid setting frr: Input should be less than 1"),
        ({"upstream_text_pointer": "inputs"}, "invalid setting upstream_text_pointer: Value error, a JSON pointer"),
        ({"bundle": "/nonexistent/bundle"}, "is not a directory"),
    ],
)
def test_invalid_values_are_one_line(stub_bundle: Path, overrides: dict, message: str) -> None:
    with pytest.raises(InputError) as caught:
        build_settings({"bundle": str(stub_bundle)} | overrides)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_bundle_is_one_line() -> None:
    with pytest.raises(InputError, match=r"^invalid setting bundle: Field required$"):
        build_settings({})


def test_yaml_problems_are_one_line(stub_bundle: Path, tmp_path: Path) -> None:
    unknown = _yaml(tmp_path, f"bundle: {stub_bundle}\nporrt: 1\n")
    with pytest.raises(InputError, match="invalid setting porrt: Extra inputs are not permitted"):
        build_settings({"config": unknown})
    with pytest.raises(InputError, match="config"):
        build_settings({"bundle": stub_bundle, "config": tmp_path / "missing.yaml"})
    broken = tmp_path / "broken.yaml"
    broken.write_text("port: [1\n", encoding="utf-8")
    with pytest.raises(InputError, match="broken.yaml"):
        build_settings({"bundle": stub_bundle, "config": broken})


def test_guard_serve_reports_bad_settings_in_one_line(
    stub_bundle: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["serve", "--bundle", str(stub_bundle), "--max-queue", "0"]) == 1
    err = capsys.readouterr().err
    assert err == "guard: error: invalid setting max_queue: Input should be greater than or equal to 1\n"
    monkeypatch.setenv("GUARD_FAILURE_MODE", "ajar")
    assert main(["serve", "--bundle", str(stub_bundle)]) == 1
    assert capsys.readouterr().err == "guard: error: invalid setting failure_mode: Input should be 'closed' or 'open'\n"


def test_guard_serve_help_lists_every_setting(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out


def test_detectors_default_flag_env_and_validation(stub_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(bundle=stub_bundle).detectors is None  # every detector the bundle has
    assert build_settings({"bundle": stub_bundle, "detectors": ["features", "rap"]}).detectors == ["features", "rap"]
    assert build_settings({"bundle": stub_bundle, "detectors": ["none"]}).detectors == ["none"]  # --detectors none
    monkeypatch.setenv("GUARD_DETECTORS", '["none"]')
    assert Settings(bundle=stub_bundle).detectors == ["none"]
    monkeypatch.delenv("GUARD_DETECTORS")
    for bad, message in (
        (["strip"], "unknown detector 'strip'"),
        (["rap", "none"], "cannot be combined"),
        (["rap", "rap"], "each detector once"),
        ([], "at least one"),
    ):
        with pytest.raises(InputError, match=message):
            build_settings({"bundle": stub_bundle, "detectors": bad})


def test_guard_serve_parses_detectors_none(stub_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    monkeypatch.setattr("guard.server.serve", lambda overrides, verbose=False: seen.update(overrides))
    assert main(["serve", "--bundle", str(stub_bundle), "--detectors", "none", "--no-optimized-graphs"]) == 0
    settings = build_settings(seen)
    assert settings.detectors == ["none"] and settings.optimized_graphs is False


def test_the_detectors_chosen_against_the_bundle(stub_bundle: Path) -> None:
    from guard.api.service import chosen_detectors
    from guard.core.bundle import load_bundle
    from guard.core.errors import BundleError

    bundle = load_bundle(stub_bundle)  # RAP only, as bundles from before the feature detector
    assert chosen_detectors(Settings(bundle=stub_bundle), bundle) == ("rap",)
    assert chosen_detectors(build_settings({"bundle": stub_bundle, "detectors": ["none"]}), bundle) == ("none",)
    with pytest.raises(BundleError, match="has no features detector .it has rap.; rebuild it with `calibrate rap`"):
        chosen_detectors(build_settings({"bundle": stub_bundle, "detectors": ["features"]}), bundle)
