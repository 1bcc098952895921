"""GPT-2 decoders, op by op (pure): GPT2Model's embeddings, GPT2Block (ln_1, GPT2Attention with the fused
c_attn Conv1D, ln_2, GPT2MLP with NewGELUActivation); the LM head and loss are heads.py's.

Mirrors transformers 5.23.0 models/gpt2/modeling_gpt2.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..attention import attention_core
from ..heads import decoder_head
from ..hf_layers import activation, input_embeddings
from ..modules import global_modules, layer_modules, layer_prefix
from ..peft_methods import adapter_after, cache_update
from ..shapes import tok
from ..sim import P, T

if TYPE_CHECKING:
    from ..context import Ctx


def embeddings(ctx: Ctx, ids: T) -> tuple[T, list[T]]:
    """GPT2Model.forward up to the blocks. Returns the first block's input and the locals that GPT2Model
    keeps until it returns (inputs_embeds, position_ids, position_embeds)."""
    g, spec = ctx.g, ctx.spec
    mods = {m.name: m for m in global_modules(spec)}
    h = spec.hidden_size
    wte = input_embeddings(ctx, ctx.embed(ids, "transformer.wte", mods["transformer.wte"], "wte"))
    pos_ids = g.new(P(s=1), 1, "int64", "position ids")
    wpe = g.embedding(pos_ids, ctx.param("transformer.wpe", mods["transformer.wpe"]), h, ctx.wdt, "wpe")
    g.resize(wpe, P(s=h))
    e = g.add(wte, wpe, "embeddings sum")
    out = g.dropout(e, spec.embedding_dropout if ctx.setup.dropout else 0, "embedding dropout")
    g.drop(e)
    return out, [wte, wpe, pos_ids]


def layer(ctx: Ctx, x: T, i: int, cos: T | None = None, sin: T | None = None, mask: T | None = None) -> T:
    """GPT2Block (borrows x): ln_1 -> GPT2Attention -> + residual -> ln_2 -> GPT2MLP -> + residual."""
    g, spec = ctx.g, ctx.spec
    pre = layer_prefix(spec).format(i=i)
    mods = {m.name: m for m in layer_modules(spec)}
    h, a, d = spec.hidden_size, spec.num_heads, spec.head_dim
    p_h = spec.hidden_dropout if ctx.setup.dropout else 0.0
    p_a = spec.attention_dropout if ctx.setup.dropout else 0.0
    n1 = ctx.norm(x, pre + "ln_1", mods["ln_1"], "ln_1")
    # GPT2Attention.forward: q, k, v views of the c_attn output live until it returns
    qkv = ctx.linear(n1, pre + "attn.c_attn", mods["attn.c_attn"], "attn.c_attn")
    q, k, v = g.view(qkv, h, tok(ctx, h)), g.view(qkv, h, tok(ctx, h)), g.view(qkv, h, tok(ctx, h))
    g.drop(qkv)
    if ctx.kv_cat:
        k, v = cache_update(ctx, k, v, i, h)
    c, weights = attention_core(ctx, q, k, v, a, a, d, p_a, True, mask, "self-attention")
    o = ctx.linear(c, pre + "attn.c_proj", mods["attn.c_proj"], "attn.c_proj")
    g.drop(c)
    o = adapter_after(ctx, o, "attn", i)
    attn_out = g.dropout(o, p_h, "attention residual dropout")
    g.drop(o, q, k, v)
    r = g.add(attn_out, x, "attention residual")
    g.drop(n1)
    n2 = ctx.norm(r, pre + "ln_2", mods["ln_2"], "ln_2")
    # GPT2MLP.forward: each rebinding frees the previous value unless autograd keeps it
    f = ctx.linear(n2, pre + "mlp.c_fc", mods["mlp.c_fc"], "mlp.c_fc")
    act = activation(ctx, f, "mlp act")
    g.drop(f)
    o2 = ctx.linear(act, pre + "mlp.c_proj", mods["mlp.c_proj"], "mlp.c_proj")
    g.drop(act)
    o2 = adapter_after(ctx, o2, "ffn", i)
    ff = g.dropout(o2, p_h, "mlp dropout")
    g.drop(o2)
    out = g.add(r, ff, "mlp residual")
    g.drop(n2, r, ff, attn_out, weights)
    return out


def prompt_embeddings_tail(ctx: Ctx, x: T) -> tuple[T, list[T]]:
    """GPT2Model.forward with ``inputs_embeds`` (prompt tuning): position embeddings over s + p, dropout."""
    g, spec = ctx.g, ctx.spec
    n, h = ctx.extra_q, spec.hidden_size
    mods = {m.name: m for m in global_modules(spec)}
    pos_ids = g.new(P(s=1, c=n), 1, "int64", "position ids")
    wpe = g.embedding(pos_ids, ctx.param("transformer.wpe", mods["transformer.wpe"]), h, ctx.wdt, "wpe")
    g.resize(wpe, P(s=h, c=h * n))
    e = g.add(x, wpe, "embeddings sum")
    out = g.dropout(e, spec.embedding_dropout if ctx.setup.dropout else 0, "embedding dropout")
    g.drop(e)
    g.drop(x)
    return out, [wpe, pos_ids]


head = decoder_head
