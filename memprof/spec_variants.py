"""Per-variant config readers of the LLaMA family (pure), as transformers 5.23's config classes define them
(configuration_*.py defaults): the sparse mixture-of-experts fields (MixtralConfig, Qwen2MoeConfig, OlmoeConfig)
and Gemma-2/3's soft-capping constants."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ConfigError, UnsupportedModelError
from .spec import _flag, _get, _int, _require


def moe_fields(cfg: Mapping[str, Any], name: str, task: str = "causal-lm") -> dict[str, Any]:
    """The sparse MoE block's sizes (MixtralConfig: num_local_experts, num_experts_per_tok, the experts' width
    intermediate_size; Qwen2MoeConfig: num_experts, moe_intermediate_size, shared_expert_intermediate_size,
    norm_topk_prob; OlmoeConfig: num_experts, intermediate_size, norm_topk_prob, with the config classes'
    defaults); training with router jitter or the router aux loss is not modelled (refused), nor Qwen2-MoE's
    dense or sliding-window blocks and OLMoE's clip_qkv."""
    model_type = cfg["model_type"]
    if cfg.get("output_router_logits"):
        raise UnsupportedModelError(f"{name}: output_router_logits (the router aux loss) is not modelled "
                                    "analytically; use memprof trace")
    if model_type == "qwen2_moe":
        if _get(cfg, "decoder_sparse_step", default=1) != 1 or _get(cfg, "mlp_only_layers", default=None) or \
                _get(cfg, "use_sliding_window", default=False):
            raise UnsupportedModelError(f"{name}: dense (mlp_only_layers, decoder_sparse_step) or sliding-window "
                                        "blocks of Qwen2-MoE are not modelled analytically; use memprof trace")
        return {"num_experts": _int(cfg, name, "num_experts", 60), "experts_per_tok": _int(cfg, name, "num_experts_per_tok", 4),
                "moe_intermediate_size": _int(cfg, name, "moe_intermediate_size", 1408),
                "shared_expert_size": _int(cfg, name, "shared_expert_intermediate_size", 5632),
                "norm_topk_prob": _flag(cfg, name, "norm_topk_prob", False),
                "qkv_bias": _flag(cfg, name, "qkv_bias", True)}
    if model_type == "olmoe":
        if task != "causal-lm":  # models/olmoe defines OlmoeModel and OlmoeForCausalLM only
            raise UnsupportedModelError(f"{name}: transformers has no OLMoE model with a {task} head")
        if _get(cfg, "clip_qkv", default=None) is not None:
            raise UnsupportedModelError(f"{name}: clip_qkv is not modelled analytically; use memprof trace")
        return {"num_experts": _int(cfg, name, "num_experts", 64), "experts_per_tok": _int(cfg, name, "num_experts_per_tok", 8),
                "moe_intermediate_size": _require(cfg, name, "intermediate_size"),
                "norm_topk_prob": _flag(cfg, name, "norm_topk_prob", False), "qk_norm_full": True}
    if cfg.get("router_jitter_noise"):  # MixtralSparseMoeBlock multiplies the input by uniform noise in training
        raise UnsupportedModelError(f"{name}: router_jitter_noise is not modelled analytically; use memprof trace")
    return {"num_experts": _int(cfg, name, "num_local_experts", 8), "experts_per_tok": _int(cfg, name, "num_experts_per_tok", 2),
            "moe_intermediate_size": _require(cfg, name, "intermediate_size")}


# Gemma2Config's defaults (attn 50.0, final 30.0); Gemma3TextConfig's are None; the other models have none
_SOFTCAP_DEFAULT = {"gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}}


def softcap(cfg: Mapping[str, Any], name: str, key: str, model_type: str) -> float | None:
    """A tanh soft-capping constant (Gemma-2/3), absent keys taking the config class's default."""
    if model_type not in ("gemma2", "gemma3_text"):
        return None
    value = cfg.get(key, _SOFTCAP_DEFAULT.get(model_type, {}).get(key))
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ConfigError(f"config of {name}: {key} must be a positive number or null, got {value!r}"[:200])
    return value
