"""LoRA on mixture-of-experts models (Mixtral, Qwen2-MoE, OLMoE; transformers 5 fused experts, peft 0.21).

Default targets: peft 0.21.2 loses its own Mixtral default under transformers 5 and has none for Qwen2-MoE or
OLMoE, so memprof passes q_proj, v_proj (compat.LORA_MOE_DEFAULT_TARGETS) and says so in a note. ``experts`` in
the targets adapts the fused expert weights through peft's ``target_parameters`` (ParamWrapper). Each traces with
peft's own trainable count and the real CPU step's tracked peak, to the byte.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tiny_configs import MIXTRAL, OLMOE, QWEN2_MOE  # noqa: E402
from memprof.compat import EXPERT_PARAMETERS, LORA_MOE_DEFAULT_TARGETS, lora_targets  # noqa: E402
from memprof.errors import ConfigError  # noqa: E402
from memprof.hub import load_spec_any  # noqa: E402
from memprof.resolve import resolve_setup  # noqa: E402

CONFIGS = {"mixtral": MIXTRAL, "qwen2-moe": QWEN2_MOE, "olmoe": OLMOE}
TARGETS = {"default": None, "experts": "experts", "attention+experts": "q_proj,v_proj,experts.gate_up_proj,experts.down_proj"}


def _spec(cfg: dict, tmp_path: Path):  # noqa: ANN202
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return load_spec_any(str(path))


def _setup(targets: str | None, dtype: str = "fp32", **extra):  # noqa: ANN202
    options = {"method": "lora", "batch_size": 2, "seq_len": 16, "dtype": dtype, "device": "cpu", **extra}
    if targets is not None:
        options["lora_targets"] = targets
    return resolve_setup(None, options)


def _peft_count(spec, setup) -> int:  # noqa: ANN001
    from memprof.runtime.build import peft_config_for
    from memprof.runtime.catalogue import peft_trainable

    return peft_trainable(spec, setup, peft_config_for(spec, setup))


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("model", list(CONFIGS))
def test_moe_lora_traces_equal_to_a_real_cpu_step(model: str, targets: str, tmp_path: Path) -> None:
    from memprof.runtime.harness import run_measurement
    from memprof.runtime.trace import trace

    spec = _spec(CONFIGS[model], tmp_path)
    setup = _setup(TARGETS[targets])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = trace(spec, setup)
        real = run_measurement(spec, setup, warmup_steps=1, timed_steps=1)
    assert real.status == "ok"
    assert (est.peak_bytes, est.trainable_params) == (real.peak_bytes, real.trainable_params)
    assert est.trainable_params == _peft_count(spec, setup)
    chosen = [n for n in est.notes if n.startswith("LoRA targets: q_proj, v_proj")]
    assert bool(chosen) == (targets == "default")
    assert bool([n for n in real.extra["notes"] if n.startswith("LoRA targets:")]) == (targets == "default")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("model", list(CONFIGS))
def test_expert_lora_in_half_precision_traces_equal_to_a_real_cpu_step(model: str, dtype: str, tmp_path: Path) -> None:
    # bf16: pure half weights, the expert LoRA factors cast to bf16 with them (ParamWrapper); fp16: AMP
    from memprof.runtime.harness import run_measurement
    from memprof.runtime.trace import trace

    spec = _spec(CONFIGS[model], tmp_path)
    setup = _setup("experts", dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = trace(spec, setup)
        real = run_measurement(spec, setup, warmup_steps=1, timed_steps=1)
    assert (est.peak_bytes, est.trainable_params) == (real.peak_bytes, real.trainable_params)


@pytest.mark.parametrize("model", list(CONFIGS))
def test_expert_lora_trains_r_times_experts_times_fan_in_plus_fan_out(model: str, tmp_path: Path) -> None:
    # peft ParamWrapper: lora_A (r * E, d_in), lora_B (d_out, r * E) per fused weight; gate_up_proj H -> 2I,
    # down_proj I -> H
    cfg = CONFIGS[model]
    spec = _spec(cfg, tmp_path)
    h, experts = cfg["hidden_size"], cfg.get("num_local_experts") or cfg["num_experts"]
    i = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    for r in (4, 8):
        setup = _setup("experts", lora_r=r)
        assert _peft_count(spec, setup) == cfg["num_hidden_layers"] * r * experts * ((h + 2 * i) + (i + h))


def test_expert_keyword_expands_to_the_fused_weights(tmp_path: Path) -> None:
    spec = _spec(MIXTRAL, tmp_path)
    chosen = lora_targets(spec, _setup("q_proj,experts,experts.down_proj"))
    assert (chosen.modules, chosen.parameters, chosen.note) == (("q_proj",), EXPERT_PARAMETERS, None)
    assert lora_targets(spec, _setup("all-linear,experts")).modules == "all-linear"
    assert lora_targets(spec, _setup("experts")).modules == ()  # target_modules=[]: no peft default added
    default = lora_targets(spec, _setup(None))
    assert default.modules == ("q_proj", "v_proj") and default.parameters == ()


def test_a_model_type_with_a_peft_default_keeps_it(tmp_path: Path) -> None:
    from tiny_configs import LLAMA

    chosen = lora_targets(_spec(LLAMA, tmp_path), _setup(None))
    assert (chosen.modules, chosen.note) == (None, None)


def test_expert_targets_refuse_dropout_dora_and_other_methods(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="without dropout"):
        _setup("experts", lora_dropout=0.1)
    with pytest.raises(ConfigError, match="without dropout"):
        resolve_setup(None, {"method": "lora", "lora": {"targets": ["experts"], "dora": True}})
    setup = resolve_setup(None, {"method": "loha", "lora_targets": "q_proj,experts", "device": "cpu"})
    with pytest.raises(ConfigError, match="LoRA only"):
        lora_targets(_spec(MIXTRAL, tmp_path), setup)


MOE_TYPES = {  # a tiny config of each model type in LORA_MOE_DEFAULT_TARGETS
    "mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE, "olmoe": OLMOE,
    "qwen3_moe": QWEN2_MOE | {"model_type": "qwen3_moe"},
    "phimoe": MIXTRAL | {"model_type": "phimoe"}, "granitemoe": MIXTRAL | {"model_type": "granitemoe"},
}


@pytest.mark.parametrize("model_type", sorted(LORA_MOE_DEFAULT_TARGETS))
def test_each_default_applies_with_peft(model_type: str, tmp_path: Path) -> None:
    # peft wraps exactly the chosen modules in every block (and nothing when left to its own default, which fails)
    spec = _spec(MOE_TYPES[model_type], tmp_path)
    setup = _setup(None)
    count = _peft_count(spec, setup)
    cfg = MOE_TYPES[model_type]
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    kv_width = h // heads * kv
    assert count == cfg["num_hidden_layers"] * 8 * ((h + h) + (h + kv_width))  # r = 8: q_proj and v_proj
