"""LoRA targets on sparse mixture-of-experts models (pure): the attention projections peft wraps as modules and
the fused expert weights it wraps as parameters (peft 0.21 ``LoraConfig(target_parameters=...)``, ParamWrapper).

Mirrors peft 0.21.2 tuners/tuners_utils.py ``inject_adapter`` / ``_inject_parameters`` and
utils/transformers_weight_conversion.py on transformers 5.23's fused experts (MixtralExperts).
"""

from __future__ import annotations

import dataclasses

from ..compat import EXPERT_PARAMETERS, LORA_MOE_DEFAULT_TARGETS
from ..config import EXPERTS_TARGET, LoraSpec, Method, is_expert_target
from ..errors import ConfigError, UnsupportedModelError
from ..spec import ModelSpec
from .modules import Module, all_module_names
from .params import ALL_LINEAR, _matches, _saved_match

# peft 0.21 on transformers 5 (utils/transformers_weight_conversion.py, _convert_peft_config_moe): for mixtral and
# olmoe (converted like qwen2_moe; qwen2_moe itself has no conversion pattern) "all-linear" also names the v4
# experts (mixtral w1, w3, w2; olmoe gate_proj, up_proj, down_proj: gate_up_proj at rank and alpha doubled) and
# the router "gate" (its 2-D weight), all adapted as target_parameters; a v4 name given explicitly is converted too
_MOE_ALL_LINEAR_CONVERTED = ("mixtral", "olmoe")
_MOE_V4_NAMES = {"mixtral": ("w1", "w2", "w3", "gate"), "olmoe": ("gate_proj", "up_proj", "down_proj", "gate")}


def moe_lora_targets(spec: ModelSpec, lora: LoraSpec, method: Method, saved: tuple[str, ...]
                      ) -> tuple[tuple[str, Module], ...]:
    """LoRA targets on a sparse-MoE model: modules (attention projections, nn.Linear only: the router is a bare
    weight) and the fused expert weights named with ``experts`` (compat.lora_targets: target_parameters; peft's
    ParamWrapper adapts each with lora_A (r * E, d_in) and lora_B (d_out, r * E))."""
    named = [(n, m) for n, m in all_module_names(spec) if not _saved_match(n, saved)]
    targets = lora.targets if lora.targets is not None else LORA_MOE_DEFAULT_TARGETS.get(spec.model_type)
    if targets is None:
        raise ConfigError(f"peft has no default {method.value} target modules for model_type '{spec.model_type}'; "
                          f"pass --lora-targets (for example {ALL_LINEAR})")
    clash = [t for t in targets if t in _MOE_V4_NAMES.get(spec.model_type, ())]
    if clash:
        raise UnsupportedModelError(f"LoRA target {clash[0]} names a transformers 4 {spec.model_type} expert or router, "
                                    "which peft converts to the fused weights: not in memprof's analytic model; use --trace")
    names = [t for t in targets if not is_expert_target(t)]
    params = [p for t in targets if is_expert_target(t) for p in (EXPERT_PARAMETERS if t == EXPERTS_TARGET else (t,))]
    chosen: list[tuple[str, Module]] = []
    if names == [ALL_LINEAR]:
        chosen = [(n, m) for n, m in named if m.is_linear and m.role not in ("head", "classifier")]
        if spec.model_type in _MOE_ALL_LINEAR_CONVERTED:
            chosen = [(n, m) for n, m in named if m.is_linear and m.role not in ("head", "classifier")
                      or m.kind == "router"
                      or m.kind == "experts" and not any(n.endswith("." + p) for p in EXPERT_PARAMETERS)]
            chosen += [(n, dataclasses.replace(m, rank_scale=2 if n.endswith("gate_up_proj") else 1))
                       for n, m in named if m.kind == "experts" and any(n.endswith("." + p) for p in EXPERT_PARAMETERS)]
            chosen.sort(key=lambda nm: [n for n, _ in named].index(nm[0]))
    elif names:
        chosen = [(n, m) for n, m in named if m.kind not in ("router", "experts") and _matches(n, tuple(names))]
        bad = [n for n, m in chosen if not m.is_linear]
        if bad:
            raise ConfigError(f"LoRA target '{bad[0]}' is not a linear layer; peft adapts nn.Linear modules")
        if not chosen:
            linear = sorted({n.split(".")[-1] for n, m in named if m.is_linear})
            raise ConfigError(f"LoRA targets {', '.join(names)} match no module of {spec.name}; its linear modules "
                              f"are: {', '.join(linear)} (or use {ALL_LINEAR}, or {EXPERTS_TARGET} for the experts)")
    if params:
        if method not in (Method.lora, Method.qlora):
            raise ConfigError(f"{method.value} cannot adapt the fused expert weights: peft targets parameters with "
                              "LoRA only")
        experts = [(n, m) for n, m in named if m.kind == "experts" and any(n.endswith("." + p) for p in params)]
        if not experts:
            raise ConfigError(f"LoRA target parameters {', '.join(params)} match no parameter of {spec.name}; its "
                              f"experts are: {', '.join(EXPERT_PARAMETERS)}")
        have = {n for n, _ in chosen}
        chosen += [(n, m) for n, m in experts if n not in have]
        order = [n for n, _ in named]
        chosen.sort(key=lambda nm: order.index(nm[0]))
    return tuple(chosen)
