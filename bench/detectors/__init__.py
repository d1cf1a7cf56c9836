"""Baseline detectors measured beside RAP: STRIP and ONION (bench only, not product)."""
