"""Poisoning recipes used to build backdoored models and triggered test sets."""
