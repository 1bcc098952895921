"""Issue 16: the attention the run will use, sliding windows and mixed layer stacks.

Independent checks: transformers' own config classes (layer types, windows) and model classes (``_supports_sdpa``),
and traces of the real models at full depth (analytic vs trace, per-layer-type extrapolation vs full depth).
Narrow configs (hidden 64) keep each case to seconds; windows of 48 tokens let s = 96 pass them.
"""

from __future__ import annotations

import warnings

import pytest

from memprof.compat import NO_SDPA_TYPES
from memprof.config import AttnImpl, Device, Dtype, Method, Regime, RunSetup, with_method_defaults
from memprof.errors import LibraryRefusalError
from memprof.spec import FAMILY_OF_MODEL_TYPE, FULL, SLIDING, from_hf_config

H = 64
NARROW = {  # real families at narrow width; window 48 so that s = 96 passes it
    "mistral": {"model_type": "mistral", "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 48},
    "gemma2": {"model_type": "gemma2", "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "sliding_window": 48},
    "gemma3": {"model_type": "gemma3_text", "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
               "sliding_window": 48, "sliding_window_pattern": 3},
    "qwen2": {"model_type": "qwen2", "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 48,
              "use_sliding_window": True, "max_window_layers": 2},
    "qwen3": {"model_type": "qwen3", "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
}


def narrow(family: str, layers: int = 5, **overrides: object):  # noqa: ANN201
    cfg = {"vocab_size": 128, "hidden_size": H, "intermediate_size": 128, "num_hidden_layers": layers,
           **NARROW[family], **overrides}
    return from_hf_config(cfg, f"narrow-{family}")


def setup_for(s: int, regime: str = "pure", ckpt: bool = False, method: str = "lora", **kw: object) -> RunSetup:
    dtype = Dtype.bf16 if regime == "pure" else Dtype.fp16
    return with_method_defaults(RunSetup(method=Method(method), dtype=dtype, regime=Regime(regime), batch_size=2,
                                         seq_len=s, device=Device.cpu, grad_checkpointing=ckpt, **kw))


CONFIG_CASES = [
    ("mistral", {}), ("mistral", {"sliding_window": None}), ("phi3", {}), ("phi3", {"sliding_window": 2047}),
    ("qwen2", {}), ("qwen2", {"use_sliding_window": True, "max_window_layers": 2, "num_hidden_layers": 5}),
    ("qwen3", {"use_sliding_window": True, "num_hidden_layers": 4, "max_window_layers": 1}),
    ("gemma2", {"num_hidden_layers": 5}), ("gemma3_text", {"num_hidden_layers": 13}),
    ("gemma3_text", {"num_hidden_layers": 7, "sliding_window_pattern": 3}),
    ("gemma3_text", {"num_hidden_layers": 3, "layer_types": [FULL, SLIDING, FULL], "sliding_window": 512}),
    ("llama", {}), ("gemma", {}),
]


@pytest.mark.parametrize("model_type,options", CONFIG_CASES)
def test_layer_types_and_windows_as_transformers_configs_derive_them(model_type: str, options: dict) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **options)
    sizes = {k: v for k, v in config.to_dict().items() if k in ("vocab_size", "hidden_size", "intermediate_size",
             "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")}
    spec = from_hf_config({"model_type": model_type, **sizes, **options}, "x")
    window = getattr(config, "sliding_window", None)
    expected = tuple(getattr(config, "layer_types", None) or ())
    if model_type in ("mistral", "phi3") and window is not None:  # one window on every block, no layer_types
        expected = (SLIDING,) * config.num_hidden_layers
    assert spec.sliding_window == window
    assert tuple(spec.layer_type(i) for i in range(spec.num_layers)) == (expected or (FULL,) * spec.num_layers)
    for depth in (2, 3):  # a cut model's config is one transformers accepts
        cut = spec.with_layers(depth).to_hf_config()
        AutoConfig.for_model(cut.pop("model_type"), **cut)


def test_no_sdpa_table_is_transformers_own_flags() -> None:
    """The pure table (estimate, records) equals the installed classes' flags: for every model type under the
    tested transformers (the table is its), for the analytic families under any (traces and measurements read the
    class itself; a newer release that moves other architectures shows here and in benchmarks/drift.py)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    from memprof.compat import TESTED_VERSIONS

    flags = {}
    for model_type, name in MODEL_MAPPING_NAMES.items():
        cls = getattr(transformers, name[0] if isinstance(name, (tuple, list)) else name, None)
        if cls is not None:
            flags[model_type] = bool(getattr(cls, "_supports_sdpa", False))
    assert set(FAMILY_OF_MODEL_TYPE) <= set(flags)
    assert all(flags[t] == (t not in NO_SDPA_TYPES) for t in FAMILY_OF_MODEL_TYPE)
    if transformers.__version__ == TESTED_VERSIONS["transformers"]:
        assert {t for t, ok in flags.items() if not ok} == NO_SDPA_TYPES & set(flags)


def test_default_attention_is_what_transformers_picks_and_explicit_sdpa_is_refused() -> None:
    from memprof.analytic import estimate
    from memprof.runtime.trace import trace

    spec = narrow("gemma2", 2)
    est = estimate(spec, setup_for(32))
    assert est.setup.attn_impl is AttnImpl.eager and any("eager" in n and "gemma2" in n for n in est.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(spec, setup_for(32))
    assert traced.setup.attn_impl is AttnImpl.eager
    for run in (estimate, trace):
        with pytest.raises(LibraryRefusalError, match="SDPA"):
            run(spec, setup_for(32, attn_impl=AttnImpl.sdpa))
    assert estimate(narrow("mistral", 2), setup_for(32)).setup.attn_impl is AttnImpl.sdpa


def test_cli_refuses_sdpa_on_gemma2_in_one_line(tmp_path) -> None:  # noqa: ANN001
    import json

    from typer.testing import CliRunner

    from memprof.cli import app

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vocab_size": 128, "hidden_size": H, "intermediate_size": 128,
                                "num_hidden_layers": 2, **NARROW["gemma2"]}))
    result = CliRunner().invoke(app, ["estimate", str(path), "--attn", "sdpa"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "refuses SDPA" in result.output and len(result.output.strip().splitlines()) == 1


# (family, layers, s, regime, checkpointing): below and past the window, mixed stacks at full depth
VS_TRACE = [(f, L, s, r, ck) for f, L in (("mistral", 5), ("gemma2", 5), ("gemma3", 8), ("qwen2", 5), ("qwen3", 3))
            for s in (32, 96) for r in ("pure", "amp") for ck in (False, True)]
# Gemma-2 with checkpointing: the analytic peak is half a (b, s, h) fp32 tensor short at an RMSNorm's backward in
# the recomputed block (-0.4% at this width; Gemma-3 is within 0.03%); not found yet
GEMMA_CHECKPOINT_GAP = {("gemma2", True)}
# fp16 AMP with checkpointing on CPU: where the recomputed block sets the peak (short s), the estimate holds one or
# two autocast weight copies more than the run (+8-25 KB, constant in s: +0.6-1.1% at this width; the full-size
# CUDA rows of estimates/long_context.md are within 0.001%); not found yet
AMP_RECOMPUTE_GAP = {("mistral", 32), ("gemma3", 32), ("gemma3", 96), ("qwen2", 32), ("qwen3", 32), ("qwen3", 96)}


@pytest.mark.parametrize("family,layers,s,regime,ckpt", VS_TRACE)
def test_sliding_windows_and_mixed_stacks_vs_full_depth_trace(request, family: str, layers: int, s: int,  # noqa: ANN001
                                                               regime: str, ckpt: bool) -> None:
    from memprof.analytic import estimate
    from memprof.runtime.trace import trace

    if (family, ckpt) in GEMMA_CHECKPOINT_GAP:
        request.applymarker(pytest.mark.xfail(strict=True, reason="Gemma-2 checkpointing gap"))
    elif regime == "amp" and ckpt and (family, s) in AMP_RECOMPUTE_GAP:
        request.applymarker(pytest.mark.xfail(strict=True, reason="autocast copies in the CPU recompute"))
    spec, setup = narrow(family, layers), setup_for(s, regime, ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(spec, setup, layers="full")
    est = estimate(spec, setup, tracked=True)
    assert abs(est.peak.total_bytes - traced.peak.total_bytes) <= 0.001 * traced.peak.total_bytes


@pytest.mark.parametrize("family,layers", [("gemma3", 14), ("gemma2", 9), ("qwen2", 7)])
@pytest.mark.parametrize("ckpt", [False, True])
def test_trace_extrapolates_per_layer_type(family: str, layers: int, ckpt: bool) -> None:
    """One block of each type traced, counted as often as the model has it: equal to the full-depth trace."""
    from memprof.runtime.trace import trace

    spec, setup = narrow(family, layers), setup_for(96, ckpt=ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto, full = trace(spec, setup), trace(spec, setup, layers="full")
    assert "per layer type" in auto.notes[0]
    assert auto.peak.total_bytes == full.peak.total_bytes
    assert auto.trainable_params == full.trainable_params and auto.total_params == full.total_params


def test_sdpa_sliding_mask_appears_once_the_sequence_reaches_the_window() -> None:
    """masking_utils builds no SDPA mask below the window (is_causal) and a batch-broadcast one from it on
    (kv_length >= local_attention_size), which every sliding block converts to the query's dtype and keeps."""
    from memprof.analytic import estimate

    spec = narrow("mistral", 5)
    below, at = (estimate(spec, setup_for(s)).peak.total_bytes for s in (47, 48))
    plain = narrow("mistral", 5, sliding_window=None)
    below_plain, at_plain = (estimate(plain, setup_for(s)).peak.total_bytes for s in (47, 48))
    assert below == below_plain and at > at_plain


@pytest.mark.parametrize("family,layers", [("mistral", 3), ("gemma3", 4), ("gemma2", 3)])
def test_trace_past_the_window_equals_a_real_cpu_step(family: str, layers: int) -> None:
    from memprof.runtime.harness import run_measurement
    from memprof.runtime.trace import trace

    spec, setup = narrow(family, layers), setup_for(96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(spec, setup, layers="full")
        real = run_measurement(spec, setup, warmup_steps=1, timed_steps=1)
    assert real.status == "ok" and real.setup_row["attn_impl"] == traced.setup.attn_impl.value
    assert traced.peak.total_bytes == real.peak_bytes
