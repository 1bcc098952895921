"""Variable-length data (issue 13): reading length files, batching them as loaders do, and the per-step
distribution of estimated peaks (pure: no torch)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memprof.analytic import estimate
from memprof.analytic.lengths import Batch, Batching, distribution, load_lengths, plan_batches
from memprof.cli import app
from memprof.resolve import resolve_setup
from memprof.errors import ConfigError
from memprof.hub import resolve_spec


@pytest.mark.parametrize(("name", "text"), [
    ("a.txt", "12\n30\n\n# a comment\n30\n"),
    ("h.txt", "12 1\n30 2\n"),                       # histogram: length count
    ("a.json", "[12, 30, 30]"),
    ("h.json", '{"12": 1, "30": 2}'),
    ("a.jsonl", '{"length": 12}\n{"input_ids": [' + ",".join(["1"] * 30) + ']}\n{"num_tokens": 30}\n'),
    ("a.csv", "id,length\na,12\nb,30\nc,30\n"),
    ("h.csv", "length,count\n12,1\n30,2\n"),
])
def test_length_files(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert sorted(load_lengths(path)) == [12, 30, 30]


@pytest.mark.parametrize(("name", "text", "match"), [
    ("e.txt", "\n", "holds no sequence lengths"), ("z.txt", "0\n", "must be >= 1"),
    ("f.txt", "1.5\n", "not a list of sequence lengths"), ("c.csv", "id,x\n1,2\n", "no length column"),
])
def test_bad_length_files(tmp_path: Path, name: str, text: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_lengths(path)


def test_batching_strategies_by_hand() -> None:
    lengths = [10, 20, 30, 40, 50, 600]
    # max-length: every batch padded to 512 (600 truncated), 3 batches of 2
    assert plan_batches(lengths, 2, 512, Batching.max_length) == [Batch(2, 512, r, True) for r in
                                                                  _pair_sums(lengths, 2, 512)]
    # longest: each batch padded to its own longest; tokens add up to the truncated total 10+20+30+40+50+512
    longest = plan_batches(lengths, 2, 512, Batching.longest)
    assert sum(b.real_tokens for b in longest) == 662 and all(b.batch_size == 2 for b in longest)
    assert all(b.seq_len <= 512 for b in longest) and max(b.seq_len for b in longest) == 512
    # bucketed (one mega-batch of 50 x 2): sorted longest first -> (512, 50), (40, 30), (20, 10)
    assert [b.seq_len for b in plan_batches(lengths, 2, 512, Batching.bucketed)] == [512, 40, 20]
    # packed: 662 tokens -> ceil(662 / 512) = 2 rows of 512 -> one batch of 2 rows, 662 real tokens, masked
    assert plan_batches(lengths, 2, 512, Batching.packed) == [Batch(2, 512, 662, True)]


def _pair_sums(lengths: list[int], b: int, cap: int) -> list[int]:
    import random

    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    clipped = [min(n, cap) for n in lengths]
    return [sum(clipped[k] for k in order[i:i + b]) for i in range(0, len(order), b)]


def test_distribution_worst_step_is_the_estimate_of_its_shape() -> None:
    spec, _ = resolve_spec("Llama-3.2-1B")
    setup = resolve_setup(None, {"method": "lora", "batch_size": 4, "seq_len": 1024, "grad_accum": 2})
    lengths = [64 * (1 + i % 16) for i in range(64)]
    dist = distribution(spec, setup, lengths, Batching.longest)
    assert len(dist.steps) == 64 // (4 * 2) and all(len(s.micro_batches) == 2 for s in dist.steps)
    p50, p99, top = dist.peak_stats
    assert p50 <= p99 <= top == dist.worst.peak_bytes
    # the worst step's peak: the larger of its first micro-batch (no gradients yet) and its second (all of them)
    first, second = dist.worst.micro_batches
    est = [estimate(spec, dataclasses.replace(setup, batch_size=m.batch_size, seq_len=m.seq_len, padded=m.masked,
                                              grad_accum=k)).peak_bytes for m, k in ((first, 1), (second, 2))]
    assert top == max(est)
    assert 0 < dist.padding_frac < 1 and dist.tokens == sum(lengths)


def test_cli_seq_lens(tmp_path: Path) -> None:
    path = tmp_path / "lengths.txt"
    path.write_text("100 40\n400 20\n900 4\n")
    r = CliRunner().invoke(app, ["estimate", "Llama-3.2-1B", "--method", "lora", "-b", "8", "--seq-lens", str(path),
                                 "--batching", "bucketed", "--gpu", "A100-80GB", "-f", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    d = doc["distribution"]
    assert d["sequences"] == 64 and d["max_len"] == 900 and d["batching"] == "bucketed"
    assert d["peak_p50_bytes"] <= d["peak_p99_bytes"] <= d["peak_max_bytes"]
    assert d["peak_max_bytes"] == doc["worst_step_estimate"]["estimate"]["peak_bytes"]
    assert d["step_time_max_s"] > 0 and doc["mfu_assumed"] == 0.4
    r = CliRunner().invoke(app, ["estimate", "gpt2", "--seq-lens", str(tmp_path / "missing.txt")])
    assert r.exit_code == 2 and r.output.startswith("error: cannot read sequence lengths")
