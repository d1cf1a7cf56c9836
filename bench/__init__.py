"""Evaluation kit: attacks, baselines and benchmarks (not part of the product)."""
