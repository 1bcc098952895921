"""The sparse mixture-of-experts block of Mixtral-style decoders, op by op (pure): the router (a bare (E, h)
weight: logits, fp32 softmax, top-k, the top-k weights renormalised in place) and the fused experts run by
transformers' default experts implementation in training, ``grouped_mm`` (integrations/moe.py
``grouped_mm_experts_forward``): tokens sorted by expert, gathered (tokens * top_k, h), one grouped matmul for
gate_up_proj and one for down_proj over all experts, weighted, un-permuted, summed over the top-k slots.

Routing assumption: none is needed. The loop implementation ("eager") sizes each expert's batch by its hits (data
dependent), but grouped_mm's tensors are sized by tokens * top_k whatever the routing (the per-expert split is
only the ``offs`` boundaries), so the model is exact for any routing. No capacity limit, no token dropping
(dropless, as transformers runs it); router jitter and the router aux loss (output_router_logits) are refused
by spec.py.

Mirrors transformers 5.23.0 models/mixtral/modeling_mixtral.py (MixtralTopKRouter, MixtralSparseMoeBlock,
MixtralExperts under ``@use_experts_implementation``) and integrations/moe.py; peft 0.21's ParamWrapper
(tuners/lora/layer.py: ``_LoraFactorsProxy``, a baddbmm of the expert stack and the LoRA factors cached for the
forward) for LoRA on the experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..modules import Module
from ..hf_layers import activation
from ..shapes import tok
from ..sim import WCOPY, P, T, pscale

if TYPE_CHECKING:
    from ..context import Ctx


def _inplace(ctx: Ctx, t: T, label: str) -> T:
    """The result of an in-place op on ``t``: the same storage under a new autograd identity."""
    t.st.refs += 1
    return T(t.numel, t.width, t.dtype, t.rg, t.st, None, label)


def _part(t: T, numel: tuple, width: int, label: str) -> T:
    """One output of a multi-output view op (chunk, split): t's storage, its own autograd identity."""
    t.st.refs += 1
    return T(numel, width, t.dtype, t.rg, t.st, None, label)


def _router_lora_logits(ctx: Ctx, x: T, full: str, m: Module) -> T:
    """F.linear(x, weight) with the router's 2-D weight under peft's ParamWrapper (num_experts 1:
    _LoraParameterProxy): delta = (B @ A) * scaling (fp32 adapters; lora.Linear.get_delta_weight) cast to the
    weight's dtype, held by the proxy while the router runs; the forward reads W + delta (cached)."""
    g = ctx.g
    w = ctx.param(full, m)
    r = ctx.lora[full]
    a = g.param(r * m.d_in, m.d_in, "fp32", True, full + ".lora_A")
    b = g.param(m.d_out * r, r, "fp32", True, full + ".lora_B")
    ba = g.new(P(c=m.weight_params), m.d_in, "fp32", full + " B @ A")
    g.custom("mm", [b, a], [ba], [a, b])
    scaled = g.mul(ba, None, full + " delta")
    g.drop(ba)
    delta = g.cast(scaled, w.dtype, full + " delta (weight dtype)")
    g.drop(scaled)
    merged = g.add(w, delta, full + " W + delta (cached)", dtype=w.dtype)
    wq = g.cast(merged, ctx.amp, full + " W + delta (autocast copy)") if ctx.amp else g.alias(merged)
    xh = ctx.to_half(x, "router logits")
    logits = g.linear(xh, merged, m.d_out, "router logits", w_used=wq, out_dtype=ctx.amp)
    g.drop(xh, wq, merged, delta)
    return logits


def _router(ctx: Ctx, x: T, pre: str, m: Module) -> tuple[T, T, T]:
    """MixtralTopKRouter (Qwen2MoeTopKRouter, OlmoeTopKRouter): (router_logits, top-k weights, top-k indices).
    The weights stay fp32 (Mixtral) or go back to the logits' dtype; renormalised in place when norm_topk_prob."""
    g, spec = ctx.g, ctx.spec
    k = spec.experts_per_tok
    if pre + "mlp.gate" in ctx.lora:
        logits = _router_lora_logits(ctx, x, pre + "mlp.gate", m)
    else:
        logits = ctx.linear(x, pre + "mlp.gate", m, "router logits")
    # Mixtral: softmax(logits.float()); Qwen2-MoE, OLMoE: softmax(logits, dtype=torch.float), the same copy
    f32 = ctx.g.cast(logits, "fp32", "router logits (fp32)")
    probs = g.unary(f32, "router softmax", "output")
    g.drop(f32)
    values = g.new(tok(ctx, k), k, "fp32", "router top-k values")
    index = g.new(tok(ctx, k), k, "int64", "router top-k indices")
    # TopkBackward0 keeps the indices and scatters the values' gradient into a zeros (tokens, E) tensor
    g.custom("topk", [probs], [values], [index])
    g.drop(probs)
    if not spec.norm_topk_prob:
        scores = values
    else:
        total = g.unary(values, "router top-k sum", "none", width=1)
        # values /= total in place: DivBackward0 keeps the divisor and, for the divisor's gradient, the original
        # values (autograd's original_self clone of an in-place op)
        original = g.new(values.numel, k, "fp32", "router top-k values (saved original)") if total.rg else None
        scores = _inplace(ctx, values, "router scores")
        g.custom("div_", [values, total], [scores], [total if values.rg else None, original])
        g.drop(original, values, total)
    if spec.model_type != "mixtral":  # router_top_value.to(router_logits.dtype)
        cast = g.cast(scores, logits.dtype, "router scores (logits dtype)")
        g.drop(scores)
        scores = cast
    return logits, scores, index


def _expert_weight(ctx: Ctx, pre: str, m: Module, name: str) -> tuple[T, list[T]]:
    """The expert stack the grouped matmul reads: the parameter, or under LoRA (peft ParamWrapper,
    _LoraFactorsProxy) ``baddbmm(W, B_e, A_e, alpha=scaling)``, a new tensor of the stack's size made at first
    access and cached (torch.nn.utils.parametrize.cached) until the wrapper returns. Returns (weight, held)."""
    g = ctx.g
    full = pre + name
    w = ctx.param(full, m)
    r = ctx.lora.get(full)
    if not r:
        return g.view(w), []
    rr = r * m.count  # ctx.lora holds the rank peft gives this target (rank_scale applied)
    a = g.param(rr * m.d_in, m.d_in, "fp32", True, full + ".lora_A")
    b = g.param(m.d_out * rr, rr, "fp32", True, full + ".lora_B")
    lhs = g.cast(g.view(b), w.dtype, full + " lora_B (weight dtype)", fate=WCOPY)
    rhs = g.cast(g.view(a), w.dtype, full + " lora_A (weight dtype)", fate=WCOPY)
    merged = g.new(P(c=m.weight_params), m.d_in, w.dtype, full + " W + B A (cached)")
    g.custom("baddbmm", [w, lhs, rhs], [merged], [lhs, rhs], [True, True, True])
    return g.view(merged), [merged, lhs, rhs]


def _grouped_linear(ctx: Ctx, x: T, w: T, offsets: T, d_out: int, label: str) -> T:
    """_grouped_mm(input.to(weight.dtype), weight.transpose(-2, -1), offs): (tokens * top_k, d_out); autograd
    keeps the input for the weight's gradient and the weight for the input's."""
    g = ctx.g
    xin = g.cast(x, w.dtype, label + " input (weight dtype)")
    out = g.new(pscale(x.rows, d_out), d_out, w.dtype, label)
    g.custom("grouped_mm", [xin, w], [out], [xin if w.rg else None, w if xin.rg else None, offsets])
    g.drop(xin)
    return out


def _shared_expert(ctx: Ctx, x: T, pre: str, mods: dict[str, Module]) -> T:
    """Qwen2MoeMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x))."""
    g = ctx.g

    def lin(t: T, name: str) -> T:
        return ctx.linear(t, pre + name, mods[name], name)

    gate = lin(x, "mlp.shared_expert.gate_proj")
    act = activation(ctx, gate, "shared expert act")
    g.drop(gate)
    up = lin(x, "mlp.shared_expert.up_proj")
    prod = g.mul(act, up, "shared expert act * up")
    g.drop(act, up)
    down = lin(prod, "mlp.shared_expert.down_proj")
    g.drop(prod)
    return down


def moe_block(ctx: Ctx, x: T, pre: str, mods: dict[str, Module]) -> T:
    """MixtralSparseMoeBlock / OlmoeSparseMoeBlock / Qwen2MoeSparseMoeBlock.forward on the normed hidden states
    ``x`` (borrowed): the block's output. Qwen2-MoE runs its shared expert first and adds
    sigmoid(shared_expert_gate(x)) * shared to the experts' output."""
    g, spec = ctx.g, ctx.spec
    h, k, mi = spec.hidden_size, spec.experts_per_tok, spec.moe_intermediate_size
    flat = g.view(x)
    shared = _shared_expert(ctx, flat, pre, mods) if spec.shared_expert_size else None
    logits, weights, index = _router(ctx, flat, pre, mods["mlp.gate"])
    # grouped_mm_experts_forward: sort the (token, slot) pairs by expert, gather their hidden states
    ids_sorted, perm = g.new(tok(ctx, k), 1, "int64", "sorted expert ids"), g.new(tok(ctx, k), 1, "int64", "perm")
    token_of = g.new(tok(ctx, k), 1, "int64", "perm // top_k")
    gathered = g.new(tok(ctx, k * h), h, flat.dtype, "gathered hidden states")
    g.custom("index", [flat], [gathered], [token_of])   # IndexBackward0: index_put_ into zeros (tokens, h)
    g.drop(token_of)
    sw = g.new(tok(ctx, k), 1, weights.dtype, "sorted routing weights")
    g.custom("index", [weights], [sw], [perm])
    hist_in = g.new(tok(ctx, k), 1, "fp32", "histc input")  # .float() on CPU, .int() on CUDA: 4 bytes either way
    counts = g.new(P(c=spec.num_experts), 1, "fp32", "tokens per expert")
    offsets = g.new(P(c=spec.num_experts), 1, "fp32", "offsets (int32)")
    w_gu, held_gu = _expert_weight(ctx, pre, mods["mlp.experts.gate_up_proj"], "mlp.experts.gate_up_proj")
    gu = _grouped_linear(ctx, gathered, w_gu, offsets, 2 * mi, "experts gate_up")
    # _default_apply_gate: gate_up_out.chunk(2, dim=-1), two views whose gradients SplitBackward0 cats
    gate, up = _part(gu, tok(ctx, k * mi), mi, "experts gate"), _part(gu, tok(ctx, k * mi), mi, "experts up")
    g.custom("chunk", [gu], [gate, up], [])
    g.drop(gu)
    act = activation(ctx, gate, "experts act")
    prod = g.mul(act, up, "experts act * up")
    g.drop(act, up, gate)
    w_d, held_d = _expert_weight(ctx, pre, mods["mlp.experts.down_proj"], "mlp.experts.down_proj")
    down = _grouped_linear(ctx, prod, w_d, offsets, h, "experts down")
    g.drop(prod)
    sw_col = g.view(sw, 1)
    weighted = g.mul(down, sw_col, "experts weighted")
    g.drop(down, sw_col)
    inv = g.new(tok(ctx, k), 1, "int64", "inverse perm")
    ar = g.new(tok(ctx, k), 1, "int64", "arange")
    g.drop(ar)
    unperm = g.new(weighted.numel, h, weighted.dtype, "experts output (token order)")
    g.custom("index", [weighted], [unperm], [inv])
    g.drop(weighted)
    summed = g.new(tok(ctx, h), h, unperm.dtype, "experts output (summed over top-k)")
    g.custom("sum", [unperm], [summed], [], [False])  # SumBackward0: the gradient expanded (a view)
    out = g.cast(summed, flat.dtype, "experts output")
    g.drop(summed)
    # the experts' locals die as grouped_mm_experts_forward returns, the parametrization cache as the
    # ParamWrapper returns, the router logits and indices as the block's forward returns
    g.drop(ids_sorted, perm, gathered, sw, hist_in, counts, offsets, inv, unperm, w_gu, w_d, *held_gu, *held_d)
    if shared is not None:
        gl = ctx.linear(flat, pre + "mlp.shared_expert_gate", mods["mlp.shared_expert_gate"], "shared expert gate")
        sig = g.unary(gl, "shared expert gate sigmoid", "output")
        g.drop(gl)
        scaled = g.mul(sig, shared, "shared expert output")
        g.drop(sig, shared)
        total = g.add(out, scaled, "experts + shared expert")
        g.drop(out, scaled)
        out = total
    g.drop(logits, weights, index, flat)
    return out
