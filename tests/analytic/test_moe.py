"""The analytic sparse-MoE block (Mixtral, Qwen2-MoE, OLMoE: router, top-k, grouped_mm experts, Qwen2-MoE's
shared expert, OLMoE's whole-width q/k norms; families/moe.py) against the traced model at full depth, a real CPU
step, and the parameter counts of the model transformers builds and of peft's LoRA on the attention, the fused
experts (ParamWrapper) and "all-linear" (which peft converts to the router and experts on transformers 5 for
Mixtral and OLMoE)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from memprof.errors import UnsupportedModelError

from memprof.analytic.params import count_params, method_params
from memprof.config import LoraSpec
from memprof.resolve import resolve_setup
from memprof.spec import from_hf_config

PRESETS = Path(__file__).resolve().parents[2] / "memprof" / "presets" / "models"
PRESET = PRESETS / "Mixtral-8x7B-v0.1.json"
H = 128
MIXTRAL = {"model_type": "mixtral", "vocab_size": 512, "hidden_size": H, "intermediate_size": 4 * H,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
           "num_experts_per_tok": 2, "max_position_embeddings": 128}
MODELS = {
    "mixtral": MIXTRAL,
    "qwen2_moe": {"model_type": "qwen2_moe", "vocab_size": 512, "hidden_size": H, "intermediate_size": 4 * H,
                  "moe_intermediate_size": 2 * H, "shared_expert_intermediate_size": 3 * H, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
                  "max_position_embeddings": 128},
    "olmoe": {"model_type": "olmoe", "vocab_size": 512, "hidden_size": H, "intermediate_size": 2 * H,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4,
              "num_experts_per_tok": 2, "max_position_embeddings": 128, "eos_token_id": 1, "pad_token_id": 0},
}
TARGETS = {"full": None, "lora-default": {}, "lora-experts": {"targets": ["experts"]},
           "lora-attn+experts": {"targets": ["q_proj", "v_proj", "experts"]},
           "lora-all-linear": {"targets": ["all-linear"]}}
REGIMES = {"fp32": {"dtype": "fp32"}, "bf16": {"dtype": "bf16"}, "amp": {"dtype": "fp16", "regime": "amp"}}


def _preset(path: Path = PRESET) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _setup(method: str, regime: str, device: str, **extra):  # noqa: ANN202
    options = {"batch_size": 4, "seq_len": 64, "device": device, **REGIMES[regime], **extra}
    lora = TARGETS[method]
    options["method"] = "full" if lora is None else "lora"
    if lora:
        options["lora"] = lora
    return resolve_setup(None, options)


def test_mixtral_8x7b_count_is_the_published_one() -> None:
    assert count_params(from_hf_config(_preset(), "Mixtral-8x7B-v0.1")) == 46_702_792_704


def test_mixtral_8x7b_count_equals_the_meta_model() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = _preset()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    assert sum(p.numel() for p in model.parameters()) == count_params(from_hf_config(cfg, "m")) == 46_702_792_704


def test_olmoe_count_equals_the_meta_model() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = _preset(PRESETS / "OLMoE-1B-7B-0924.json")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    assert sum(p.numel() for p in model.parameters()) == count_params(from_hf_config(cfg, "m")) == 6_919_161_856


@pytest.mark.parametrize("model", list(MODELS))
def test_tiny_counts_and_order_equal_the_meta_model(model: str) -> None:
    # the names and order of every parameter (the order optimizers visit them in), experts as 3-D stacks
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from memprof.analytic.modules import all_module_names

    cfg = MODELS[model]
    spec = from_hf_config(cfg, model)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    names = [n + suffix for n, m in all_module_names(spec)
             for suffix in ([""] if m.kind == "experts" else [".weight"] + [".bias"] * m.bias)]
    assert [n for n, _ in meta.named_parameters()] == names
    assert sum(p.numel() for p in meta.parameters()) == count_params(spec)


@pytest.mark.parametrize("method", [m for m in TARGETS if m != "full"])
def test_lora_counts_equal_peft_at_full_size(method: str) -> None:
    pytest.importorskip("peft")
    from memprof.runtime.build import peft_config_for
    from memprof.runtime.catalogue import peft_trainable

    spec = from_hf_config(_preset(), "Mixtral-8x7B-v0.1")
    setup = _setup(method, "bf16", "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counted = peft_trainable(spec, setup, peft_config_for(spec, setup))
    assert method_params(spec, setup).trainable == counted


def test_expert_lora_counts_in_closed_form() -> None:
    # ParamWrapper: lora_A (r * E, d_in), lora_B (d_out, r * E) per fused weight; all-linear doubles gate_up's rank
    spec = from_hf_config(_preset(), "m")
    h, i, e, layers, r = 4096, 14336, 8, 32, 8
    experts = layers * r * e * ((h + 2 * i) + (i + h))
    assert method_params(spec, _setup("lora-experts", "bf16", "cuda")).trainable == experts
    attention = layers * r * ((h + 4096) + (h + 1024) * 2 + (4096 + h))
    router = layers * r * (h + e)
    all_linear = attention + router + experts + layers * r * e * (h + 2 * i)
    assert method_params(spec, _setup("lora-all-linear", "bf16", "cuda")).trainable == all_linear


# The CUDA-emulating trace cannot run peft's ParamWrapper under fp16 autocast: registering the parametrization
# checks its dtype and the LoRA fold (autocast disabled for W.device.type, which the emulation's tensors do not
# report as cuda) comes back fp16 ("Registering a parametrization may not change the dtype")
TRACE_AMP_CUDA_PARAM_WRAPPER = {("lora-experts", "amp", "cuda"), ("lora-attn+experts", "amp", "cuda"),
                                ("lora-all-linear", "amp", "cuda")}


CASES = [("mixtral", m, r, d) for m in TARGETS for r in REGIMES for d in ("cpu", "cuda")] + [
    (model, m, r, "cpu") for model in ("qwen2_moe", "olmoe") for m in TARGETS for r in REGIMES] + [
    (model, m, "bf16", "cuda") for model in ("qwen2_moe", "olmoe") for m in ("full", "lora-experts")]


def _phase_gaps(spec, setup) -> list[tuple]:  # noqa: ANN001
    """(phase, tracked estimate - trace, trace) for each phase's peak, the trace at full depth; trainable counts
    equal first."""
    from memprof.analytic import estimate
    from memprof.runtime.trace import trace_depth

    est = estimate(spec, setup, tracked=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace_depth(spec, setup)
    assert est.trainable_params == traced.trainable_params
    gaps = []
    for phase, bd in est.phase_peaks:
        t = max(v.total_bytes for k, v in traced.steady.items() if k.split(".")[0] == phase.value)
        gaps.append((phase, bd.total_bytes - t, t))
    return gaps


@pytest.mark.parametrize("model,method,regime,device", CASES)
def test_analytic_vs_full_depth_trace(model: str, method: str, regime: str, device: str,
                                      request: pytest.FixtureRequest) -> None:
    pytest.importorskip("peft")

    if (method, regime, device) in TRACE_AMP_CUDA_PARAM_WRAPPER:
        # the trace's CUDA autocast emulation cannot follow peft switching autocast off around the expert fold:
        # strict, so a fixed emulation is noticed; until then the trace refuses in one typed line (test below)
        request.applymarker(pytest.mark.xfail(strict=True, raises=UnsupportedModelError, reason="trace: ParamWrapper "
                                              "under emulated CUDA fp16 autocast"))
    spec = from_hf_config(MODELS[model], f"tiny-{model}")
    slack = 512 * 512 if device == "cuda" else 0  # the trace rounds each CUDA storage to 512-byte blocks
    for phase, diff, t in _phase_gaps(spec, _setup(method, regime, device)):
        assert abs(diff) <= 0.01 * t or abs(diff) <= slack, f"{phase.value}: {100 * diff / t:+.3f}%"
        if device == "cpu" and regime != "amp":
            # exact but for the rotary inv_freq buffer (128 B, as in the LLaMA family) and, at LoRA's forward peak
            # (the last block's down grouped_mm), ~0.5 KB of routing temporaries not found yet
            assert abs(diff) <= 1024, f"{phase.value}: {diff:+d} bytes"


@pytest.mark.parametrize("model,method", [("mixtral", "full"), ("mixtral", "lora-experts"), ("mixtral", "lora-all-linear"),
                                          ("qwen2_moe", "lora-default"), ("olmoe", "lora-all-linear")])
def test_analytic_vs_a_real_cpu_step(model: str, method: str) -> None:
    pytest.importorskip("peft")
    from memprof.analytic import estimate
    from memprof.runtime.harness import run_measurement

    spec = from_hf_config(MODELS[model], f"tiny-{model}")
    setup = _setup(method, "fp32", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = run_measurement(spec, setup, warmup_steps=1, timed_steps=1)
    est = estimate(spec, setup, tracked=True)  # the CPU breakdown is tracked: out-of-place accumulation
    assert real.status == "ok" and real.trainable_params == est.trainable_params
    assert abs(est.peak.total_bytes - real.peak_bytes) <= 0.01 * real.peak_bytes


def test_full_size_cut_vs_trace() -> None:
    """Mixtral-8x7B cut to two blocks, bf16 LoRA on the attention and the experts, emulated CUDA: the fused
    expert stacks LoRA merges every forward (W + B A, 2 x 176M elements a block) dominate."""
    pytest.importorskip("peft")
    from memprof.analytic import estimate
    from memprof.runtime.trace import trace_depth

    spec = from_hf_config(_preset(), "Mixtral-8x7B-v0.1").with_layers(2)
    setup = resolve_setup(None, {"method": "lora", "lora": {"targets": ["q_proj", "v_proj", "experts"]},
                                 "dtype": "bf16", "batch_size": 1, "seq_len": 512})
    est = estimate(spec, setup, tracked=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace_depth(spec, setup)
    for phase, bd in est.phase_peaks:
        t = max(v.total_bytes for k, v in traced.steady.items() if k.split(".")[0] == phase.value)
        assert abs(bd.total_bytes - t) <= 0.001 * t, f"{phase.value}: {100 * (bd.total_bytes - t) / t:+.4f}%"


def test_step_flops_count_each_token_top_k_times_in_the_experts() -> None:
    from memprof.analytic.flops import step_flops
    from memprof.config import Dtype, Method, RunSetup, with_method_defaults

    # tests/tiny_configs MIXTRAL: h=32, I=64, E=4, top-2, L=2, 4 heads of 8 (q 32, kv 16), V=100; b=2, s=16: T=32.
    # per token and layer: q, k, v, o 32*32 + 2*32*16 + 32*32 = 3072; router 32*4 = 128; the experts run twice
    # (top-2): 2 * (gate_up 32*128 + down 64*32) = 12288; N = 2 * 15488 + head 32*100 = 34176 (not the 62112
    # parameters: each token reaches 2 of the 4 experts). Attention 4*b*s*s*q_dim = 65536 per layer.
    from tiny_configs import MIXTRAL as TINY

    spec = from_hf_config(TINY, "tiny-mixtral")
    f = step_flops(spec, with_method_defaults(RunSetup(method=Method.full, batch_size=2, seq_len=16, dtype=Dtype.fp32)))
    assert f.forward_flops == 2 * 32 * 34176 + 2 * 65536
    assert f.total_flops == 6 * 32 * 34176 + 3 * 2 * 65536 == 6_955_008
    # LoRA on the experts: the gradient reaches the merged expert stacks, so their weight-gradient matmuls run
    lora = step_flops(spec, with_method_defaults(RunSetup(method=Method.lora, batch_size=2, seq_len=16,
                                                          dtype=Dtype.fp32, lora=LoraSpec(targets=("experts",)))))
    assert lora.backward_weight_flops == 2 * (2 * 32 * 12288)  # two layers, 2 * T * 12288 each


OTHER_METHODS = [("ia3", {}), ("qlora", {}), ("adapter", {"adapter": {"bottleneck": 16}}), ("prefix", {"prompt": {"num_virtual_tokens": 8}}),
                 ("prompt", {"prompt": {"num_virtual_tokens": 8}}), ("adalora", {}), ("vera", {}), ("loha", {}),
                 ("lokr", {}), ("ln-tuning", {}), ("lora", {"grad_checkpointing": True}),
                 ("full", {"grad_checkpointing": True})]


@pytest.mark.parametrize("model", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("method,options", OTHER_METHODS, ids=[m + ("-ckpt" if o.get("grad_checkpointing") else "")
                                                              for m, o in OTHER_METHODS])
def test_other_methods_vs_trace(model: str, method: str, options: dict) -> None:
    """The attention-side methods and memprof's adapters (the FFN adapter after the whole MoE block) on bf16, CPU.
    IA3: peft's Mixtral default (k_proj, v_proj and the transformers 4 expert w2, which matches nothing now); no
    default for Qwen2-MoE, where both estimators ask for targets."""
    pytest.importorskip("peft")
    from memprof.analytic import estimate
    from memprof.errors import ConfigError
    from memprof.runtime.trace import trace_depth

    spec = from_hf_config(MODELS[model], f"tiny-{model}")
    setup = resolve_setup(None, {"batch_size": 4, "seq_len": 64, "method": method, "device": "cpu", "dtype": "bf16",
                                 **options})
    if method == "ia3" and model != "mixtral":
        with pytest.raises(ConfigError):
            estimate(spec, setup)
        with pytest.raises(ConfigError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trace_depth(spec, setup)
        return
    for phase, diff, t in _phase_gaps(spec, setup):
        assert abs(diff) <= 0.01 * t, f"{phase.value}: {100 * diff / t:+.3f}%"


def test_the_estimate_names_the_default_lora_targets() -> None:
    from memprof.analytic import estimate

    est = estimate(from_hf_config(MIXTRAL, "tiny-mixtral"), _setup("lora-default", "bf16", "cuda"))
    assert any(n.startswith("LoRA targets: q_proj, v_proj") for n in est.notes)
    assert not any(n.startswith("LoRA targets") for n in estimate(from_hf_config(MIXTRAL, "t"),
                                                                   _setup("lora-experts", "bf16", "cuda")).notes)


@pytest.mark.parametrize("targets", [None, ["experts"]], ids=["default", "experts"])
def test_mixtral_with_a_classification_head(targets: list | None) -> None:
    pytest.importorskip("peft")
    from memprof.spec import Task

    spec = from_hf_config(MIXTRAL | {"pad_token_id": 0}, "tiny-mixtral", task=Task.seq_cls)
    setup = resolve_setup(None, {"batch_size": 4, "seq_len": 64, "method": "lora", "device": "cpu", "dtype": "bf16",
                                 **({"lora": {"targets": targets}} if targets else {})})
    for phase, diff, t in _phase_gaps(spec, setup):
        assert abs(diff) <= 0.001 * t, f"{phase.value}: {100 * diff / t:+.3f}%"


def test_olmoe_has_no_classification_head() -> None:
    from memprof.errors import UnsupportedModelError
    from memprof.spec import Task

    with pytest.raises(UnsupportedModelError, match="no OLMoE model with a seq-cls head"):
        from_hf_config(MODELS["olmoe"], "tiny-olmoe", task=Task.seq_cls)
