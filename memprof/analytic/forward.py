"""The whole forward pass of a model, as one script on a ``sim.Graph`` (pure): the family's embeddings,
the masks and rotary tables shared by every block, ``layers`` blocks (checkpointed when asked), the head and
loss, and the method's pieces around them (peft_methods.py).

Mirrors transformers 5.23.0's ``*Model.forward`` / ``*For*.forward`` control flow (masking_utils.py
``create_causal_mask``, modeling_layers.py ``GradientCheckpointingLayer``) and peft 0.21's ``PeftModel.forward``.
Each family's ops are in families/<family>.py; NB: a changed modeling file changes the truth, so each of those
files names the upstream file and version it mirrors, and the traced estimator (``--trace``) runs the real
code the tests compare against.
"""

from __future__ import annotations

from types import ModuleType

from ..config import AttnImpl, Method, Regime, RunSetup
from ..spec import Family, ModelSpec
from . import peft_methods
from .context import Ctx
from .families import bert, gpt2, llama
from .shapes import scores
from .sim import Graph, P, T

# each family script: embeddings(ctx, ids), prompt_embeddings_tail(ctx, x), layer(ctx, x, i, cos, sin, mask),
# head(ctx, x, held)
FAMILY_SCRIPTS: dict[Family, ModuleType] = {Family.bert: bert, Family.gpt2: gpt2, Family.llama: llama}


def build_context(g: Graph, spec: ModelSpec, setup: RunSetup) -> Ctx:
    regime = setup.effective_regime
    wdt = setup.dtype.value if regime in (Regime.pure, Regime.mixed) or setup.method is Method.qlora else "fp32"
    amp = setup.dtype.value if regime is Regime.amp else None
    ctx = Ctx(g, spec, setup, wdt, amp)
    peft_methods.configure(ctx)
    return ctx


def forward(ctx: Ctx, layers: int) -> T:
    """Script the whole forward with ``layers`` blocks; segments: embed, layer0, layer1.., head."""
    g, spec, setup = ctx.g, ctx.spec, ctx.setup
    script = FAMILY_SCRIPTS[spec.family]
    g.segment("embed")
    ids = g.given(P(bs=1), 1, "int64", "input_ids")
    peft_held: list[T] = []  # locals of PeftModel.forward, kept until the whole forward (head, loss) returns
    if setup.method in (Method.prompt, Method.p_tuning):
        x, held, peft_held = peft_methods.prompt_embeddings(ctx, ids, script.prompt_embeddings_tail)
    else:
        x, held = script.embeddings(ctx, ids)  # held: locals the model's forward keeps until it returns
    held.append(g.alias(x))  # embedding_output / inputs_embeds stay referenced by the model's forward
    mask = None
    cos = sin = None
    if setup.padded or (spec.family is not Family.bert and (setup.attn_impl is AttnImpl.eager
                                                            or setup.method is Method.prefix)):
        # create_causal_mask (decoders) / create_bidirectional_mask (encoders, padding only): a (b, 1, s, s_kv)
        # mask shared by all layers, bool for SDPA (attention_core converts it per call), the model dtype for
        # eager (the dtype's minimum added); SDPA gets none when nothing needs masking beyond causality (no
        # padding, no prefix: is_causal instead)
        held.append(g.new(scores(ctx, 1), 1, "bool" if setup.attn_impl is AttnImpl.sdpa
                          else ctx.amp and "fp32" or ctx.wdt, "causal mask"))
        mask = held[-1]
    if spec.family is Family.llama:
        cos, sin = llama.rope(ctx)
        held += [cos, sin]
    if setup.method is Method.prefix:
        peft_methods.prefix_encoder(ctx)
    for i in range(layers):
        g.segment(f"layer{i}")
        if setup.grad_checkpointing:  # GradientCheckpointingLayer: checkpoint(block, hidden_states, ...)
            prefix = ctx.prefix_kv[i] if ctx.prefix_kv else (None, None)
            g.begin_checkpoint([x, cos, sin, mask, *prefix])
        ctx.block = i
        y = script.layer(ctx, x, i, cos, sin, mask)
        ctx.block = None
        if setup.grad_checkpointing:
            g.end_checkpoint()
        g.drop(x)
        x = y
    g.segment("head")
    loss = script.head(ctx, x, held)
    if setup.method is Method.adalora:
        loss = peft_methods.adalora_orthogonal_loss(ctx, loss)
    for t in ctx.kv_cache:  # the output's past_key_values
        ctx.keep_output(t)
    g.drop(*peft_held, *ctx.kv_cache)
    ctx.end_autocast()
    return loss
