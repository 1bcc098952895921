"""Bundled data: real public model configs (models/*.json) and the GPU catalog (gpus.json). Pure, lazy."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "models"
GPU_FILE = Path(__file__).parent / "gpus.json"


@functools.cache
def _preset_index() -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in sorted(PRESET_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        for alias in [path.stem, *data.get("_aliases", []), data.get("_name_or_path", "")]:
            if alias:
                index[alias.lower()] = path
    return index


def preset_names() -> list[str]:
    """Canonical hub ids of every bundled preset."""
    return sorted({json.loads(p.read_text())["_name_or_path"] for p in set(_preset_index().values())})


def find_preset(name: str) -> tuple[str, dict[str, Any]] | None:
    """The (canonical id, config dict) of a preset, by hub id or short name, case-insensitive; None if unknown."""
    path = _preset_index().get(name.lower())
    if path is None:
        return None
    data = json.loads(path.read_text())
    return data["_name_or_path"], data


@functools.cache
def gpu_catalog() -> dict[str, dict[str, Any]]:
    """GPU name (lower case) -> {name, memory_bytes, peak_bf16_tflops, ...} from gpus.json."""
    rows = json.loads(GPU_FILE.read_text())["gpus"]
    catalog: dict[str, dict[str, Any]] = {}
    for row in rows:
        for alias in [row["name"], *row.get("aliases", [])]:
            catalog[alias.lower()] = row
    return catalog
