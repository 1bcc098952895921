"""Does it fit? GPU sizes from the catalog or a size string, and the largest batch / sequence that fits (pure)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from ..config import RunSetup
from ..errors import ConfigError
from ..presets import gpu_catalog
from ..records import Estimate
from ..spec import ModelSpec, position_limit
from ..units import BYTES_PER_GB, BYTES_PER_GIB, BYTES_PER_MIB

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|mib|mb|g)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    peak_tflops: dict[str, float | None] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Fit:
    gpu: Gpu
    needed_bytes: int          # predicted device total (tensors + reserve + workspace + CUDA context)
    fits: bool
    margin_bytes: int          # free memory left (negative: missing)

    @property
    def used_fraction(self) -> float:
        return self.needed_bytes / self.gpu.memory_bytes


MAX_GPU_BYTES = 2**50  # 1 PiB: far beyond any device; larger sizes are typos or overflow


def resolve_gpu(name_or_size: str) -> Gpu:
    """A catalog GPU ("A100-80GB", "h100", "4090") or a size ("24GiB", "80GB", "16g" = GiB).

    Raises:
        ConfigError: neither a known GPU nor a size.
    """
    row = gpu_catalog().get(name_or_size.strip().lower())
    if row is not None:
        peaks = {k.removeprefix("peak_").removesuffix("_tflops"): v for k, v in row.items() if k.startswith("peak_")}
        return Gpu(row["name"], row["memory_mib"] * BYTES_PER_MIB, peaks)
    m = _SIZE.match(name_or_size)
    if m:
        value, unit = float(m.group(1)), (m.group(2) or "gib").lower()
        scale = {"gib": BYTES_PER_GIB, "g": BYTES_PER_GIB, "gb": BYTES_PER_GB, "mib": BYTES_PER_MIB, "mb": 10**6}[unit]
        size = int(value * scale) if math.isfinite(value) else 0
        if size <= 0 or size > MAX_GPU_BYTES:
            raise ConfigError(f"--gpu size must be positive and at most {MAX_GPU_BYTES // BYTES_PER_GIB:,} GiB, got "
                              f"{name_or_size[:40]!r}")
        return Gpu(f"{name_or_size.strip()}", size)
    known = sorted({r["name"] for r in gpu_catalog().values()})
    raise ConfigError(f"unknown GPU '{name_or_size}'; give a size like 24GiB or one of: {', '.join(known)}")


def check_fit(est: Estimate, gpu: Gpu) -> Fit:
    """Compare the predicted device total (what nvidia-smi would show) with the GPU's memory."""
    needed = est.device.device_total_bytes
    return Fit(gpu, needed, needed <= gpu.memory_bytes, gpu.memory_bytes - needed)


def _largest(lo: int, hi: int, ok) -> int:  # noqa: ANN001
    """Largest n in [lo, hi] with ok(n), assuming ok is monotone (True then False); lo - 1 if none."""
    if not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


BATCH_SEARCH_LIMIT = 1 << 16  # fit searches batch sizes up to this many sequences
SEQ_SEARCH_LIMIT = 1 << 20    # and sequence lengths up to this many tokens (models without a position table)


def max_batch_size(spec: ModelSpec, setup: RunSetup, gpu: Gpu, limit: int = BATCH_SEARCH_LIMIT) -> int:
    """Largest batch size whose predicted device total fits ``gpu`` at ``setup.seq_len`` (0: not even 1)."""
    from . import estimate  # noqa: PLC0415 (estimate imports this module's callers)

    def ok(b: int) -> bool:
        return estimate(spec, dataclasses.replace(setup, batch_size=b)).device.device_total_bytes <= gpu.memory_bytes

    return max(0, _largest(1, limit, ok))


def max_seq_len(spec: ModelSpec, setup: RunSetup, gpu: Gpu, limit: int | None = None) -> int:
    """Largest sequence length that fits at ``setup.batch_size``, capped by learned position tables."""
    from . import estimate  # noqa: PLC0415

    cap = limit or position_limit(spec) or SEQ_SEARCH_LIMIT

    def ok(s: int) -> bool:
        return estimate(spec, dataclasses.replace(setup, seq_len=s)).device.device_total_bytes <= gpu.memory_bytes

    return max(0, _largest(1, cap, ok))
