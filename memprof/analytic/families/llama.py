"""LLaMA-style decoders, op by op (pure): LlamaModel's embeddings and rotary embedding, LlamaDecoderLayer
(RMSNorm, q/k/v projections, apply_rotary_pos_emb, attention, o_proj, gated MLP) and its variants: Mistral,
Qwen2 (q/k/v biases), Qwen3 (q/k norms), Gemma (scaled embeddings, (1 + w) norms), Gemma-2/3 (sandwich norms,
soft-capping), Phi-3 (fused qkv_proj / gate_up_proj, rotary ending in a cat). The LM head and loss are heads.py's.

Mirrors transformers 5.23.0 models/llama/modeling_llama.py, mistral/, qwen2/, qwen3/, gemma/, gemma2/,
gemma3/ and phi3/modeling_*.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..attention import attention_core
from ..heads import decoder_head
from ..hf_layers import activation, input_embeddings
from ..modules import global_modules, layer_modules, layer_prefix
from ..peft_methods import adapter_after, cache_update
from ..shapes import tok
from ..sim import P, T, pscale
from .moe import moe_block

if TYPE_CHECKING:
    from ..context import Ctx


def embeddings(ctx: Ctx, ids: T) -> tuple[T, list[T]]:
    """LlamaModel's embedding lookup; returns the first block's input and the held inputs_embeds."""
    g, spec = ctx.g, ctx.spec
    mods = {m.name: m for m in global_modules(spec)}
    e = input_embeddings(ctx, ctx.embed(ids, "model.embed_tokens", mods["model.embed_tokens"], "embed_tokens"))
    if spec.embed_scale:  # Gemma: hidden * normalizer; inputs_embeds (e) stays referenced by the model's forward
        return g.mul(e, None, "embeddings * sqrt(h)"), [e]
    return e, []


def rope(ctx: Ctx) -> tuple[T, T]:
    """LlamaRotaryEmbedding: cos and sin (1, s, d) computed once per forward in fp32, cast to the model dtype;
    every layer keeps them for the q/k rotations' backward."""
    g, d = ctx.g, ctx.spec.head_dim
    s_len = P(s=d, c=d * ctx.extra_q)
    freqs = g.new(P(s=d // 2, c=d // 2 * ctx.extra_q), d // 2, "fp32", "rope freqs")
    emb = g.new(s_len, d, "fp32", "rope emb")
    g.drop(freqs)
    cos32, sin32 = g.new(s_len, d, "fp32", "rope cos (fp32)"), g.new(s_len, d, "fp32", "rope sin (fp32)")
    g.drop(emb)
    cos = g.cast(cos32, ctx.amp and "fp32" or ctx.wdt, "rope cos")
    sin = g.cast(sin32, ctx.amp and "fp32" or ctx.wdt, "rope sin")
    g.drop(cos32, sin32)
    return cos, sin


def _rotate(ctx: Ctx, x: T, cos: T, sin: T, label: str) -> T:
    """One half of apply_rotary_pos_emb: x * cos + cat(-x2, x1) * sin."""
    g = ctx.g
    a = g.mul(x, cos, label + " * cos")
    x2 = g.view(x, numel=pscale(x.numel, 0.5))
    neg = g.unary(x2, label + " -x2", "none")
    x1 = g.view(x, numel=pscale(x.numel, 0.5))
    rot = g.cat([neg, x1], label + " rotate_half")
    g.drop(neg, x1, x2)
    b_ = g.mul(rot, sin, label + " * sin")
    g.drop(rot)
    out = g.add(a, b_, label + " rotated")
    g.drop(a, b_)
    if ctx.spec.rotary_cat:  # Phi-3: cat([rotated, x_pass]) (x_pass empty at full rotary): a contiguous copy
        full = g.cat([out], label + " rotated (cat)")
        g.drop(out)
        out = full
    return out


def layer(ctx: Ctx, x: T, i: int, cos: T | None = None, sin: T | None = None, mask: T | None = None) -> T:
    """LlamaDecoderLayer (borrows x) and its variants (Qwen2/3, Mistral, Gemma 1-3, Phi-3)."""
    g, spec = ctx.g, ctx.spec
    pre = layer_prefix(spec).format(i=i)
    mods = {m.name: m for m in layer_modules(spec)}
    a, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    p_h = spec.hidden_dropout if ctx.setup.dropout else 0.0
    p_a = spec.attention_dropout if ctx.setup.dropout else 0.0

    def lin(t: T, name: str) -> T:
        return ctx.linear(t, pre + name, mods[name], name)

    def norm(t: T, name: str) -> T:
        return ctx.norm(t, pre + name, mods[name], name)

    n1 = norm(x, "input_layernorm")
    # LlamaAttention.forward: query/key/value states live until it returns
    if spec.fused_qkv:
        qkv = lin(n1, "self_attn.qkv_proj")
        q, k, v = (g.view(qkv, a * d, tok(ctx, a * d)), g.view(qkv, kv * d, tok(ctx, kv * d)),
                   g.view(qkv, kv * d, tok(ctx, kv * d)))
        g.drop(qkv)
    elif spec.qk_norm_full:  # OLMoE: q_norm(q_proj(x)), k_norm(k_proj(x)) over the whole projection, then v
        q = lin(n1, "self_attn.q_proj")
        qn = norm(q, "self_attn.q_norm")
        g.drop(q)
        k = lin(n1, "self_attn.k_proj")
        kn = norm(k, "self_attn.k_norm")
        g.drop(k)
        q, k, v = qn, kn, lin(n1, "self_attn.v_proj")
    else:
        q, k, v = lin(n1, "self_attn.q_proj"), lin(n1, "self_attn.k_proj"), lin(n1, "self_attn.v_proj")
    if spec.qk_norm and not spec.qk_norm_full:  # q.view(b, s, a, d) normalised per head: one rsqrt per (token, head)
        qd, kd = g.view(q, d), g.view(k, d)
        g.drop(q, k)
        qn = ctx.rms_norm(qd, ctx.param(pre + "self_attn.q_norm", mods["self_attn.q_norm"]), "q_norm")
        kn = ctx.rms_norm(kd, ctx.param(pre + "self_attn.k_norm", mods["self_attn.k_norm"]), "k_norm")
        g.drop(qd, kd)
        q, k = g.view(qn, a * d), g.view(kn, kv * d)
        g.drop(qn, kn)
    qr = _rotate(ctx, q, cos, sin, "q")
    kr = _rotate(ctx, k, cos, sin, "k")
    g.drop(q, k)
    if ctx.kv_cat:
        kr, v = cache_update(ctx, kr, v, i, kv * d)
    c, weights = attention_core(ctx, qr, kr, v, a, kv, d, p_a, True, mask, "self-attention",
                                q_contiguous=spec.rotary_cat)
    o = lin(c, "self_attn.o_proj")
    g.drop(c, qr, kr, v)
    o = adapter_after(ctx, o, "attn", i)
    if spec.sandwich_norm:
        on = norm(o, "post_attention_layernorm")
        g.drop(o)
        o = on
    od = g.dropout(o, p_h, "attention residual dropout")
    g.drop(o)
    g.drop(n1)
    r = g.add(x, od, "attention residual")
    g.drop(od)
    n2 = norm(r, "pre_feedforward_layernorm" if spec.sandwich_norm else "post_attention_layernorm")
    if spec.num_experts:  # MixtralSparseMoeBlock instead of the MLP
        moe_out = adapter_after(ctx, moe_block(ctx, n2, pre, mods), "ffn", i)  # (adapters.py: after the block)
        g.drop(n2)
        out = g.add(r, moe_out, "moe residual")
        g.drop(r, moe_out, weights)
        return out
    # LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)), temporaries freed as the expression unwinds
    if spec.fused_qkv:
        inter = spec.intermediate_size
        gu = lin(n2, "mlp.gate_up_proj")
        gate, up = g.view(gu, inter, tok(ctx, inter)), g.view(gu, inter, tok(ctx, inter))
        g.drop(gu)
        act = activation(ctx, gate, "mlp act")
    else:
        gate = lin(n2, "mlp.gate_proj")
        act = activation(ctx, gate, "mlp act")
        g.drop(gate)
        up = lin(n2, "mlp.up_proj")
    prod = g.mul(act, up, "act * up")
    g.drop(act, up)
    if spec.fused_qkv:
        g.drop(gate)
    down = lin(prod, "mlp.down_proj")
    g.drop(prod)
    down = adapter_after(ctx, down, "ffn", i)
    if spec.sandwich_norm:
        dn = norm(down, "post_feedforward_layernorm")
        g.drop(down)
        down = dn
    dd = g.dropout(down, p_h, "mlp residual dropout")
    g.drop(down, n2)
    out = g.add(r, dd, "mlp residual")
    g.drop(r, dd, weights)
    return out


def prompt_embeddings_tail(ctx: Ctx, x: T) -> tuple[T, list[T]]:
    """LlamaModel.forward with ``inputs_embeds`` (prompt tuning): Gemma scales them by sqrt(h)."""
    g, spec = ctx.g, ctx.spec
    if spec.embed_scale:
        scaled = g.mul(x, None, "embeddings * sqrt(h)")
        g.drop(x)
        return scaled, []
    return x, []


head = decoder_head
