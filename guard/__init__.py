"""backdoor-guard: an online RAP guard for text classifiers (serving side)."""

__version__ = "0.1.0"
