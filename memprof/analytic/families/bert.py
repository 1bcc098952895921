"""BERT / RoBERTa encoders, op by op (pure): BertEmbeddings, BertLayer (BertSelfAttention, BertSelfOutput,
feed-forward chunk), BertPooler + classifier, RoBERTa's position ids and RobertaClassificationHead.

Mirrors transformers 5.23.0 models/bert/modeling_bert.py and models/roberta/modeling_roberta.py (newer
releases refuse prefix tuning with a classification head: memprof/compat.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..attention import attention_core
from ..heads import classification_loss
from ..hf_layers import activation, input_embeddings
from ..modules import Module, global_modules, layer_modules, layer_prefix
from ..peft_methods import adapter_after, cache_update
from ..shapes import tok
from ..sim import P, T

if TYPE_CHECKING:
    from ..context import Ctx


def embeddings(ctx: Ctx, ids: T) -> tuple[T, list[T]]:
    """BertEmbeddings (RoBERTa: position ids from the input ids); returns the first layer's input and no held locals."""
    g, spec = ctx.g, ctx.spec
    mods = {m.name.rsplit(".", 1)[-1]: (m.name, m) for m in global_modules(spec)}
    h = spec.hidden_size
    roberta = spec.model_type == "roberta"
    if roberta:
        # create_position_ids_from_input_ids: mask, cumsum, positions (b*s int64); token types gathered (b*s)
        tmp = g.new(tok(ctx, 1), 1, "int64", "position id scratch")
        pos_ids = g.new(tok(ctx, 1), 1, "int64", "position ids")
        g.drop(tmp)
        tt_ids = g.new(tok(ctx, 1), 1, "int64", "token type ids")
    else:
        pos_ids = g.given(P(s=1), 1, "int64", "position ids (buffer)", fate="params_frozen")
        tt_ids = g.given(tok(ctx, 1), 1, "int64", "token type ids (buffer)", fate="params_frozen")
    word = input_embeddings(ctx, ctx.embed(ids, *mods["word_embeddings"], "word embeddings"))
    tt = g.embedding(tt_ids, ctx.param(*mods["token_type_embeddings"]), h, ctx.wdt, "token type embeddings")
    e1 = g.add(word, tt, "word + token type")
    pos = g.embedding(pos_ids, ctx.param(*mods["position_embeddings"]), h, ctx.wdt, "position embeddings")
    if not roberta:
        g.resize(pos, P(s=h))
    e2 = g.add(e1, pos, "embeddings sum")
    g.drop(e1)
    ln = ctx.norm(e2, *mods["LayerNorm"], "embedding LayerNorm")
    g.drop(e2)
    out = g.dropout(ln, spec.embedding_dropout if ctx.setup.dropout else 0, "embedding dropout")
    g.drop(ln, word, tt, pos, tt_ids, pos_ids)  # locals of BertEmbeddings.forward
    return out, []


def layer(ctx: Ctx, x: T, i: int, cos: T | None = None, sin: T | None = None, mask: T | None = None) -> T:
    """BertLayer: BertAttention (self-attention + BertSelfOutput), then feed_forward_chunk."""
    g, spec = ctx.g, ctx.spec
    pre = layer_prefix(spec).format(i=i)
    mods = {m.name: m for m in layer_modules(spec)}
    a, d = spec.num_heads, spec.head_dim
    p_h = spec.hidden_dropout if ctx.setup.dropout else 0.0
    p_a = spec.attention_dropout if ctx.setup.dropout else 0.0

    def lin(t: T, name: str) -> T:
        return ctx.linear(t, pre + name, mods[name], name)

    # BertSelfAttention.forward: query/key/value layers live until it returns
    q, k, v = lin(x, "attention.self.query"), lin(x, "attention.self.key"), lin(x, "attention.self.value")
    if ctx.kv_cat:
        k, v = cache_update(ctx, k, v, i, spec.hidden_size)
    c, weights = attention_core(ctx, q, k, v, a, a, d, p_a, False, mask, "self-attention")
    g.drop(q, k, v)
    # BertSelfOutput.forward(c, x): dense -> dropout -> LayerNorm(dropout + x); c lives until BertAttention returns
    o = lin(c, "attention.output.dense")
    o = adapter_after(ctx, o, "attn", i)
    od = g.dropout(o, p_h, "attention output dropout")
    g.drop(o)
    r = g.add(od, x, "attention residual")
    a_out = ctx.norm(r, pre + "attention.output.LayerNorm", mods["attention.output.LayerNorm"], "attention LayerNorm")
    g.drop(r, od, c)
    # feed_forward_chunk: intermediate_output lives until the chunk returns
    f = lin(a_out, "intermediate.dense")
    act = activation(ctx, f, "intermediate act")
    g.drop(f)
    o2 = lin(act, "output.dense")
    o2 = adapter_after(ctx, o2, "ffn", i)
    o2d = g.dropout(o2, p_h, "output dropout")
    g.drop(o2)
    r2 = g.add(o2d, a_out, "output residual")
    out = ctx.norm(r2, pre + "output.LayerNorm", mods["output.LayerNorm"], "output LayerNorm")
    g.drop(r2, o2d, act, a_out, weights)
    return out


def head(ctx: Ctx, x: T, held: list[T]) -> T:
    """BertPooler (inside BertModel, which then frees its locals) + classifier, or RoBERTa's classification
    head; then CrossEntropyLoss. The last hidden state (x) stays referenced by the model output."""
    g, spec = ctx.g, ctx.spec
    mods = {m.name: m for m in global_modules(spec)}
    p = spec.classifier_dropout if ctx.setup.dropout else 0.0
    first = g.view(x, numel=P(b=spec.hidden_size))  # hidden_states[:, 0]: keeps the whole last hidden state
    if spec.model_type == "roberta":
        t = g.dropout(first, p, "classifier dropout")
        dense = ctx.linear(t, "classifier.dense", mods["classifier.dense"], "classifier.dense")
        g.drop(t)
        th = g.unary(dense, "classifier tanh", "output")
        g.drop(dense)
        t2 = g.dropout(th, p, "classifier dropout 2")
        g.drop(th)
        logits = ctx.linear(t2, "classifier.out_proj", mods["classifier.out_proj"], "classifier.out_proj")
        g.drop(t2)
        g.drop(*held)
    else:
        pname = f"{spec.model_type}.pooler.dense"
        dense = ctx.linear(first, pname, mods[pname], "pooler.dense")
        pooled = g.unary(dense, "pooler tanh", "output")
        g.drop(dense, *held)
        t = g.dropout(pooled, p, "classifier dropout")
        logits = ctx.linear(t, "classifier", mods["classifier"], "classifier")
        g.drop(t, pooled)
    loss = classification_loss(ctx, logits)
    g.drop(first, x)
    return loss


def prompt_embeddings_tail(ctx: Ctx, x: T) -> tuple[T, list[T]]:
    """BertEmbeddings with ``inputs_embeds`` (prompt tuning): token types, positions, LayerNorm, dropout."""
    g, spec = ctx.g, ctx.spec
    n, h = ctx.extra_q, spec.hidden_size
    mods = {m.name: m for m in global_modules(spec)}
    tt_ids = g.given(tok(ctx, 1), 1, "int64", "token type ids")
    tt = g.embedding(tt_ids, ctx.param(*_named(mods, "token_type_embeddings")), h, ctx.wdt, "token type")
    e1 = g.add(x, tt, "embeds + token type")
    roberta = spec.model_type == "roberta"
    pos_ids = g.new(tok(ctx, 1), 1, "int64", "position ids") if roberta else \
        g.given(P(s=1, c=n), 1, "int64", "position ids", fate="params_frozen")
    pos = g.embedding(pos_ids, ctx.param(*_named(mods, "position_embeddings")), h, ctx.wdt, "positions")
    if not roberta:
        g.resize(pos, P(s=h, c=n * h))
    e2 = g.add(e1, pos, "embeddings sum")
    g.drop(e1)
    ln = ctx.norm(e2, *_named(mods, "LayerNorm"), "embedding LayerNorm")
    g.drop(e2)
    out = g.dropout(ln, spec.embedding_dropout if ctx.setup.dropout else 0, "embedding dropout")
    g.drop(ln, tt, pos, pos_ids, x)
    return out, []


def _named(mods: dict, suffix: str) -> tuple[str, Module]:
    name = next(n for n in mods if n.endswith(suffix))
    return name, mods[name]
