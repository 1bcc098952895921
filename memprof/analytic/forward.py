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

from ..compat import resolve_attention
from ..config import ZERO_STRATEGIES, AttnImpl, Method, Regime, RunSetup, Strategy
from ..spec import FULL, SLIDING, Family, ModelSpec
from . import peft_methods
from .context import Ctx
from .families import bert, gpt2, llama
from .shapes import batch_mask, scores
from .sim import Graph, P, T

# each family script: embeddings(ctx, ids), prompt_embeddings_tail(ctx, x), layer(ctx, x, i, cos, sin, mask),
# head(ctx, x, held)
FAMILY_SCRIPTS: dict[Family, ModuleType] = {Family.bert: bert, Family.gpt2: gpt2, Family.llama: llama}


def build_context(g: Graph, spec: ModelSpec, setup: RunSetup) -> Ctx:
    setup = resolve_attention(spec, setup)[0]  # auto -> the kernel transformers picks (estimate resolves it first)
    regime = setup.effective_regime
    wdt = setup.dtype.value if regime in (Regime.pure, Regime.mixed) or setup.method is Method.qlora else "fp32"
    amp = setup.dtype.value if regime is Regime.amp else None
    # DeepSpeed's bf16 / fp16 engine casts every parameter, peft's fp32 adapters too (engine.py
    # _configure_distributed_model): a ZeRO rank's replay keeps its setup's parallel part to say so (ranks._share)
    zero = setup.parallel is not None and setup.parallel.strategy in ZERO_STRATEGIES
    ctx = Ctx(g, spec, setup, wdt, amp, adapter_dtype=wdt if zero and wdt != "fp32" else "fp32")
    # ZeRO-3 wraps torch's linear in its own autograd function (sim.Graph.ds_linear) unless memory_efficient_linear
    # is off
    par = setup.parallel
    g.ds_linear = zero and par.strategy is Strategy.zero3 and par.zero_efficient_linear is not False
    peft_methods.configure(ctx)
    return ctx


def mask_kinds(spec: ModelSpec) -> tuple[str, ...]:
    """The attention masks the model's forward builds, by layer type: Gemma-2/3 always build both
    (causal_mask_mapping), Qwen2/3 the full one and a sliding one when a block slides, Mistral and Phi-3 one
    (create_sliding_window_causal_mask when config.sliding_window is set), the others a full one."""
    if spec.model_type in ("gemma2", "gemma3_text"):
        return (FULL, SLIDING)
    kinds = set(spec.layer_types) or {FULL}
    if spec.model_type in ("qwen2", "qwen3"):
        kinds.add(FULL)
    return tuple(sorted(kinds))


def attention_masks(ctx: Ctx) -> dict[str, T | None]:
    """Per layer type, the (b, 1, s, s_kv) mask every block of that type gets, made once per forward and held by
    the model's forward: bool for SDPA (attention_core converts it per call), the model dtype for eager (the
    dtype's minimum added). masking_utils builds none for SDPA when nothing needs masking beyond causality
    (_ignore_causal_mask_sdpa: no padding, no prefix, and for a sliding mask fewer keys than the window, kv_length
    < local_attention_size: is_causal instead); eager always gets one, encoders only with padding
    (create_bidirectional_mask)."""
    g, spec, setup = ctx.g, ctx.spec, ctx.setup
    sdpa = setup.attn_impl is AttnImpl.sdpa
    always = setup.padded or (spec.family is not Family.bert and (not sdpa or setup.method is Method.prefix))
    masks: dict[str, T | None] = {}
    for kind in mask_kinds(spec):
        label = "sliding-window mask" if kind == SLIDING else "causal mask"
        if always:
            masks[kind] = g.new(scores(ctx, 1), 1, "bool" if sdpa else ctx.amp and "fp32" or ctx.wdt, label)
        elif kind == SLIDING and ctx.window_reached:  # SDPA, nothing but the window to mask: one row, expanded
            masks[kind] = g.new(batch_mask(ctx), 1, "bool", label + " (expanded over the batch)")
        else:
            masks[kind] = None
    return masks


def window_reached(spec: ModelSpec, setup: RunSetup) -> bool:
    """Whether the keys (the sequence with any prepended virtual tokens) reach the sliding window, where
    masking_utils stops relying on is_causal (kv_length >= local_attention_size)."""
    return spec.sliding_window is not None and setup.seq_len + setup.prepended_tokens >= spec.sliding_window


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
    masks = attention_masks(ctx)
    held += [m for m in masks.values() if m is not None]
    ropes: dict[str, tuple[T, T]] = {}
    if spec.family is Family.llama:
        # one rotary table, or one per layer type (Gemma-3: position_embeddings[layer_type] for each type)
        for kind in (sorted(set(spec.layer_types)) if spec.rope_per_layer_type else [FULL]):
            ropes[kind] = llama.rope(ctx)
            held += ropes[kind]
    if setup.method is Method.prefix:
        peft_methods.prefix_encoder(ctx)
    for i in range(layers):
        g.segment(f"layer{i}")
        kind = ctx.block_types[i] if ctx.block_types else FULL
        mask = masks.get(kind)
        cos, sin = ropes.get(kind if spec.rope_per_layer_type else FULL, (None, None))
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
