"""Inference backends: numpy in, logits out. See `base.Backend`."""

from guard.core.backends.base import Backend, load_backend

__all__ = ["Backend", "load_backend"]
