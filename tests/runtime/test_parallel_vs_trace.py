"""The analytic per-rank estimate (analytic/parallel.py) against the per-rank trace (runtime/sharded_trace.py: the
real FSDP2 / DDP engine on fake tensors and torch's fake process group), on tiny models of each analytic family.
Issue 12's target is 2% per rank; at real sizes (estimates/validation.md part G) the two agree within 0.03%.
"""

from __future__ import annotations

import warnings

import pytest

from memprof.analytic import estimate
from memprof.resolve import resolve_setup
from tests.tiny_configs import tiny_spec

pytest.importorskip("torch")

TARGET = 0.02


def _pair(family: str, method: str, precision: str, strategy: str, world: int, device: str = "cpu",
          adapter_size: int = 8):  # noqa: ANN202
    """(analytic, traced) of one rank. Adapters get a bottleneck of h/4 (8 on these 32-wide toys): the default 64
    is twice the toy's width (see the expected failure below)."""
    from memprof.runtime.trace import trace

    over: dict[str, object] = {"method": method, "device": device, "batch_size": 2, "seq_len": 16,
                               "world_size": world, "strategy": strategy, "nodes": 2 if strategy == "hsdp" else 1}
    if method == "adapter":
        over["adapter_size"] = adapter_size
    over.update({"fp32": {"dtype": "fp32"}, "bf16": {"dtype": "bf16"}, "amp": {"dtype": "bf16", "regime": "amp"},
                 "mixed": {"dtype": "bf16", "regime": "mixed"}}[precision])
    setup = resolve_setup(overrides=over)
    spec = tiny_spec(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate(spec, setup, tracked=True), trace(spec, setup)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp-grad-op", "hsdp"])
@pytest.mark.parametrize("method", ["full", "lora", "adapter"])
def test_per_rank_peak_within_target(family: str, strategy: str, method: str) -> None:
    analytic, traced = _pair(family, method, "fp32", strategy, 4)
    assert abs(analytic.peak_bytes - traced.peak_bytes) <= TARGET * traced.peak_bytes, (analytic.peak, traced.peak)
    if method == "adapter" and family == "llama" and strategy in ("fsdp", "hsdp"):
        return  # the forward phase's residual: test_adapter_forward_on_a_toy_llama
    for (phase, a), (_, t) in zip(analytic.phase_peaks, traced.phase_peaks):
        assert abs(a.total_bytes - t.total_bytes) <= TARGET * traced.peak_bytes, phase


@pytest.mark.parametrize("precision", ["bf16", "amp"])
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp-grad-op"])
def test_half_precisions_within_target(precision: str, strategy: str) -> None:
    for family in ("gpt2", "llama"):
        for method in ("full", "lora"):
            analytic, traced = _pair(family, method, precision, strategy, 8)
            assert abs(analytic.peak_bytes - traced.peak_bytes) <= TARGET * traced.peak_bytes, (family, method)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp-grad-op", "hsdp"])
def test_fsdp_mixed_precision_full_finetuning(strategy: str) -> None:
    """The mixed regime: FSDP2's MixedPrecisionPolicy over fp32 shards; DDP's half weights with fp32 masters."""
    for family in ("gpt2", "llama"):
        analytic, traced = _pair(family, "full", "mixed", strategy, 4)
        assert abs(analytic.peak_bytes - traced.peak_bytes) <= TARGET * traced.peak_bytes, family


def test_cuda_target_within_target() -> None:
    """The CUDA target (512-byte blocks in the trace, none in the estimate) on a 2-block LLaMA of 256-wide layers
    and an 8192-token vocabulary, where the rounding is small against the tensors."""
    from memprof.runtime.trace import trace
    from memprof.spec import from_hf_config
    from tests.tiny_configs import LLAMA

    spec = from_hf_config({**LLAMA, "hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4,
                           "num_key_value_heads": 1, "vocab_size": 8192}, "narrow-llama", source="file")
    setup = resolve_setup(overrides={"method": "lora", "dtype": "bf16", "batch_size": 2, "seq_len": 64,
                                     "world_size": 4, "strategy": "fsdp"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analytic, traced = estimate(spec, setup, tracked=True), trace(spec, setup)
    assert abs(analytic.peak_bytes - traced.peak_bytes) <= TARGET * traced.peak_bytes


@pytest.mark.xfail(strict=True, reason="tiny LLaMA with bottleneck adapters under FSDP resharding: the trace's forward "
                                       "holds about 8 KiB (two b x s x h fp32 tensors) more than the estimate "
                                       "(found, not explained): 3% of this toy's forward peak, 0.001% of "
                                       "Llama-3.2-1B's (estimates/validation.md part G); the peak itself is within 2%")
def test_adapter_forward_on_a_toy_llama() -> None:
    analytic, traced = _pair("llama", "adapter", "fp32", "fsdp", 4)
    forward_a, forward_t = analytic.phase_peaks[0][1].total_bytes, traced.phase_peaks[0][1].total_bytes
    assert abs(forward_a - forward_t) <= TARGET * forward_t
