"""Typed errors of the core. Each carries a message meant for a person."""


class GuardError(Exception):
    """Base class: an expected failure with a one-line, human-readable message."""


class BundleError(GuardError):
    """The bundle is missing, malformed, of an unknown schema, or was modified."""


class BackendError(GuardError):
    """An inference backend could not be loaded or failed to run."""


class InputError(GuardError):
    """Input texts or data rows are unusable (empty, wrong type, bad label...)."""
