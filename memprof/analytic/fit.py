"""Does it fit? GPU sizes from the catalog or a size string, the largest batch / sequence that fits, and the
smallest data-parallel world whose per-rank estimate fits (``fit --strategy``) (pure)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..config import ParallelSpec, RunSetup, Strategy
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


# ---- beyond one GPU ------------------------------------------------------------------------------------------
PARALLEL_FIELDS = ("strategy", "offload", "nodes", "shard_size")  # ParallelSpec fields besides the world size
WORLD_SIZES = tuple(2**k for k in range(11))  # fit --strategy tries 1, 2, 4, ..., 1024 ranks


def on_world(setup: RunSetup, world_size: int, options: Mapping[str, Any]) -> RunSetup:
    """The run on ``world_size`` ranks (one GPU each); 1 is the plain one-device run (no engine, no offload).

    Args:
        options: ParallelSpec fields (``PARALLEL_FIELDS``; None = not given): over ``setup.parallel``'s, if any.

    Raises:
        ConfigError: a ParallelSpec that cannot be (nodes or an HSDP shard size that do not divide the world).
    """
    one = setup.on_one_device()
    if world_size == 1:
        return one
    fields = {k: getattr(setup.parallel, k) for k in PARALLEL_FIELDS} if setup.parallel is not None else {}
    fields.update({k: v for k, v in options.items() if k in PARALLEL_FIELDS and v is not None})
    return dataclasses.replace(one, parallel=ParallelSpec(world_size=world_size, **fields))


@dataclass(frozen=True)
class WorldFit:
    """``fit --strategy``: the smallest world size of ``WORLD_SIZES`` whose per-rank device total fits the GPU."""

    gpu: Gpu
    strategy: Strategy
    world_size: int | None                 # None: none of the sizes tried fits
    tried: tuple[tuple[int, int], ...]     # (world size, per-rank device total bytes), in the order tried
    estimate: Estimate                     # one rank at world_size (none fits: at the largest size tried)
    max_batch_size: int                    # at that world size and --seq-len (0: not even 1)
    max_seq_len: int                       # at that world size and --batch-size


def fit_world(spec: ModelSpec, setup: RunSetup, gpu: Gpu, options: Mapping[str, Any],
              sizes: tuple[int, ...] = WORLD_SIZES) -> WorldFit:
    """The smallest world size whose per-rank estimate fits ``gpu`` at the setup's batch size and sequence length,
    and the largest batch size and sequence length at that size. Sizes that ``nodes`` or an HSDP ``shard_size``
    do not divide are skipped; 1 is the one-device run.

    Args:
        options: ``strategy`` (required), ``offload``, ``nodes``, ``shard_size`` (ParallelSpec fields).

    Raises:
        ConfigError: an unknown strategy or offload, or a run the estimator does not model under it.
    """
    from . import estimate  # noqa: PLC0415

    given = {k: v for k, v in options.items() if k in PARALLEL_FIELDS and v is not None}
    nodes, shard = given.get("nodes", 1), given.get("shard_size", 1)
    step = math.lcm(nodes, shard) if all(isinstance(v, int) and v >= 1 for v in (nodes, shard)) else 1
    template = ParallelSpec(world_size=step, **given)  # checks every option at the smallest world they allow
    candidates = [n for n in sizes if n % step == 0]
    if not candidates:
        raise ConfigError(f"no world size of {sizes[0]}..{sizes[-1]} is a multiple of {step} (nodes x shard size)")
    tried: list[tuple[int, int]] = []
    found = None
    for n in candidates:
        at = on_world(setup, n, given)
        est = estimate(spec, at)
        tried.append((n, est.device.device_total_bytes))
        if est.device.device_total_bytes <= gpu.memory_bytes:
            found = n
            break
    best_b = max_batch_size(spec, at, gpu) if found is not None else 0
    best_s = max_seq_len(spec, at, gpu) if found is not None else 0
    return WorldFit(gpu, template.strategy, found, tuple(tried), est, best_b, best_s)
