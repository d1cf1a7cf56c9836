"""Offline calibration: turn a suspect classifier into a verified guard bundle."""
