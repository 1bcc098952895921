"""The torch side: building models and methods, the tracker, the traced estimator and the measurement harness.

``runner`` (measurement in a subprocess, JSONL results) imports no torch; everything else does."""

from .runner import measure, read_measurements

__all__ = ["measure", "read_measurements"]
