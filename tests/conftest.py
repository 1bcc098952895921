"""Shared test setup: tests/ on sys.path (tiny_configs), torch pinned to one thread when the stack is present."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # default tests never touch the network


def pytest_configure(config):  # noqa: ANN001, ANN201
    try:
        import torch
    except ImportError:  # the estimator tests run without the torch stack
        return
    # tiny ops on a 2-core VM are dominated by thread fork/join; one thread keeps the suite fast and stable
    torch.set_num_threads(1)
