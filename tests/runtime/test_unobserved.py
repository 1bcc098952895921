"""Issue 15 item 1: the allocator-level peak of an unobserved CPU step, beside the tracker's, and what separates
them: allocations kernels make below the dispatcher (a CPU binary op on mixed dtypes copies its narrower input,
TensorIterator.cpp compute_types) and the observer itself (autograd accumulates out of place under a dispatch
mode: tests/analytic/test_plain_accumulation.py). The plain estimate must meet the unobserved peak as the tracked
one meets the tracker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from typer.testing import CliRunner  # noqa: E402

from memprof.analytic import estimate  # noqa: E402
from memprof.cli import app  # noqa: E402
from memprof.records import Category  # noqa: E402
from memprof.resolve import resolve_setup  # noqa: E402
from memprof.runtime.allocator import unobserved_peak  # noqa: E402
from memprof.runtime.harness import run_measurement  # noqa: E402
from memprof.runtime.tracker import MemoryTracker  # noqa: E402
from memprof.spec import from_hf_config  # noqa: E402
from tiny_configs import LLAMA  # noqa: E402

# the issue's first case: bert-base's width cut to 2 blocks
BERT_BASE_2 = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 2,
               "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512}
# bert-large's shape made narrow (4 heads of 64, 4h MLP), 2 blocks
BERT_LARGE_NARROW = {"model_type": "bert", "vocab_size": 2048, "hidden_size": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "intermediate_size": 1024, "max_position_embeddings": 128}
# torch runs on one thread (tests/conftest.py): no intra-op worker allocations in the measured steps
TOLERANCE = 0.001  # the tracked estimate meets its tracker to < 0.1% on these; the plain one must meet the allocator so


def test_mixed_dtype_add_copies_its_input_below_the_dispatcher() -> None:
    """bf16 (1000) + fp32 (1000) on CPU: the bf16 operand is copied to fp32 (4000 B) beside the fp32 output (4000 B)
    while the kernel runs. The allocator sees 2000 + 4000 + 4000 + 4000 = 14000 B; a dispatch-level tracker sees
    the output only: 10000 B."""
    def step() -> None:
        a = torch.ones(1000, dtype=torch.bfloat16)   # 2000
        b = torch.ones(1000, dtype=torch.float32)    # 4000
        c = a + b                                    # + 4000 promoted copy of a (freed on return) + 4000 output
        del a, b, c
    assert unobserved_peak(step).peak_bytes == 14000
    tracker = MemoryTracker()
    with tracker:
        a = torch.ones(1000, dtype=torch.bfloat16)
        b = torch.ones(1000, dtype=torch.float32)
        c = a + b
        tracker.register([c], Category.activations)
    assert tracker.peak_bytes == 10000
    del a, b, c


def _plain_vs_unobserved(cfg: dict, family: str, options: dict) -> tuple[int, int, int, int]:
    spec = from_hf_config(cfg, family, source="file")
    setup = resolve_setup(None, {"device": "cpu", "attn_impl": "sdpa", **options})
    m = run_measurement(spec, setup, warmup_steps=1, timed_steps=1)
    assert m.status == "ok" and m.unobserved_phase in ("forward", "backward", "optimizer")
    return (estimate(spec, setup).peak_bytes, m.unobserved_peak_bytes,
            estimate(spec, setup, tracked=True).peak_bytes, m.peak_bytes)


LORA_ALL = {"method": "lora", "lora": {"targets": "all-linear"}}
CASES = {
    # the issue's case: observed 157.30 MB (the tracked estimate equal), unobserved 162.79 MB: peft keeps the adapter
    # weights fp32 on a bf16 base, so result (bf16) + lora_B(...) (fp32) copies result to fp32 inside the add
    "bert-base 2 blocks, LoRA all-linear, bf16, b=4 s=128": (BERT_BASE_2, "bert",
                                                            {**LORA_ALL, "dtype": "bf16", "batch_size": 4, "seq_len": 128}),
    "bert-large narrow, LoRA, fp16 AMP, b=2 s=64": (BERT_LARGE_NARROW, "bert",
                                                    {"method": "lora", "dtype": "fp16", "regime": "amp",
                                                     "batch_size": 2, "seq_len": 64}),
    "bert-large narrow, LoRA all-linear, bf16, b=2 s=64": (BERT_LARGE_NARROW, "bert",
                                                           {**LORA_ALL, "dtype": "bf16", "batch_size": 2, "seq_len": 64}),
    # found here: peft rebinds x to its fp32 copy (``x = self._cast_input_dtype(x, lora_A.weight.dtype)``), which
    # lives until the layer's forward returns; the estimate freed it after lora_A (-0.77% at the output layer's add)
    "bert-large narrow, LoRA all-linear, fp16 AMP, b=2 s=64": (BERT_LARGE_NARROW, "bert",
                                                               {**LORA_ALL, "dtype": "fp16", "regime": "amp",
                                                                "batch_size": 2, "seq_len": 64}),
    "llama tiny, full, bf16, b=2 s=32": (LLAMA, "llama", {"method": "full", "dtype": "bf16", "batch_size": 2,
                                                          "seq_len": 32}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plain_estimate_meets_the_unobserved_step(name: str) -> None:
    plain, unobserved, tracked, tracker = _plain_vs_unobserved(*CASES[name])
    assert abs(tracked - tracker) <= TOLERANCE * tracker  # the observed pair, as validated since issue 4
    assert abs(plain - unobserved) <= TOLERANCE * unobserved, \
        f"plain {plain} vs unobserved {unobserved}: {100 * (plain - unobserved) / unobserved:+.3f}%"


def test_the_issue_case_differs_by_the_promoted_copy() -> None:
    """The bert-base case's unobserved peak is above the tracker's by about one fp32 (b, s, 4h) copy: the peak is at
    the intermediate layer's LoRA add (4 * 128 * 3072 * 4 = 6,291,456 B), less what the tracker saw then and the
    allocator did not (a few KB)."""
    plain, unobserved, tracked, tracker = _plain_vs_unobserved(*CASES["bert-base 2 blocks, LoRA all-linear, bf16, b=4 s=128"])
    copy = 4 * 128 * 3072 * 4
    assert 0.8 * copy < unobserved - tracker <= copy
    assert 0.8 * copy < plain - tracked <= copy


def test_measure_prints_the_unobserved_peak(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA))
    out = tmp_path / "results"
    args = ["measure", str(config), "--device", "cpu", "--method", "lora", "-b", "2", "-s", "16", "--warmup", "1",
            "--steps", "1", "--out", str(out), "--threads", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "peak allocated, unobserved step (" in r.output
    assert "memprof's estimate of a plain run" in r.output
    assert "USDT" not in r.output  # kineto's start/stop lines are silenced
    row = json.loads(CliRunner().invoke(app, [*args, "-f", "json"]).output)[0]
    assert row["unobserved_peak_bytes"] > 0 and row["unobserved_phase"] in ("forward", "backward", "optimizer")



def test_no_unobserved_step_where_the_loop_keeps_its_outputs() -> None:
    """A loop that keeps the previous step's output frees it inside the next step; torch.profiler's memory events
    were found to miss that free now and then (+2-10% on 2-block validation rows, varying between fresh processes),
    so the measurement takes no unobserved step there and says why."""
    spec = from_hf_config(LLAMA, "llama", source="file")
    setup = resolve_setup(None, {"device": "cpu", "method": "lora", "batch_size": 2, "seq_len": 16,
                                 "keep_outputs": True})
    m = run_measurement(spec, setup, warmup_steps=1, timed_steps=1)
    assert m.status == "ok" and m.peak_bytes and m.unobserved_peak_bytes is None
    assert any("no unobserved step" in n for n in m.extra["notes"])
