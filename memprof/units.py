"""Units and the only number formatting in memprof (pure, stdlib only)."""

from __future__ import annotations

BYTES_PER_GIB = 2**30
BYTES_PER_MIB = 2**20
BYTES_PER_GB = 10**9  # decimal gigabytes, only for matching GPU marketing sizes ("80 GB")

# Bytes one element takes, keyed by the dtype names memprof uses everywhere.
BYTES_PER_ELEMENT: dict[str, float] = {
    "fp32": 4,
    "bf16": 2,
    "fp16": 2,
    "int8": 1,
    "bool": 1,
    "int64": 8,
    "nf4": 0.5,  # 4-bit NormalFloat, two values per byte (Dettmers et al. 2023)
}


def fmt_bytes(n_bytes: float | None, unit: str = "GiB", digits: int = 2) -> str:
    """Render bytes for humans: ``fmt_bytes(3 * 2**30) == '3.00 GiB'``; None renders as '-'."""
    if n_bytes is None:
        return "-"
    scale = {"GiB": BYTES_PER_GIB, "MiB": BYTES_PER_MIB, "KiB": 2**10, "B": 1, "GB": BYTES_PER_GB}[unit]
    return f"{n_bytes / scale:.{digits}f} {unit}"


def fmt_bytes_auto(n_bytes: float | None) -> str:
    """Render bytes in the largest binary unit that keeps the number at or above 1."""
    if n_bytes is None:
        return "-"
    for unit, scale in (("GiB", BYTES_PER_GIB), ("MiB", BYTES_PER_MIB), ("KiB", 2**10)):
        if abs(n_bytes) >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{int(n_bytes)} B"


def fmt_count(n: float | None) -> str:
    """Render a count with a K/M/B suffix: ``fmt_count(124_439_808) == '124.44M'``."""
    if n is None:
        return "-"
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{int(n)}"


def fmt_pct(x: float | None, digits: int = 1) -> str:
    """Render a fraction as a percentage: ``fmt_pct(0.0123) == '1.2%'``."""
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def fmt_seconds(t_s: float | None) -> str:
    """Render a duration in s or ms."""
    if t_s is None:
        return "-"
    return f"{t_s * 1000:.1f} ms" if t_s < 1 else f"{t_s:.2f} s"
