"""The modules of a ModelSpec with their Hugging Face names and shapes (pure).

Names are exactly what ``model.named_modules()`` yields for the transformers class memprof builds
(``BertForSequenceClassification``, ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...), so that LoRA/IA3 target
matching follows peft's rules (``check_target_module_exists``: exact name or ``.<target>`` suffix).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..spec import Family, ModelSpec, Task


@dataclass(frozen=True)
class Module:
    name: str        # relative to the layer prefix for layer modules, full name otherwise
    kind: str        # linear | conv1d | embedding | norm | router | experts (MoE: see layer_modules)
    d_in: int        # linear/conv1d: in_features; embedding: num_embeddings; norm: normalized size
    d_out: int       # linear/conv1d: out_features; embedding: embedding_dim; norm: same as d_in
    bias: bool
    role: str        # qkv | attn_out | mlp_in | mlp_out | norm | embed | head | pooler | classifier | router
    count: int = 1   # experts: the 3-D parameter stacks this many (d_out, d_in) matrices
    rank_scale: int = 1  # LoRA rank multiple peft gives this target (mixtral all-linear's fused gate_up_proj: 2)

    @property
    def weight_params(self) -> int:
        return self.d_in if self.kind == "norm" else self.count * self.d_in * self.d_out

    @property
    def bias_params(self) -> int:
        if not self.bias:
            return 0
        return self.d_in if self.kind == "norm" else self.d_out

    @property
    def params(self) -> int:
        return self.weight_params + self.bias_params

    @property
    def is_linear(self) -> bool:
        return self.kind in ("linear", "conv1d")


def _lin(name: str, d_in: int, d_out: int, bias: bool, role: str, kind: str = "linear") -> Module:
    return Module(name, kind, d_in, d_out, bias, role)


def _norm(name: str, size: int, bias: bool) -> Module:
    return Module(name, "norm", size, size, bias, "norm")


def layer_prefix(spec: ModelSpec) -> str:
    """Module-name prefix of decoder/encoder block i, with '{i}' standing for the index."""
    return {
        Family.bert: f"{spec.model_type}.encoder.layer.{{i}}.",
        Family.gpt2: "transformer.h.{i}.",
        Family.llama: "model.layers.{i}.",
    }[spec.family]


@functools.cache
def layer_modules(spec: ModelSpec) -> tuple[Module, ...]:
    """The modules of one transformer block (all blocks are identical), in forward order."""
    h, inter = spec.hidden_size, spec.intermediate_size
    if spec.family is Family.bert:
        return (
            _lin("attention.self.query", h, h, True, "qkv"),
            _lin("attention.self.key", h, h, True, "qkv"),
            _lin("attention.self.value", h, h, True, "qkv"),
            _lin("attention.output.dense", h, h, True, "attn_out"),
            _norm("attention.output.LayerNorm", h, True),
            _lin("intermediate.dense", h, inter, True, "mlp_in"),
            _lin("output.dense", inter, h, True, "mlp_out"),
            _norm("output.LayerNorm", h, True),
        )
    if spec.family is Family.gpt2:
        return (
            _norm("ln_1", h, True),
            _lin("attn.c_attn", h, 3 * h, True, "qkv", "conv1d"),
            _lin("attn.c_proj", h, h, True, "attn_out", "conv1d"),
            _norm("ln_2", h, True),
            _lin("mlp.c_fc", h, inter, True, "mlp_in", "conv1d"),
            _lin("mlp.c_proj", inter, h, True, "mlp_out", "conv1d"),
        )
    q, kv = spec.q_dim, spec.kv_dim
    mods: list[Module] = [_norm("input_layernorm", h, False)]
    if spec.fused_qkv:
        mods.append(_lin("self_attn.qkv_proj", h, q + 2 * kv, spec.qkv_bias, "qkv"))
    else:
        mods += [_lin("self_attn.q_proj", h, q, spec.qkv_bias, "qkv"),
                 _lin("self_attn.k_proj", h, kv, spec.qkv_bias, "qkv"),
                 _lin("self_attn.v_proj", h, kv, spec.qkv_bias, "qkv")]
    if spec.qk_norm:
        qn, kn = (q, kv) if spec.qk_norm_full else (spec.head_dim, spec.head_dim)
        mods += [_norm("self_attn.q_norm", qn, False), _norm("self_attn.k_norm", kn, False)]
    mods.append(_lin("self_attn.o_proj", q, h, spec.o_bias, "attn_out"))
    mods.append(_norm("post_attention_layernorm", h, False))
    if spec.sandwich_norm:
        mods.append(_norm("pre_feedforward_layernorm", h, False))
    if spec.num_experts:
        # MixtralSparseMoeBlock (transformers 5): the router MixtralTopKRouter holds a bare (E, h) weight (no
        # nn.Linear), MixtralExperts two fused 3-D parameters, gate_up_proj (E, 2I, h) and down_proj (E, h, I);
        # listed as pseudo-modules "mlp.experts.<parameter>" (peft targets them as parameters)
        # (+ Qwen2-MoE's Qwen2MoeMLP shared expert and its 1-output sigmoid gate, registered after the experts)
        e, mi, si = spec.num_experts, spec.moe_intermediate_size, spec.shared_expert_size
        mods += [Module("mlp.gate", "router", h, e, False, "router"),
                 Module("mlp.experts.gate_up_proj", "experts", h, 2 * mi, False, "mlp_in", e),
                 Module("mlp.experts.down_proj", "experts", mi, h, False, "mlp_out", e)]
        if si:
            mods += [_lin("mlp.shared_expert.gate_proj", h, si, False, "mlp_in"),
                     _lin("mlp.shared_expert.up_proj", h, si, False, "mlp_in"),
                     _lin("mlp.shared_expert.down_proj", si, h, False, "mlp_out"),
                     _lin("mlp.shared_expert_gate", h, 1, False, "mlp_in")]
        return tuple(mods)
    if spec.fused_qkv:
        mods.append(_lin("mlp.gate_up_proj", h, 2 * inter, spec.mlp_bias, "mlp_in"))
    else:
        mods += [_lin("mlp.gate_proj", h, inter, spec.mlp_bias, "mlp_in"),
                 _lin("mlp.up_proj", h, inter, spec.mlp_bias, "mlp_in")]
    mods.append(_lin("mlp.down_proj", inter, h, spec.mlp_bias, "mlp_out"))
    if spec.sandwich_norm:
        mods.append(_norm("post_feedforward_layernorm", h, False))
    return tuple(mods)


@functools.cache
def global_modules(spec: ModelSpec) -> tuple[Module, ...]:
    """Modules outside the blocks (embeddings, final norm, pooler, heads) with full names.

    The tied LM head is listed with ``d_in * d_out`` weights but counted once (see ``tied_head``).
    """
    h, V = spec.hidden_size, spec.vocab_size
    labels = spec.num_labels
    if spec.family is Family.bert:
        p = spec.model_type
        mods = [
            Module(f"{p}.embeddings.word_embeddings", "embedding", V, h, False, "embed"),
            Module(f"{p}.embeddings.position_embeddings", "embedding", spec.max_positions, h, False, "embed"),
            Module(f"{p}.embeddings.token_type_embeddings", "embedding", spec.type_vocab_size, h, False, "embed"),
            _norm(f"{p}.embeddings.LayerNorm", h, True),
        ]
        if spec.model_type == "roberta":  # RobertaForSequenceClassification: no pooler, a 2-layer head
            mods += [_lin("classifier.dense", h, h, True, "classifier"),
                     _lin("classifier.out_proj", h, labels, True, "classifier")]
        else:
            mods += [_lin(f"{p}.pooler.dense", h, h, True, "pooler"),
                     _lin("classifier", h, labels, True, "classifier")]
        return tuple(mods)
    if spec.family is Family.gpt2:
        mods = [Module("transformer.wte", "embedding", V, h, False, "embed"),
                Module("transformer.wpe", "embedding", spec.max_positions, h, False, "embed"),
                _norm("transformer.ln_f", h, True)]
    else:
        mods = [Module("model.embed_tokens", "embedding", V, h, False, "embed"), _norm("model.norm", h, False)]
    if spec.task is Task.causal_lm:
        mods.append(_lin("lm_head", h, V, False, "head"))
    else:
        mods.append(_lin("score", h, labels, False, "classifier"))
    return tuple(mods)


def tied_head(spec: ModelSpec) -> bool:
    """The LM head's weight is the input embedding matrix (one tensor, counted once)."""
    return spec.task is Task.causal_lm and spec.tie_embeddings


def classifier_module_names(spec: ModelSpec) -> tuple[str, ...]:
    """Top-level head module peft's SEQ_CLS task saves as trainable (``modules_to_save``)."""
    if spec.task is not Task.seq_cls:
        return ()
    return ("score",) if spec.family is not Family.bert else ("classifier",)


@functools.cache
def all_module_names(spec: ModelSpec) -> tuple[tuple[str, Module], ...]:
    """(full name, module) for every module, blocks expanded, in registration order (embeddings, blocks,
    final norm, pooler, heads), which is the order optimizers visit parameters in."""
    prefix = layer_prefix(spec)
    globals_ = global_modules(spec)
    out = [(m.name, m) for m in globals_ if m.role == "embed" or m.name.endswith("embeddings.LayerNorm")]
    block = registration_order(spec, layer_modules(spec))
    for i in range(spec.num_layers):
        p = prefix.format(i=i)
        out += [(p + m.name, m) for m in block]
    out += [(m.name, m) for m in globals_ if (m.name, m) not in out]
    return tuple(out)


def registration_order(spec: ModelSpec, mods: tuple[Module, ...]) -> tuple[Module, ...]:
    """A block's modules in the order its ``__init__`` registers them (``model.parameters()`` order, which
    for-loop optimizers visit). BERT and GPT-2 register in forward order. A LLaMA-style decoder layer registers
    ``self_attn`` (q, k, v, o, then Qwen3/Gemma-3's q/k norms; Phi-3's Phi3Attention makes o_proj before
    qkv_proj), then ``mlp``, then its norms (LlamaDecoderLayer.__init__, transformers 5.23)."""
    if spec.family is not Family.llama:
        return mods

    def rank(m: Module) -> tuple[int, int]:
        if m.name.startswith("self_attn."):
            if m.kind == "norm":
                return 1, 0
            return 0, int(spec.fused_qkv and m.name != "self_attn.o_proj")
        return (2, 0) if m.name.startswith("mlp.") else (3, 0)

    return tuple(sorted(mods, key=rank))
