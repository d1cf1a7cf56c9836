"""`guard serve`: settings -> verified bundle -> uvicorn."""

from __future__ import annotations

import uvicorn
import yaml
from pydantic import ValidationError

from guard.api import create_app
from guard.core.bundle import load_bundle
from guard.core.errors import InputError
from guard.logs import configure_server_logging
from guard.settings import Settings

GRACEFUL_SHUTDOWN_S = 30


def build_settings(overrides: dict) -> Settings:
    """Settings from flags + GUARD_* env + YAML; a bad value becomes one readable line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "settings"
        raise InputError(f"invalid setting {where}: {first['msg']}") from None
    except yaml.YAMLError as exc:  # the YAML source reads --config before any validation
        raise InputError(f"cannot read the --config file: {' '.join(str(exc).split())}") from None


def serve(overrides: dict, verbose: bool = False) -> None:
    settings = build_settings(overrides)
    load_bundle(settings.bundle)  # fail before binding the port, with the bundle's own message
    configure_server_logging(settings.log_json, verbose)
    app = create_app(settings)
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )
