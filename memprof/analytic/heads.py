"""Task heads and losses (pure): the decoders' final norm with the LM head and ``ForCausalLMLoss``, or the
sequence-classification score head, and ``CrossEntropyLoss`` over class logits (BERT's heads are in
families/bert.py and end here too).

Mirrors transformers 5.23 loss/loss_utils.py (``ForCausalLMLoss``: logits.float(), padded and shifted labels,
cross_entropy), models/llama/modeling_llama.py ``LlamaForCausalLM`` / ``GenericForSequenceClassification``
(modeling_layers.py), models/gpt2/modeling_gpt2.py ``GPT2LMHeadModel``, Gemma-2's final logit soft-capping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import Method
from ..spec import Family, Task
from .modules import global_modules, tied_head
from .shapes import tok
from .sim import P, T

if TYPE_CHECKING:
    from .context import Ctx


def decoder_head(ctx: Ctx, x: T, held: list[T]) -> T:
    """Final norm (consumes x; the model's held locals are freed when it returns), then the LM head + ForCausalLMLoss, or the seq-cls score head (logits for every
    token, the last one gathered) + CrossEntropyLoss. The returned output (logits) is dropped by the harness
    right after the forward."""
    g, spec = ctx.g, ctx.spec
    mods = {m.name: m for m in global_modules(spec)}
    norm_name = "transformer.ln_f" if spec.family is Family.gpt2 else "model.norm"
    n = ctx.norm(x, norm_name, mods[norm_name], "final norm")
    g.drop(x, *held)
    V = spec.vocab_size
    if spec.task is Task.seq_cls:
        logits = ctx.linear(n, "score", mods["score"], "score")
        pooled = g.copy(logits, "pooled logits")  # logits[arange(b), last_token]: advanced indexing copies
        g.resize(pooled, P(b=spec.num_labels))
        loss = classification_loss(ctx, pooled)
        g.drop(logits, n)
        return loss
    name = "model.embed_tokens" if spec.family is Family.llama else "transformer.wte"
    if tied_head(spec) and ctx.setup.method is Method.trainable_tokens:
        # peft wraps the tied output layer too: F.linear(x, merged), the merged matrix kept for x's gradient
        merged = ctx.merged_tokens(ctx.params[f"{name}.weight"], "lm_head")
        nh, mh = ctx.to_half(n, "lm_head"), ctx.to_half(merged, "lm_head merged matrix")
        logits = g.linear(nh, merged, V, "logits", w_used=mh, out_dtype=ctx.amp, x_saved=n)
        g.drop(nh, mh, merged)
    elif tied_head(spec):
        logits = head_linear(ctx, n, ctx.params[f"{name}.weight"], V)
    else:
        logits = ctx.linear(n, "lm_head", mods["lm_head"], "lm_head")
    if spec.final_softcap:
        t1 = g.mul(logits, None, "logits / softcap")
        t2 = g.unary(t1, "logits tanh", "output")
        g.drop(t1)
        capped = g.mul(t2, None, "logits * softcap")
        g.drop(t2, logits)
        logits = capped
    # ForCausalLMLoss: logits.float(); labels padded and shifted (int64 copies); cross_entropy
    lf = g.cast(logits, "fp32", "logits (fp32)")
    padded = g.new(P(bs=1, b=1 + ctx.extra_q), 1, "int64", "labels padded")
    shifted = g.new(tok(ctx, 1), 1, "int64", "labels shifted")
    ls = g.unary(lf, "log_softmax", "output")
    loss = g.new(P(c=1), 1, "fp32", "loss")
    g.custom("nll_loss", [ls], [loss], [shifted])
    g.drop(ls, shifted, padded, lf)   # the loss function's locals
    g.drop(n)                         # CausalLM.forward's hidden_states
    ctx.keep_output(logits)
    g.drop(logits)                    # the returned output, dropped by the loop right after the forward
    return loss


def head_linear(ctx: Ctx, n: T, w: T, V: int) -> T:
    g = ctx.g
    nh = ctx.to_half(n, "lm_head")
    wq = ctx.weight_for_matmul(w, "lm_head")
    logits = g.linear(nh, w, V, "logits", w_used=wq, out_dtype=ctx.amp, x_saved=n)
    g.drop(nh, wq)
    return logits


def classification_loss(ctx: Ctx, logits: T) -> T:
    """CrossEntropyLoss(logits.view(-1, num_labels), labels): log_softmax keeps its output."""
    g = ctx.g
    lin = ctx.to_fp32(logits, "loss")
    ls = g.unary(lin, "log_softmax", "output")
    ctx.keep_output(logits)
    g.drop(lin, logits)
    loss = g.new(P(c=1), 1, ls.dtype, "loss")
    g.custom("nll_loss", [ls], [loss], [])
    g.drop(ls)
    return loss
