"""The fine-tuning methods as the forward scripts run them (pure): peft 0.21's LoRA, IA3, prefix and prompt
tuning, bitsandbytes' 4-bit matmul (QLoRA), and memprof's own bottleneck adapters (runtime/adapters.py).

Mirrors peft 0.21.2: tuners/lora/layer.py (``Linear.forward``), tuners/ia3/layer.py (``Linear.forward``),
tuners/prefix_tuning/model.py (``PrefixEncoder``), peft_model.py (``get_prompt``, prompt tuning's
``inputs_embeds``), transformers' cache_utils.py (``DynamicCache.update``), and bitsandbytes' ``MatMul4Bit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..config import LORA_FAMILY, AdapterVariant, IA3Spec, Method
from ..errors import UnsupportedModelError
from .hf_layers import input_embeddings
from .modules import Module, global_modules
from .params import (adalora_ranknum_trains, lora_family_tensors, modules_to_save, prefix_token_dim,
                     resolve_ia3_targets, resolve_ln_targets, resolve_lora_targets)
from .shapes import kv_tok, tok
from .sim import BYTES, WCOPY, P, T, promote, pscale

if TYPE_CHECKING:
    from .context import Ctx


def configure(ctx: Ctx) -> None:
    """What the method changes in the scripts: LoRA / IA3 targets, peft's modules_to_save, virtual tokens."""
    spec, setup = ctx.spec, ctx.setup
    method = setup.method
    if method in LORA_FAMILY:
        lora = setup.lora
        assert lora is not None
        chosen = resolve_lora_targets(spec, lora, method)
        if lora.dora and (method is Method.qlora or any(not m.is_linear for _, m in chosen)):
            raise UnsupportedModelError(
                "DoRA on " + ("QLoRA's 4-bit base (its weight is dequantized for the norms)" if method is Method.qlora
                              else "embedding targets") + " is not in memprof's analytic model; use --trace")
        ctx.lora = {name: lora.r * m.rank_scale for name, m in chosen}
        ctx.saved_modules = modules_to_save(spec, lora.modules_to_save)
    elif method is Method.ia3:
        ctx.ia3 = {name: ff for name, _, ff in resolve_ia3_targets(spec, setup.ia3 or IA3Spec())}
        ctx.saved_modules = modules_to_save(spec, None)
    elif method is Method.ln_tuning:
        ctx.saved_modules = modules_to_save(spec, None)
        ctx.ln_tuned = {name for name, _ in resolve_ln_targets(spec)}
    elif method in (Method.prefix, Method.prompt, Method.p_tuning):
        ctx.saved_modules = modules_to_save(spec, None)
        n = setup.prompt.num_virtual_tokens if setup.prompt else 20
        if method is not Method.prefix:
            ctx.extra_q = n
        else:
            ctx.extra_kv = n


def linear_4bit(ctx: Ctx, x: T, bias: T | None, m: Module, label: str) -> T:
    """bitsandbytes MatMul4Bit (frozen NF4 weight) on x in the compute dtype (the run's dtype):
    dequantize_4bit in the dtype the weight was stored from (the model's weight dtype), .to(x.dtype),
    matmul, free the copies; keep only the packed weight (a parameter) for backward, which dequantizes
    it again for the input gradient (transient weight-sized buffers then)."""
    g = ctx.g
    stored, n = ctx.wdt, m.weight_params
    wq = g.new(P(c=n), m.d_out, stored, label + " dequantized weight", WCOPY)
    extra = BYTES[stored] * n
    if stored != x.dtype:
        wc = g.new(P(c=n), m.d_out, x.dtype, label + " dequantized weight (cast)", WCOPY)
        g.drop(wq)
        wq = wc
        extra += BYTES[x.dtype] * n
    y = g.new(pscale(x.rows, m.d_out), m.d_out, x.dtype, label)
    g.custom("matmul_4bit", [x] + ([bias] if bias is not None else []), [y], [], extra=P(c=extra))
    g.drop(wq)
    return y

def lora(ctx: Ctx, x: T, y: T, r: int, m: Module, label: str) -> T:
    """peft lora.Linear.forward: result + B(A(dropout(x.to(A.dtype)))) * scaling, then .to(result dtype)."""
    g = ctx.g
    adt = ctx.adapter_dtype  # peft autocast_adapter_dtype: adapter weights fp32 on a half base
    a_w = g.param(r * m.d_in, r, adt, True, label + ".lora_A")
    b_w = g.param(m.d_out * r, m.d_out, adt, True, label + ".lora_B")
    xa = g.cast(x, adt, label + " lora input (fp32)")
    p = ctx.setup.lora.dropout if ctx.setup.lora else 0.0
    xd = g.dropout(xa, p, label + " lora dropout")
    xh = ctx.to_half(xd, label + " lora A")
    wa = ctx.weight_for_matmul(a_w, label + " lora A")
    a_out = g.linear(xh, a_w, r, label + " lora A out", w_used=wa, out_dtype=ctx.amp, x_saved=xd)
    g.drop(xh, wa, xd)
    ah = ctx.to_half(a_out, label + " lora B")
    wb = ctx.weight_for_matmul(b_w, label + " lora B")
    b_out = g.linear(ah, b_w, m.d_out, label + " lora B out", w_used=wb, out_dtype=ctx.amp, x_saved=a_out)
    g.drop(ah, wb, a_out)
    scaled = g.mul(b_out, None, label + " lora scaled")
    g.drop(b_out)
    dtype = "fp32" if "fp32" in (y.dtype, scaled.dtype) else y.dtype
    summed = g.add(y, scaled, label + " + lora", dtype=dtype)
    g.drop(y, scaled)
    out = g.cast(summed, y.dtype, label + " lora out")
    g.drop(summed)
    # peft rebinds ``x = self._cast_input_dtype(x, lora_A.weight.dtype)``: the fp32 copy of a half input lives
    # until forward returns (after the sum and its cast back), not only through lora_A
    g.drop(xa)
    return out

def dora(ctx: Ctx, x: T, y: T, r: int, m: Module, label: str, w: T, bias: T | None) -> T:
    """peft lora/variants.py DoraLinearVariant.forward and lora/dora.py DoraLinearLayer.forward (Liu et al. 2024):

        x = dropout(x.to(A.dtype)); base_result = result if no dropout else None
        lora_weight = B(A(eye(d_in))).T          # built with grad, used only detached: freed on return
        weight = W.to(x.dtype)
        norm = ||weight + scaling * lora_weight||_row, detached
        mns = magnitude / norm                    # keeps norm for magnitude's gradient
        lora_result = B(A(x))
        base_result = base_result - bias, or F.linear(x, weight) (keeps the weight copy for x's gradient)
        result + ((mns - 1) * base_result + mns * lora_result * scaling)
    """
    g = ctx.g
    adt = ctx.adapter_dtype  # peft autocast_adapter_dtype: adapter weights (and the magnitude) fp32 on a half base
    a_w = g.param(r * m.d_in, r, adt, True, label + ".lora_A")
    b_w = g.param(m.d_out * r, m.d_out, adt, True, label + ".lora_B")
    mag = g.param(m.d_out, m.d_out, adt, True, label + ".lora_magnitude_vector")
    xa = g.cast(x, adt, label + " dora input (fp32)")
    p = ctx.setup.lora.dropout if ctx.setup.lora else 0.0
    xd = g.dropout(xa, p, label + " dora dropout")
    # get_lora_weight: B(A(I)) under the current precision; only its detached value is used
    # the graph of this lora weight keeps A's input (the identity, or its autocast half copy) and B's input
    eye = g.new(P(c=m.d_in * m.d_in), m.d_in, adt, label + " dora eye")
    eye_h = ctx.to_half(eye, label + " dora eye")
    wa = ctx.weight_for_matmul(a_w, label + " lora A")
    ae = g.new(P(c=m.d_in * r), r, ctx.amp or adt, label + " dora A(I)")
    g.drop(wa)
    ae_h = ctx.to_half(ae, label + " dora A(I)")
    wb = ctx.weight_for_matmul(b_w, label + " lora B")
    lw = g.new(P(c=m.d_in * m.d_out), m.d_out, ctx.amp or adt, label + " dora lora weight")
    g.drop(ae_h, wb)
    g.drop(eye)  # get_lora_weight returns: its identity goes unless the graph holds it (no autocast)
    lw_x = g.cast(lw, xd.dtype, label + " dora lora weight (x dtype)")
    g.drop(lw)  # lora_weight = lora_weight.to(x.dtype): under autocast the half result goes
    weight = g.cast(w, xd.dtype, label + " dora base weight (x dtype)", fate=WCOPY)
    # get_weight_norm: weight + scaling * lora_weight, row norms (no graph: the lora weight is detached)
    scaled_w = g.new(P(c=m.d_in * m.d_out), m.d_in, xd.dtype, label + " dora scaling * lora weight")
    summed_w = g.new(P(c=m.d_in * m.d_out), m.d_in, xd.dtype, label + " dora weight + lora weight")
    g.drop(scaled_w)
    norm = g.new(P(c=m.d_out), m.d_out, xd.dtype, label + " dora weight norm")
    g.drop(summed_w)
    mns = g.mul(mag, norm, label + " dora magnitude / norm", dtype=promote(mag, norm))
    g.drop(norm)
    # lora_result = B(A(x))
    xh = ctx.to_half(xd, label + " lora A")
    wa = ctx.weight_for_matmul(a_w, label + " lora A")
    a_out = g.linear(xh, a_w, r, label + " lora A out", w_used=wa, out_dtype=ctx.amp)
    g.drop(xh, wa)
    ah = ctx.to_half(a_out, label + " lora B")
    wb = ctx.weight_for_matmul(b_w, label + " lora B")
    lora_out = g.linear(ah, b_w, m.d_out, label + " lora B out", w_used=wb, out_dtype=ctx.amp)
    g.drop(ah, wb, a_out)
    if p == 0:
        base = g.add(y, bias, label + " dora base - bias") if bias is not None else g.alias(y)
    else:
        xb = ctx.to_half(xd, label + " dora base")
        # autocast's half copy of the weight (of the parameter itself when x's dtype is the storage dtype)
        wq = ctx.weight_for_matmul(w, label + " dora base") if weight.st is w.st else ctx.to_half(weight, label)
        base = g.linear(xb, weight, m.d_out, label + " dora base result", w_used=wq, out_dtype=ctx.amp)
        g.drop(xb, wq)
    minus = g.add(mns, None, label + " dora scale - 1")
    t_base = g.mul(minus, base, label + " dora (scale - 1) * base")
    g.drop(minus)
    t_lora = g.mul(mns, lora_out, label + " dora scale * lora")
    t_scaled = g.mul(t_lora, None, label + " dora * scaling")
    g.drop(t_lora)
    dora_out = g.add(t_base, t_scaled, label + " dora result")
    g.drop(t_base, t_scaled)
    # DoraLinearLayer.forward returns: its locals (and the graph of the detached lora weight) go
    g.drop(eye_h, ae, lw_x, weight, mns, lora_out, base, xd)
    summed = g.add(y, dora_out, label + " + dora", dtype=promote(y, dora_out))
    g.drop(y, dora_out, xa)
    out = g.cast(summed, y.dtype, label + " lora out")
    g.drop(summed)
    return out


def bottleneck_adapter(ctx: Ctx, y: T, label: str) -> T:
    """memprof BottleneckAdapter: y + up(act(down(y.to(fp32)))).to(y.dtype)."""
    g = ctx.g
    ad = ctx.setup.adapter
    assert ad is not None
    h, r = ctx.spec.hidden_size, ad.bottleneck_size(ctx.spec.hidden_size)
    adt = ctx.adapter_dtype
    down_w = g.param(h * r, r, adt, True, label + ".down")
    down_b = g.param(r, r, adt, True, label + ".down.bias")
    up_w = g.param(r * h, h, adt, True, label + ".up")
    up_b = g.param(h, h, adt, True, label + ".up.bias")
    z = g.cast(y, adt, label + " adapter input (fp32)")
    zh = ctx.to_half(z, label + " down")
    wd = ctx.weight_for_matmul(down_w, label + " down")
    d = g.linear(zh, down_w, r, label + " adapter down", bias=down_b, w_used=wd, out_dtype=ctx.amp, x_saved=z)
    g.drop(zh, wd, z)
    a = g.unary(d, label + " adapter act", "output" if ad.activation == "relu" else "input")
    g.drop(d)
    ah = ctx.to_half(a, label + " up")
    wu = ctx.weight_for_matmul(up_w, label + " up")
    u = g.linear(ah, up_w, h, label + " adapter up", bias=up_b, w_used=wu, out_dtype=ctx.amp, x_saved=a)
    g.drop(ah, wu, a)
    uc = g.cast(u, y.dtype, label + " adapter out")
    g.drop(u)
    out = g.add(y, uc, label + " + adapter")
    g.drop(uc, y)
    return out


def ia3_scale_input(ctx: Ctx, x: T, full_name: str, m: Module, label: str) -> T:
    """peft ia3.Linear.forward, feedforward module: the input scaled, x.to(fp32) * l, back to x's dtype."""
    g = ctx.g
    lvec = g.param(m.d_in, m.d_in, ctx.adapter_dtype, True, full_name + ".ia3_l")
    x32 = g.cast(x, ctx.adapter_dtype, label + " ia3 input (fp32)")
    scaled = g.mul(x32, lvec, label + " ia3 scaled", dtype=ctx.adapter_dtype)
    g.drop(x32)
    x_in = g.cast(scaled, x.dtype, label + " ia3 scaled (cast back)")
    g.drop(scaled)
    return x_in


def ia3_scale_output(ctx: Ctx, y: T, full_name: str, m: Module, label: str) -> T:
    """peft ia3.Linear.forward, other targets: the output scaled, (y * l).to(y.dtype); consumes y."""
    g = ctx.g
    lvec = g.param(m.d_out, m.d_out, ctx.adapter_dtype, True, full_name + ".ia3_l")
    prod = g.mul(y, lvec, label + " ia3 scaled", dtype=ctx.adapter_dtype)
    g.drop(y)
    out = g.cast(prod, ctx.out_dtype, label + " ia3 out")
    g.drop(prod)
    return out


def adapter_after(ctx: Ctx, y: T, site: str, i: int) -> T:
    """memprof's bottleneck adapter at ``site`` (attn | ffn) of block i, if the method puts one there."""
    ad = ctx.setup.adapter
    if ctx.setup.method is not Method.adapter or ad is None:
        return y
    if site == "attn" and ad.variant is not AdapterVariant.houlsby:
        return y
    ctx.hooked_site()  # a forward hook on the site's module (runtime/adapters.py)
    return bottleneck_adapter(ctx, y, f"adapter ({site})")


def cache_update(ctx: Ctx, k: T, v: T, i: int, width: int) -> tuple[T, T]:
    """DynamicCache.update (transformers 5.23 cache_utils.py, DynamicLayer): ``torch.cat`` of the layer's cached
    keys/values (prefix tuning's prefix, else an empty tensor) with the new ones: new contiguous tensors that
    replace k and v for the attention."""
    g = ctx.g
    pk = ctx.prefix_kv[i] if ctx.extra_kv else None
    kk = g.cat([pk[0], k] if pk else [k], "keys with prefix" if pk else "keys (cache)")
    vv = g.cat([pk[1], v] if pk else [v], "values with prefix" if pk else "values (cache)")
    g.resize(kk, kv_tok(ctx, width))
    g.resize(vv, kv_tok(ctx, width))
    g.drop(k, v, *(pk or ()))
    # the cache keeps the concatenations (layer.keys/values) until the model's forward returns (past it when the
    # loop keeps the output, which holds the cache); where attention saves something else (autocast's half
    # copies, CPU SDPA's working copies) they outlive it
    for t in (kk, vv):
        ctx.kv_cache.append(g.alias(t))
        t.st.carried = True
    return kk, vv


def prefix_encoder(ctx: Ctx) -> None:
    """peft PrefixEncoder: embedding (b, p, L*2*token_dim) -> view/permute/split into per-layer (k, v)."""
    g, spec, setup = ctx.g, ctx.spec, ctx.setup
    n = ctx.extra_kv
    td = prefix_token_dim(spec)
    width = spec.num_layers * 2 * td
    w = g.param(n * width, width, "fp32", True, "prefix_encoder.embedding")
    pidx = g.new(P(b=n), 1, "int64", "prefix token ids")
    if setup.prompt and setup.prompt.projection:
        hidden = setup.prompt.projection_hidden or td
        e = g.embedding(pidx, g.param(n * td, td, "fp32", True, "prefix emb"), td, "fp32", "prefix tokens")
        g.resize(e, P(b=n * td))
        w1 = g.param(td * hidden, hidden, "fp32", True, "prefix mlp 1")
        h1 = g.linear(e, w1, hidden, "prefix mlp hidden")
        g.drop(e)
        th = g.unary(h1, "prefix tanh", "output")
        g.drop(h1)
        w2 = g.param(hidden * width, width, "fp32", True, "prefix mlp 2")
        pkv = g.linear(th, w2, width, "prefix key/values")
        g.drop(th)
    else:
        pkv = g.embedding(pidx, w, width, "fp32", "prefix key/values")
        g.resize(pkv, P(b=n * width))
    g.drop(pidx)
    # get_prompt: .to(base model dtype) once, then view/permute/split into per-layer (k, v) views; each layer's
    # DynamicCache.update concatenates its prefix with the new keys/values (a new tensor) and lets go of the
    # views: the whole prefix storage dies with the last layer's update (the last block, never the repeated
    # middle one), unless checkpointing keeps a block's inputs for its backward.
    if ctx.wdt != "fp32":
        cast = g.cast(pkv, ctx.wdt, "prefix key/values (cast)")
        g.drop(pkv)
        pkv = cast
    kvs = []
    for _ in range(ctx.layers or spec.num_layers):
        kvs.append((g.view(pkv, td, P(b=n * td)), g.view(pkv, td, P(b=n * td))))
    g.drop(pkv)
    ctx.prefix_kv = kvs


def _prompt_encoder_mlp(ctx: Ctx, e: T) -> T:
    """peft p_tuning/model.py PromptEncoder (MLP reparameterisation): Linear(h, e) ReLU Linear(e, e) ReLU
    Linear(e, h) over the batch's virtual-token embeddings (fp32 weights; autocast runs the matmuls in half)."""
    g, h = ctx.g, ctx.spec.hidden_size
    p = ctx.setup.prompt
    hidden = (p.projection_hidden if p else None) or h
    x = e
    for i, (d_in, d_out) in enumerate(((h, hidden), (hidden, hidden), (hidden, h))):
        w = g.param(d_in * d_out, d_out, "fp32", True, f"prompt_encoder.mlp_head.{2 * i}.weight")
        bias = g.param(d_out, d_out, "fp32", True, f"prompt_encoder.mlp_head.{2 * i}.bias")
        xh, wq = ctx.to_half(x, "prompt encoder"), ctx.weight_for_matmul(w, "prompt encoder")
        y = g.linear(xh, w, d_out, f"prompt encoder linear {i}", bias=bias, w_used=wq, out_dtype=ctx.amp)
        g.drop(xh, wq, x)
        if i < 2:
            a = g.unary(y, f"prompt encoder relu {i}", "output")
            g.drop(y)
            y = a
        x = y
    return x


def prompt_embeddings(ctx: Ctx, ids: T, tail: Callable[[Ctx, T], tuple[T, list[T]]]
                      ) -> tuple[T, list[T], list[T]]:
    """peft prompt tuning (PeftModel.forward): frozen word embeddings of the ids, the trainable virtual-token
    embeddings for the batch cast to the embedding dtype and concatenated in front (sequence s + p), then the
    base model's embedding path with ``inputs_embeds`` (``tail``: the family's, which takes ``x``). Returns the first block's input, the base model's held
    locals and PeftModel.forward's (inputs_embeds, prompts), which live until the loss is computed."""
    g, spec = ctx.g, ctx.spec
    n, h = ctx.extra_q, spec.hidden_size
    mods = {m.name: m for m in global_modules(spec)}
    name = next(m.name for m in global_modules(spec) if m.role == "embed")
    words = input_embeddings(ctx, ctx.embed(ids, name, mods[name], "word embeddings"))
    g.resize(words, P(bs=h))
    prompt_w = g.param(n * h, h, "fp32", True, "prompt_encoder.embedding")
    pidx = g.new(P(b=n), 1, "int64", "prompt token ids")
    prompts = g.embedding(pidx, prompt_w, h, "fp32", "prompt embeddings")
    g.resize(prompts, P(b=n * h))
    if ctx.setup.method is Method.p_tuning:
        prompts = _prompt_encoder_mlp(ctx, prompts)
    pc = g.cast(prompts, ctx.wdt, "prompt embeddings (cast)")
    g.drop(prompts)
    x = g.cat([pc, words], "prompt + word embeddings")
    g.resize(x, tok(ctx, h))
    g.drop(words)
    peft_held = [pc, pidx, g.alias(x)]
    out, held = tail(ctx, x)
    return out, held, peft_held


def _in_place_add(ctx: Ctx, y: T, delta: T) -> T:
    """``result += delta`` (AdaLoRA): no new storage; the delta's gradient is a cast copy when the dtypes differ."""
    ctx.g.custom("add_", [y, delta], [y], [], [False, delta.dtype != y.dtype])
    ctx.g.drop(delta)
    return y


def adalora(ctx: Ctx, x: T, y: T, r: int, m: Module, label: str) -> T:
    """peft adalora/layer.py SVDLinear.forward (Zhang et al. 2023):
    ``result += (dropout(x.to(A.dtype)) @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5)``."""
    g = ctx.g
    a_w = g.param(r * m.d_in, r, "fp32", True, label + ".lora_A")
    b_w = g.param(m.d_out * r, m.d_out, "fp32", True, label + ".lora_B")
    e_w = g.param(r, r, "fp32", True, label + ".lora_E")
    rank = g.param(1, 1, "fp32", adalora_ranknum_trains(ctx.setup), label + ".ranknum")
    ctx.adalora_factors.setdefault(ctx.block, []).extend([a_w, b_w])
    rank_eps = g.add(rank, None, label + " ranknum + 1e-5")
    xa = g.cast(x, "fp32", label + " adalora input (fp32)")
    xd = g.dropout(xa, ctx.setup.lora.dropout if ctx.setup.lora else 0.0, label + " adalora dropout")
    ae = g.mul(a_w, e_w, label + " A * E")  # (r, d_in): a new tensor, kept by the matmul for x's gradient
    xh, aeh = ctx.to_half(xd, label + " adalora A"), ctx.to_half(ae, label + " A * E")
    h1 = g.linear(xh, ae, r, label + " adalora x (A E)^T", w_used=aeh, out_dtype=ctx.amp)
    g.drop(xh, aeh, ae, xd, xa)
    h1h, wb = ctx.to_half(h1, label + " adalora B"), ctx.weight_for_matmul(b_w, label + " lora B")
    h2 = g.linear(h1h, b_w, m.d_out, label + " adalora B out", w_used=wb, out_dtype=ctx.amp)
    g.drop(h1h, wb, h1)
    h3 = g.mul(h2, None, label + " adalora * scaling")
    g.drop(h2)
    # a (1,)-shaped fp32 divisor is not a 0-dim scalar: a half product is promoted to fp32. DivBackward0 keeps
    # both operands when the divisor trains (on CUDA or a half base); after self's gradient, the divisor's,
    # -grad * ((self / other) / other) summed to (1,) by the engine after the call, holds three product-sized
    # tensors at once (derivatives.yaml; tests/analytic/test_sim_ops.py checks it on a real CPU step). Under
    # autocast self (half) gets its gradient cast down after the call: the fp32 one is made first.
    h4 = g.new(h3.numel, h3.width, promote(h3, rank_eps), label + " adalora / ranknum")
    three = pscale(h3.numel, 3 * BYTES[h4.dtype] + BYTES[h4.dtype] - BYTES[h3.dtype]) if rank_eps.rg else P()
    g.custom("div", [h3, rank_eps], [h4], [h3 if rank_eps.rg else None, rank_eps], [True, True], extra=three)
    g.drop(h3, rank_eps)
    return _in_place_add(ctx, y, h4)


def adalora_orthogonal_loss(ctx: Ctx, loss: T) -> T:
    """peft adalora/model.py AdaLoraModel.forward, after the model's loss: for every lora_A (P P^T) and lora_B
    (P^T P), ``torch.norm(cov - I, p="fro")`` summed into one scalar, averaged, scaled and added in place to the
    loss. Each norm keeps its r x r input and its result for backward, and the covariances hand every factor its
    first gradient at the start of the backward; each block's own backward then adds to it.

    The blocks a shallower replay does not run get stand-in factors (Graph.stand_in, the shapes of a replayed
    block's), so the loss covers the whole model and the composed copies of the middle block find their pending
    gradients."""
    g, lora = ctx.g, ctx.setup.lora
    assert lora is not None
    r = lora.r
    factors = [p for block in ctx.adalora_factors.values() for p in block]
    blocks = [i for i in ctx.adalora_factors if i is not None]
    missing = ctx.spec.num_layers - (ctx.layers or ctx.spec.num_layers)
    if blocks and missing > 0:
        model = ctx.adalora_factors[blocks[len(blocks) // 2]]
        factors += [g.stand_in(p.numel[4], p.width, p.dtype, "stand-in " + p.label) for _ in range(missing) for p in model]
    total = None
    for p in factors:
        cov = g.new(P(c=r * r), r, "fp32", p.label + " covariance")
        g.custom("mm", [p, g.view(p)], [cov], [])
        eye = g.new(P(c=r * r), r, "fp32", "identity")
        diff = g.add(cov, eye, "covariance - I")
        g.drop(cov, eye)
        nrm = g.new(P(c=1), 1, "fp32", "frobenius norm")
        g.custom("norm", [diff], [nrm], [diff, nrm])
        g.drop(diff)
        if total is None:
            total = g.add(nrm, None, "regularisation sum")  # 0 + norm: a new tensor, then += in place
        else:
            _in_place_add(ctx, total, g.alias(nrm))
        g.drop(nrm)
    if total is None:
        return loss
    mean = g.mul(total, None, "regularisation / count")
    weighted = g.mul(mean, None, "orth_reg_weight * regularisation")
    g.drop(total, mean)
    return _in_place_add(ctx, loss, weighted)


def vera(ctx: Ctx, x: T, y: T, r: int, m: Module, label: str) -> T:
    """peft vera/layer.py Linear.forward (Kopiczko et al. 2024), with shared frozen vera_A / vera_B sliced to the
    layer: ``result + lambda_b * F.linear(lambda_d * F.linear(dropout(x.to(fp32)), A), B)``, back to the
    result's dtype."""
    g = ctx.g
    lam_b = g.param(m.d_out, m.d_out, "fp32", True, label + ".vera_lambda_b")
    lam_d = g.param(r, r, "fp32", True, label + ".vera_lambda_d")
    va = g.param(r * m.d_in, r, "fp32", False, label + " vera_A slice")   # views of the shared buffers
    vb = g.param(m.d_out * r, m.d_out, "fp32", False, label + " vera_B slice")
    xa = g.cast(x, "fp32", label + " vera input (fp32)")
    xd = g.dropout(xa, ctx.setup.lora.dropout if ctx.setup.lora else 0.0, label + " vera dropout")
    # autocast casts the buffer slices at every use (not leaves that train: never cached); copies of buffers,
    # not of weights, as a tracker sees them
    xh, wa = ctx.to_half(xd, label + " vera A"), ctx.to_half(va, label + " vera_A slice")
    h1 = g.linear(xh, va, r, label + " vera A out", w_used=wa, out_dtype=ctx.amp)
    g.drop(xh, wa, xd, xa)
    h2 = g.mul(lam_d, h1, label + " vera lambda_d *", dtype=promote(lam_d, h1))
    g.drop(h1)
    hh, wb = ctx.to_half(h2, label + " vera B"), ctx.to_half(vb, label + " vera_B slice")
    h3 = g.linear(hh, vb, m.d_out, label + " vera B out", w_used=wb, out_dtype=ctx.amp)
    g.drop(hh, wb, h2)
    h4 = g.mul(lam_b, h3, label + " vera lambda_b *", dtype=promote(lam_b, h3))
    g.drop(h3)
    summed = g.add(y, h4, label + " + vera", dtype=promote(y, h4))
    g.drop(y, h4)
    # result.to(orig_dtype), then .to(previous_dtype): x's dtype, which under autocast is fp32 where the base
    # matmul gave half (the next op then keeps an fp32 tensor)
    back = g.cast(summed, y.dtype, label + " vera out")
    g.drop(summed)
    out = g.cast(back, x.dtype, label + " vera out (input dtype)")
    g.drop(back)
    return out


def lycoris(ctx: Ctx, x: T, y: T, r: int, m: Module, label: str) -> T:
    """peft loha/layer.py and lokr/layer.py (LyCORIS): the delta weight is built in every forward and applied
    as a second matmul, ``result + F.linear(x.to(delta.dtype), delta)``, then back to x's dtype.

    LoHa: ``HadaWeight`` (an autograd.Function: no graph inside) computes ((w1a @ w1b) * (w2a @ w2b)) * scale, in
    the autocast dtype under autocast, keeping only its four factors; its backward makes up to four
    weight-sized temporaries. LoKr: ``torch.kron(w1, w2) * scale`` in fp32 (kron is a broadcast multiply: both
    factors' gradients are weight-sized until reduced). The delta is kept for x's gradient wherever x needs one.
    """
    g, method, lora = ctx.g, ctx.setup.method, ctx.setup.lora
    assert lora is not None
    n = m.d_in * m.d_out
    shapes = lora_family_tensors(method, m, lora)
    factors = [g.param(rows * cols, rows, "fp32", True, f"{label} factor {i}") for i, (rows, cols) in enumerate(shapes)]
    if method is Method.loha:
        dt = ctx.amp or "fp32"
        p1 = g.new(P(c=n), m.d_in, dt, label + " loha w1a @ w1b")
        p2 = g.new(P(c=n), m.d_in, dt, label + " loha w2a @ w2b")
        prod = g.new(P(c=n), m.d_in, dt, label + " loha product")
        g.drop(p1, p2)
        delta = g.new(P(c=n), m.d_in, dt, label + " loha delta weight")
        g.drop(prod)
        # backward: grad * scale, then temp = grad * (w2a @ w2b) and temp = grad * (w1a @ w1b) with the old temp
        # still bound while the new one is made (torch/autograd.Function runs without autocast: fp32 products)
        g.custom("HadaWeight", factors, [delta], [], extra=P(c=n * (BYTES[dt] + 12)))
    else:
        w1, rest = factors[0], factors[1:]
        if len(rest) == 2:  # w2 = w2_a @ w2_b
            (b, _), (_, d) = shapes[1], shapes[2]
            w2 = g.new(P(c=b * d), b, "fp32", label + " lokr w2")
            g.custom("mm", rest, [w2], rest)
        else:
            w2 = g.alias(rest[0])
        kron = g.new(P(c=n), m.d_in, "fp32", label + " lokr kron")
        # torch.kron is a broadcast multiply: MulBackward0 returns both factors' gradients at the product's size,
        # summed down one after the other after the call: the peak holds both and w1's reduced one, not w2's
        # (tests/analytic/test_sim_ops.py checks it on a real CPU step)
        g.custom("kron", [w1, w2], [kron], [w1, w2], extra=P(c=2 * n * 4 - 4 * w2.numel[4]))
        g.drop(w2)
        delta = g.mul(kron, None, label + " lokr delta weight")
        g.drop(kron)
    xi = g.cast(x, delta.dtype, label + " input (delta dtype)")
    xh, dh = ctx.to_half(xi, label + " delta"), ctx.to_half(delta, label + " delta weight")
    out = g.linear(xh, delta, m.d_out, label + " delta out", w_used=dh, out_dtype=ctx.amp)
    g.drop(xh, dh, delta, xi)
    summed = g.add(y, out, label + " + delta", dtype=promote(y, out))
    g.drop(y, out)
    back = g.cast(summed, x.dtype, label + " delta out")
    g.drop(summed)
    return back


# what the forward runs at each target of a LoRA-like method (DoRA: ``dora``, with the base weight and bias)
LORA_LIKE = {Method.lora: lora, Method.qlora: lora, Method.adalora: adalora, Method.vera: vera, Method.loha: lycoris,
             Method.lokr: lycoris}
