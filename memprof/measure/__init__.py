"""Measurement side: real (or fake) training steps with the torch stack. ``runner`` imports no torch."""

from .runner import measure, read_measurements

__all__ = ["measure", "read_measurements"]
