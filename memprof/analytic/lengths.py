"""Variable-length training data: batches as a loader would make them from a list of sequence lengths, and the
distribution of per-step peak memory and FLOPs over them (pure; ``load_lengths`` reads a local file).

Batching strategies (what decides each step's padded shape):
- ``longest``: shuffled, B sequences per batch, padded to the batch's longest (DataCollatorWithPadding, the
  Trainer's default random sampler);
- ``bucketed``: the Trainer's ``train_sampling_strategy="group_by_length"`` (``group_by_length=True`` before
  transformers 5): mega-batches of 50 x B shuffled sequences sorted by length, cut into batches, the longest batch first (transformers' LengthGroupedSampler);
- ``packed``: sequences concatenated and cut into rows of the maximum length (TRL's packing, "wrapped"); the rows
  carry the sequences' boundaries, so transformers masks every attention layer as for padding (a b x s x s mask,
  masking_utils.find_packed_sequence_indices);
- ``max-length``: every batch padded to the maximum length (padding="max_length").
Sequences longer than the maximum are truncated to it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

from ..config import RunSetup
from ..errors import ConfigError
from ..spec import ModelSpec

MAX_LENGTHS = 10_000_000  # sequences read from one file (a tokenized dataset's length column fits)


class Batching(str, Enum):
    longest = "longest"
    bucketed = "bucketed"
    packed = "packed"
    max_length = "max-length"


@dataclass(frozen=True)
class Batch:
    batch_size: int       # sequences (rows) in the batch
    seq_len: int          # padded length
    real_tokens: int      # tokens that are not padding
    masked: bool          # a mask reaches the attention layers (padding, or packed boundaries)


@dataclass(frozen=True)
class StepPeak:
    step: int
    peak_bytes: int
    flops: int
    micro_batches: tuple[Batch, ...]


@dataclass(frozen=True)
class LengthDistribution:
    """Per optimizer step: the peak of its micro-batches and their FLOPs, over one epoch of the lengths."""

    batching: Batching
    batch_size: int
    max_len: int
    sequences: int
    tokens: int                         # real tokens in the epoch (after truncation)
    padded_tokens: int                  # b x s summed over the batches
    steps: tuple[StepPeak, ...]

    def percentile(self, values: Sequence[float], q: float) -> float:
        ordered = sorted(values)
        pos = q * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    @property
    def peak_stats(self) -> tuple[float, float, int]:
        peaks = [s.peak_bytes for s in self.steps]
        return self.percentile(peaks, 0.5), self.percentile(peaks, 0.99), max(peaks)

    @property
    def flops_stats(self) -> tuple[float, float, int]:
        flops = [s.flops for s in self.steps]
        return self.percentile(flops, 0.5), self.percentile(flops, 0.99), max(flops)

    @property
    def worst(self) -> StepPeak:
        return max(self.steps, key=lambda s: s.peak_bytes)

    @property
    def padding_frac(self) -> float:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def to_row(self) -> dict[str, Any]:
        p50, p99, top = self.peak_stats
        f50, f99, ftop = self.flops_stats
        worst = self.worst
        shape = max(worst.micro_batches, key=lambda b: b.batch_size * b.seq_len)
        return {"batching": self.batching.value, "batch_size": self.batch_size, "max_len": self.max_len,
                "sequences": self.sequences, "steps": len(self.steps), "tokens": self.tokens,
                "padding_frac": self.padding_frac, "peak_p50_bytes": round(p50), "peak_p99_bytes": round(p99),
                "peak_max_bytes": top, "flops_p50": round(f50), "flops_p99": round(f99), "flops_max": ftop,
                "worst_step": worst.step, "worst_batch_size": shape.batch_size, "worst_seq_len": shape.seq_len}


def load_lengths(path: str | Path) -> list[int]:
    """Sequence lengths from a file: one integer per line, or 'length count' pairs (a histogram); a JSON list,
    or {length: count}; JSON lines with a "length" / "num_tokens" / "input_ids" field; CSV with one of those
    columns (and an optional "count"). Raises ConfigError naming what was wrong."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read sequence lengths from {path}: {exc}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            pairs = _from_json(json.loads(text))
        elif suffix == ".jsonl":
            pairs = [p for line in text.splitlines() if line.strip() for p in _from_json(json.loads(line), row=True)]
        elif suffix == ".csv":
            pairs = _from_csv(text)
        else:
            pairs = _from_text(text)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{path}: not a list of sequence lengths ({exc}); give one integer per line, "
                          "'length count' pairs, a JSON list, or a CSV/JSONL length column") from None
    lengths: list[int] = []
    for length, count in pairs:
        if length < 1 or count < 0:
            raise ConfigError(f"{path}: lengths must be >= 1 and counts >= 0, got {length} x {count}")
        if len(lengths) + count > MAX_LENGTHS:
            raise ConfigError(f"{path}: more than {MAX_LENGTHS:,} sequences; pass a histogram (length count)")
        lengths += [length] * count
    if not lengths:
        raise ConfigError(f"{path} holds no sequence lengths")
    return lengths


def _int(value: Any) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


def _from_json(data: Any, row: bool = False) -> list[tuple[int, int]]:
    if isinstance(data, dict) and not row:
        if "lengths" in data:
            return [(_int(v), 1) for v in data["lengths"]]
        return [(_int(k), _int(v)) for k, v in data.items()]
    if isinstance(data, dict):
        for key in ("length", "num_tokens", "n_tokens", "len", "seq_len"):
            if key in data:
                return [(_int(data[key]), _int(data.get("count", 1)))]
        if "input_ids" in data:
            return [(len(data["input_ids"]), 1)]
        raise KeyError("no length, num_tokens or input_ids field")
    if isinstance(data, list) and not row:
        return [(_int(v), 1) for v in data]
    return [(_int(data), 1)]


def _from_csv(text: str) -> list[tuple[int, int]]:
    import csv
    import io

    reader = csv.DictReader(io.StringIO(text))
    fields = {f.strip().lower(): f for f in reader.fieldnames or ()}
    key = next((fields[k] for k in ("length", "num_tokens", "n_tokens", "len", "seq_len") if k in fields), None)
    if key is None:
        raise KeyError(f"no length column among {', '.join(fields)}")
    count = fields.get("count")
    return [(_int(r[key]), _int(r[count]) if count else 1) for r in reader]


def _from_text(text: str) -> list[tuple[int, int]]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) > 2:
            raise ValueError(f"line {line!r} has more than a length and a count")
        out.append((_int(parts[0]), _int(parts[1]) if len(parts) == 2 else 1))
    return out


def plan_batches(lengths: Sequence[int], batch_size: int, max_len: int, batching: Batching,
                 seed: int = 0) -> list[Batch]:
    """One epoch of batches (shuffled with ``seed``; the last batch may be smaller)."""
    clipped = [min(n, max_len) for n in lengths]
    order = list(range(len(clipped)))
    random.Random(seed).shuffle(order)
    if batching is Batching.packed:
        total = sum(clipped)
        rows = max(1, math.ceil(total / max_len))
        out, left = [], total
        for start in range(0, rows, batch_size):
            b = min(batch_size, rows - start)
            real = min(left, b * max_len)
            left -= real
            out.append(Batch(b, max_len, real, True))
        return out
    if batching is Batching.bucketed:
        mega = 50 * batch_size
        groups = [sorted(order[i:i + mega], key=lambda k: -clipped[k]) for i in range(0, len(order), mega)]
        order = [k for g in groups for k in g]
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [clipped[k] for k in order[start:start + batch_size]]
        s = max_len if batching is Batching.max_length else max(chunk)
        out.append(Batch(len(chunk), s, sum(chunk), sum(chunk) < len(chunk) * s))
    return out


def distribution(spec: ModelSpec, setup: RunSetup, lengths: Sequence[int], batching: Batching,
                 seed: int = 0, tracked: bool = False) -> LengthDistribution:
    """Peak memory and FLOPs of every optimizer step of one epoch over ``lengths``: ``setup.batch_size``
    sequences per micro-batch, at most ``setup.seq_len`` tokens each, ``setup.grad_accum`` micro-batches per
    step (the first finds no gradients, the later ones all of them). Estimates are cached per shape.

    Raises:
        ConfigError: no lengths, or an estimate that does not apply (as ``estimate``).
    """
    from . import estimate
    from .flops import step_flops

    if not lengths:
        raise ConfigError("no sequence lengths given")
    batches = plan_batches(lengths, setup.batch_size, setup.seq_len, batching, seed)
    cache: dict[tuple, tuple[int, int]] = {}

    def cost(batch: Batch, later: bool) -> tuple[int, int]:
        key = (batch.batch_size, batch.seq_len, batch.masked, later)
        if key not in cache:
            micro = dataclasses.replace(setup, batch_size=batch.batch_size, seq_len=batch.seq_len,
                                        padded=setup.padded or batch.masked,
                                        grad_accum=max(2, setup.grad_accum) if later else 1)
            est = estimate(spec, micro, tracked=tracked)
            cache[key] = (est.peak_bytes, step_flops(spec, dataclasses.replace(micro, grad_accum=1)).total_flops)
        return cache[key]

    k = setup.grad_accum
    steps = []
    for index, start in enumerate(range(0, len(batches), k)):
        group = tuple(batches[start:start + k])
        costs = [cost(b, i > 0) for i, b in enumerate(group)]
        steps.append(StepPeak(index + 1, max(c[0] for c in costs), sum(c[1] for c in costs), group))
    return LengthDistribution(batching, setup.batch_size, setup.seq_len, len(lengths),
                              sum(b.real_tokens for b in batches), sum(b.batch_size * b.seq_len for b in batches),
                              tuple(steps))
