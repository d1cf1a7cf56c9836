"""HTTP layer: routes translate and delegate to the pipeline; errors map in one place."""

from guard.api.app import create_app

__all__ = ["create_app"]
