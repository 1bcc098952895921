"""Tensor sizes the forward scripts share: per-token and per-score element counts as polynomials in b, s.

Per-token tensors are k*b*(s+p) elements (p: prompt-tuning virtual tokens prepended to the sequence);
attention scores are heads*b*s_q*s_k with key positions extended by prefix-tuning's prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .sim import P

if TYPE_CHECKING:
    from .context import Ctx

HALF = {"bf16", "fp16"}


def tok(ctx: Ctx, k: float) -> tuple:
    """k elements per token of the (possibly prompt-extended) sequence: k*b*(s+p)."""
    return P(bs=k, b=k * ctx.extra_q)


def scores(ctx: Ctx, heads: int) -> tuple:
    """heads*b*sq*sk with sq = s+p_q, sk = s+p_q+p_kv."""
    pq, pk = ctx.extra_q, ctx.extra_q + ctx.extra_kv
    # b*(s+pq)*(s+pk) = b*s^2 + (pq+pk)*b*s + pq*pk*b
    return P(bss=heads, bs=heads * (pq + pk), b=heads * pq * pk)


def batch_mask(ctx: Ctx) -> tuple:
    """sq*sk elements: a mask that is the same for every row, which masking_utils' sdpa_mask builds once and
    expands over the batch (stride 0; no padding mask to fold in)."""
    pq, pk = ctx.extra_q, ctx.extra_q + ctx.extra_kv
    return P(ss=1, s=pq + pk, c=pq * pk)


def kv_tok(ctx: Ctx, k: float) -> tuple:
    """k elements per key position: k*b*(s+p_q+p_kv)."""
    return P(bs=k, b=k * (ctx.extra_q + ctx.extra_kv))
