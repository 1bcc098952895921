"""The attention op as transformers dispatches it (pure): ``sdpa_attention_forward`` and
``eager_attention_forward`` on q, k, v, with what each kernel keeps for backward.

Mirrors transformers 5.23 integrations/sdpa_attention.py (``repeat_kv``, ``use_gqa_in_sdpa``, the bool mask
handed to SDPA), models/llama/modeling_llama.py ``eager_attention_forward``, and torch 2.13's
``scaled_dot_product_attention``: the flash / memory-efficient kernels (CUDA; the CPU flash kernel without
dropout) and ``_scaled_dot_product_attention_math`` (aten/src/ATen/native/transformers/attention.cpp).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import AttnImpl, Device
from ..spec import Family
from .shapes import HALF, kv_tok, scores, tok
from .sim import T, pscale

if TYPE_CHECKING:
    from .context import Ctx


def attention_core(ctx: Ctx, q: T, k: T, v: T, heads: int, kv_heads: int, d: int, dropout_p: float,
                   causal: bool, mask: T | None, label: str, q_contiguous: bool = False) -> tuple[T, T | None]:
    """The attention interface (sdpa_attention_forward / eager_attention_forward) on q (b,a,s,d) and k/v
    (b,kv,s,d). Borrows q, k, v (the caller's locals keep them); returns the (b, s, a*d) output the output
    projection reads, and the attention weights eager returns (the layers keep them in ``_`` until they
    return). ``q_contiguous``: q is laid out as (b, a, s, d) (a torch.cat made it), not as a transposed view."""
    g = ctx.g
    impl = ctx.setup.attn_impl
    cuda = ctx.setup.device is Device.cuda
    kernel = impl is AttnImpl.sdpa and (cuda or dropout_p == 0)  # flash / memory-efficient, not math
    # transformers' repeat_kv runs in the model's dtype before the attention op, so autocast casts the repeated
    # tensors: eager always repeats; SDPA repeats when a mask rules out native GQA (use_gqa_in_sdpa)
    kr, vr, repeated_copy = g.alias(k), g.alias(v), False
    repeated = kv_heads != heads and (impl is AttnImpl.eager or mask is not None)
    if repeated:
        kr, vr, repeated_copy = _repeat_kv(ctx, kr, vr, kv_heads, heads * d, label)
    qh, kh, vh = ctx.to_half(q, label + " q"), ctx.to_half(kr, label + " k"), ctx.to_half(vr, label + " v")
    g.drop(kr, vr)
    own_mask = mask is not None and impl is AttnImpl.sdpa
    if own_mask:
        # transformers hands SDPA a bool mask; aten::scaled_dot_product_attention converts it to the query's
        # dtype at every call (convert_boolean_attn_mask: where(mask, 0, -inf)) and the kernels keep that one
        mask = g.new(scores(ctx, 1), 1, qh.dtype, label + " mask (as float)")
    if kernel:
        # flash / mem-efficient (CUDA) or the CPU flash kernel: keep q, k, v, out and a (b, a, s) fp32 lse
        # (GQA without a mask runs natively: enable_gqa)
        out = g.new(tok(ctx, heads * d), heads * d, qh.dtype, label + " sdpa out")
        lse = g.new(tok(ctx, heads), heads, "fp32", label + " logsumexp")
        g.custom("sdpa", [qh, kh, vh], [out], [qh, kh, vh, out, lse, mask], extra=pscale(tok(ctx, heads * d), 4))
        g.drop(lse, qh, kh, vh, mask if own_mask else None)
        # CUDA's memory-efficient kernel (fp32, or a mask) writes (b, s, a, d), so transformers'
        # transpose(1, 2).contiguous() is free; flash (CUDA half precision, and the CPU kernel) allocates its
        # output like q (empty_like), which is a copy away from (b, s, a, d) when q is laid out (b, a, s, d)
        if q_contiguous and (not cuda or (qh.dtype in HALF and mask is None)):
            ctx_out = g.copy(out, label + " context (contiguous copy)")
            g.drop(out)
            return ctx_out, None
        return out, None
    # eager, and SDPA's math fallback on CPU (dropout > 0), which computes in fp32 for half inputs
    # torch.matmul folds (b, a) into one batch dim: a copy for the projections' transposed (b, s, a, d)
    # views, a view for contiguous (b, a, s, d) keys/values: DynamicCache's torch.cat (prefix tuning),
    # repeat_kv's reshape copy (GQA) and a cast of its stride-0 view (MQA) produce those (a .to(fp32) or a
    # scaling keeps the strides it is given). With a batch of one any (1, a, s, d) layout folds as a view.
    batch_of_one = ctx.setup.batch_size == 1   # compose.structural keeps this bit of b
    if not repeated:
        contiguous_k = contiguous_v = ctx.kv_cat
    elif repeated_copy:
        contiguous_k = contiguous_v = True
    else:  # MQA's stride-0 view folds only once a cast (autocast) has materialised it
        contiguous_k, contiguous_v = kh.dtype != k.dtype, vh.dtype != v.dtype
    contiguous_k, contiguous_v = contiguous_k or batch_of_one, contiguous_v or batch_of_one
    math = impl is AttnImpl.sdpa    # at::_scaled_dot_product_attention_math
    math_cpu = math and qh.dtype in HALF
    kernel_locals: list[T] = []     # C++ locals of the math kernel: alive until it returns
    if math_cpu:                    # half inputs on CPU: computed in fp32 copies
        q32, k32, v32 = (g.cast(t, "fp32", label + " (math fp32)") for t in (qh, kh, vh))
        g.drop(qh, kh, vh)
        qh, kh, vh = q32, k32, g.alias(v32)
        kernel_locals += [g.alias(q32), g.alias(k32), v32]
    if math and kv_heads != heads and not repeated:  # enable_gqa: the kernel's repeat_interleave copies
        ke, ve = _repeated_copies(ctx, kh, vh, heads * d, label)
        kh, vh = g.alias(ke), g.alias(ve)
        kernel_locals += [ke, ve]
        contiguous_k = contiguous_v = True
    if math:  # q and k^T scaled by sqrt(scale) before the matmul: new tensors in the layouts they came in
        qs, ks = g.mul(qh, None, label + " q * sqrt(scale)"), g.mul(kh, None, label + " k^T * sqrt(scale)")
        g.drop(qh, kh)
        qh, kh = g.alias(qs), ks
        kernel_locals.append(qs)
    qc = g.alias(qh) if batch_of_one else g.copy(qh, label + " q (bmm copy)")
    kc = g.alias(kh) if contiguous_k else g.copy(kh, label + " k^T (bmm copy)")
    g.drop(qh, kh)
    sc = g.bmm(qc, kc, scores(ctx, heads), 1, label + " scores")
    g.drop(qc, kc)
    scaled = g.alias(sc) if math else g.mul(sc, None, label + " scaled scores")
    g.drop(sc)
    if ctx.spec.attn_softcap:
        t1 = g.mul(scaled, None, label + " /softcap")
        g.drop(scaled)
        t2 = g.unary(t1, label + " tanh", "output")
        g.drop(t1)
        scaled = g.mul(t2, None, label + " *softcap")
        g.drop(t2)
    if mask is not None:
        # the math kernel adds in place (attn.add_) unless a tensor is subclass-like, which every tensor is
        # under a dispatch mode (a tracked run): the same switch as gradient accumulation
        masked = g.alias(scaled) if math and g.inplace_accumulation else g.add(scaled, mask, label + " masked scores")
        g.drop(scaled, mask if own_mask else None)
        scaled = masked
    llama_like = ctx.spec.family is Family.llama
    if not llama_like:
        sin = ctx.to_fp32(scaled, label + " softmax")
    elif scaled.dtype in HALF and not (cuda and scaled.dtype == "fp16"):
        # softmax(x, dtype=float32) (aten/src/ATen/native/SoftMax.cpp, softmax): only a CUDA fp16 input goes to
        # _softmax(x, half_to_float=True); bf16, and every CPU input, runs input.toType(float32) first, and its
        # backward casts the fp32 gradient back down
        sin = g.cast(scaled, "fp32", label + " scores (fp32 for softmax)")
    else:
        sin = g.alias(scaled)
    probs = g.unary(sin, label + " softmax", "output", dtype="fp32" if llama_like else sin.dtype)
    g.drop(sin, scaled)
    if probs.dtype != vh.dtype and ctx.spec.family is not Family.bert:
        # LLaMA: softmax(..., dtype=float32).to(query.dtype); GPT-2: attn_weights.type(value.dtype)
        pc = g.cast(probs, vh.dtype, label + " probs (cast)")
        g.drop(probs)
        probs = pc
    pd = g.dropout(probs, dropout_p, label + " attention dropout")
    g.drop(probs)
    # inside SDPA's math kernel autocast is off: the fp32 probabilities meet the fp32 values
    ph = g.alias(pd) if math_cpu else ctx.to_half(pd, label + " probs")
    vc = g.alias(vh) if contiguous_v else g.copy(vh, label + " v (bmm copy)")
    g.drop(vh)
    out = g.bmm(ph, vc, tok(ctx, heads * d), heads * d, label + " attention out")
    g.drop(ph, vc)
    if math_cpu:  # return (matmul(attn, v).to(half), attn.to(half)); the composite drops the second
        down = g.cast(out, q.dtype, label + " attention out (cast back)")
        g.drop(g.cast(pd, q.dtype, label + " probs (returned, unused)"), out)
        out = down
    g.drop(*kernel_locals)
    ctx_out = g.copy(out, label + " context")          # attn_output.transpose(1, 2).contiguous()
    g.drop(out)
    return ctx_out, pd


def _repeat_kv(ctx: Ctx, k: T, v: T, kv_heads: int, width: int, label: str) -> tuple[T, T, bool]:
    """transformers' repeat_kv: expand (b, kv, 1, s, d) to (b, kv, n, s, d), reshape to (b, kv*n, s, d). A copy
    (contiguous) for GQA; for MQA (kv = 1) the reshape merges a size-1 dim and stays a stride-0 view of k/v.
    Returns the repeated k, v and whether they are new contiguous tensors."""
    g = ctx.g
    if kv_heads == 1:
        numel = kv_tok(ctx, width)
        kr, vr = g.view(k, None, numel), g.view(v, None, numel)
        g.drop(k, v)
        return kr, vr, False
    return (*_repeated_copies(ctx, k, v, width, label), True)


def _repeated_copies(ctx: Ctx, k: T, v: T, width: int, label: str) -> tuple[T, T]:
    """k and v copied to every head (``width`` = heads * d per key position); consumes k and v."""
    g = ctx.g
    kr, vr = g.copy(k, label + " k repeated"), g.copy(v, label + " v repeated")
    g.resize(kr, kv_tok(ctx, width))
    g.resize(vr, kv_tok(ctx, width))
    g.drop(k, v)
    return kr, vr
