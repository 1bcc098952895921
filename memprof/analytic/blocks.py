"""Forward scripts of each family, op by op, as transformers 5 / peft 0.21 run them (pure).

Each script drives a ``sim.Graph``: ops keep what autograd keeps, handles are dropped where the Python code
drops its references. The scripts follow, in order: BertEmbeddings/BertLayer/BertPooler (+ RoBERTa's position
ids and classification head), GPT2Model/GPT2Block/NewGELUActivation, LlamaModel/LlamaDecoderLayer/
LlamaRMSNorm/apply_rotary_pos_emb (+ Qwen2 biases, Qwen3 q/k norms, Gemma's scaled embeddings and
(1 + w) norms, Gemma2 sandwich norms and soft-capping, Phi-3 fused projections), the task heads and
``ForCausalLMLoss``; and the method wrappers: peft ``lora.Linear.forward`` (input cast to the fp32 adapter
dtype, dropout, A, B, scale, add, cast back), peft ``ia3.Linear.forward``, memprof's BottleneckAdapter,
prefix tuning (per-layer key/value prefixes concatenated to the cache) and prompt tuning (virtual tokens
prepended to the input embeddings).

NB: the scripts mirror specific library versions; a changed modeling file changes the truth. The traced
estimator (``--trace``) runs the real code and is what tests compare these scripts against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import AdapterVariant, AttnImpl, Device, Method, Regime, RunSetup
from ..spec import Family, ModelSpec, Task
from .modules import Module, global_modules, layer_modules, layer_prefix, tied_head
from .params import resolve_ia3_targets, modules_to_save, prefix_token_dim, resolve_lora_targets
from .sim import BYTES, GRAD, INPUT, OPT, WCOPY, Graph, P, T, pscale

HALF = {"bf16", "fp16"}


@dataclass
class Ctx:
    """What a script needs to know besides the architecture: dtypes, autocast, method, trainability."""

    g: Graph
    spec: ModelSpec
    setup: RunSetup
    wdt: str                    # storage dtype of base weights (fp32 under fp32/AMP regimes)
    amp: str | None             # autocast dtype (AMP regime) else None
    lora: dict = field(default_factory=dict)       # full module name -> rank
    ia3: dict = field(default_factory=dict)        # full module name -> is_feedforward
    saved_modules: tuple = ()                      # peft modules_to_save (trainable copy)
    params: dict = field(default_factory=dict)     # name -> param handle (tied weights share one)
    wcache: dict = field(default_factory=dict)     # autocast cache of half weight copies
    kv_cache: list = field(default_factory=list)   # DynamicCache's per-layer keys/values (prefix tuning)
    extra_q: int = 0            # virtual tokens prepended to the sequence (prompt tuning)
    extra_kv: int = 0           # prefix length added to keys/values (prefix tuning)

    # ---- trainability ----------------------------------------------------------------------------------
    def trainable(self, full_name: str, m: Module, kind: str) -> bool:
        method = self.setup.method
        if method is Method.full:
            return True
        is_head = m.role == "classifier" and self.spec.task is Task.seq_cls
        if method in (Method.adapter, Method.bitfit):
            if is_head:
                return True
            if method is Method.bitfit:
                return kind == "bias"
            return m.kind == "norm" and bool(self.setup.adapter and self.setup.adapter.train_norms)
        if any(full_name == s or full_name.startswith(s + ".") for s in self.saved_modules):
            return True   # the trainable copy is the one the forward uses
        if method in (Method.lora, Method.qlora) and kind == "bias" and self.setup.lora is not None:
            if self.setup.lora.bias == "all":
                return True
            if self.setup.lora.bias == "lora_only":
                return full_name in self.lora
        return False

    def param(self, full_name: str, m: Module, kind: str = "weight") -> T:
        key = f"{full_name}.{kind}"
        if key not in self.params:
            numel = m.weight_params if kind == "weight" else m.bias_params
            width = m.d_out if m.kind in ("linear", "conv1d", "embedding") else m.d_in
            self.params[key] = self.g.param(numel, width, self.wdt, self.trainable(full_name, m, kind), key)
        return self.params[key]

    @property
    def act(self) -> str:
        """Activation dtype out of a base op (autocast outputs half from matmuls; storage dtype otherwise)."""
        return self.wdt

    # ---- autocast --------------------------------------------------------------------------------------
    def to_half(self, x: T, label: str) -> T:
        """Autocast's cast of an fp32 operand for a lower-precision op (a new copy, not cached)."""
        if self.amp is None or x.dtype != "fp32":
            return self.g.alias(x)
        return self.g.cast(x, self.amp, label + " (autocast half copy)")

    def to_fp32(self, x: T, label: str) -> T:
        """Autocast's fp32 policy (CUDA: softmax, layer_norm, pow, rsqrt, sum, losses): upcast half input."""
        if self.amp is None or self.setup.device is not Device.cuda or x.dtype == "fp32":
            return self.g.alias(x)
        return self.g.cast(x, "fp32", label + " (autocast fp32 copy)")

    def weight_for_matmul(self, w: T, label: str) -> T | None:
        """The tensor a matmul reads for weight ``w``: the cached half copy under autocast (rg leaves are
        cached for the whole forward; frozen weights are cast at every use), else the parameter itself."""
        if self.amp is None or w.dtype != "fp32":
            return None
        if w.rg:
            if id(w) not in self.wcache:
                self.wcache[id(w)] = self.g.cast(w, self.amp, label + " weight copy", fate=WCOPY)
                self.wcache[id(w)].st.carried = True
            return self.g.alias(self.wcache[id(w)])
        return self.g.cast(w, self.amp, label + " weight copy", fate=WCOPY)

    def end_autocast(self) -> None:
        for t in self.wcache.values():
            self.g.drop(t)
        self.wcache.clear()

    # ---- linear with its method wrapper ------------------------------------------------------------
    def linear(self, x: T, full_name: str, m: Module, label: str) -> T:
        g = self.g
        w = self.param(full_name, m)
        bias = self.param(full_name, m, "bias") if m.bias else None
        ia3_ff = self.ia3.get(full_name)
        x_in = x
        if ia3_ff:  # peft IA3 feedforward: scale the input, x.to(fp32) * l -> back to x's dtype
            lvec = g.param(m.d_in, m.d_in, "fp32", True, full_name + ".ia3_l")
            x32 = g.cast(x, "fp32", label + " ia3 input (fp32)")
            scaled = g.mul(x32, lvec, label + " ia3 scaled", dtype="fp32")
            g.drop(x32)
            x_in = g.cast(scaled, x.dtype, label + " ia3 scaled (cast back)")
            g.drop(scaled)
        xh = self.to_half(x_in, label)
        if self.setup.method is Method.qlora and m.role not in ("head", "classifier"):
            y = self._linear_4bit(xh, w, bias, m, label)
            if y.dtype != x_in.dtype:  # Linear4bit.forward returns out.to(inp_dtype)
                back = g.cast(y, x_in.dtype, label + " (back to the input dtype)")
                g.drop(y)
                y = back
        else:
            wq = self.weight_for_matmul(w, label)
            y = g.linear(xh, w, m.d_out, label, bias=bias, w_used=wq, out_dtype=self.amp)
            if wq is not None:
                g.drop(wq)
        r = self.lora.get(full_name)
        if r:
            y = self._lora(x_in, y, r, m, label)
        if x_in is not x:
            g.drop(x_in)
        g.drop(xh)
        if ia3_ff is False:  # peft IA3 on the output: (y * l).to(y.dtype)
            lvec = g.param(m.d_out, m.d_out, "fp32", True, full_name + ".ia3_l")
            prod = g.mul(y, lvec, label + " ia3 scaled", dtype="fp32")
            g.drop(y)
            y = g.cast(prod, self._out_dtype(), label + " ia3 out")
            g.drop(prod)
        return y

    def _linear_4bit(self, x: T, w: T, bias: T | None, m: Module, label: str) -> T:
        """bitsandbytes MatMul4Bit (frozen NF4 weight) on x in the compute dtype (the run's dtype):
        dequantize_4bit in the dtype the weight was stored from (the model's weight dtype), .to(x.dtype),
        matmul, free the copies; keep only the packed weight (a parameter) for backward, which dequantizes
        it again for the input gradient (transient weight-sized buffers then)."""
        g = self.g
        stored, n = self.wdt, m.weight_params
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

    def _out_dtype(self) -> str:
        return self.amp or self.wdt

    def _lora(self, x: T, y: T, r: int, m: Module, label: str) -> T:
        """peft lora.Linear.forward: result + B(A(dropout(x.to(A.dtype)))) * scaling, then .to(result dtype)."""
        g = self.g
        adt = "fp32"  # peft autocast_adapter_dtype: adapter weights fp32 on a half base
        a_w = g.param(r * m.d_in, r, adt, True, label + ".lora_A")
        b_w = g.param(m.d_out * r, m.d_out, adt, True, label + ".lora_B")
        xa = g.cast(x, adt, label + " lora input (fp32)")
        p = self.setup.lora.dropout if self.setup.lora else 0.0
        xd = g.dropout(xa, p, label + " lora dropout")
        xh = self.to_half(xd, label + " lora A")
        wa = self.weight_for_matmul(a_w, label + " lora A")
        a_out = g.linear(xh, a_w, r, label + " lora A out", w_used=wa, out_dtype=self.amp)
        g.drop(xh, wa, xd, xa)
        ah = self.to_half(a_out, label + " lora B")
        wb = self.weight_for_matmul(b_w, label + " lora B")
        b_out = g.linear(ah, b_w, m.d_out, label + " lora B out", w_used=wb, out_dtype=self.amp)
        g.drop(ah, wb, a_out)
        scaled = g.mul(b_out, None, label + " lora scaled")
        g.drop(b_out)
        dtype = "fp32" if "fp32" in (y.dtype, scaled.dtype) else y.dtype
        summed = g.add(y, scaled, label + " + lora", dtype=dtype)
        g.drop(y, scaled)
        out = g.cast(summed, y.dtype, label + " lora out")
        g.drop(summed)
        return out

    def adapter(self, y: T, label: str) -> T:
        """memprof BottleneckAdapter: y + up(act(down(y.to(fp32)))).to(y.dtype)."""
        g = self.g
        ad = self.setup.adapter
        assert ad is not None
        h, r = self.spec.hidden_size, ad.bottleneck_size(self.spec.hidden_size)
        down_w = g.param(h * r, r, "fp32", True, label + ".down")
        down_b = g.param(r, r, "fp32", True, label + ".down.bias")
        up_w = g.param(r * h, h, "fp32", True, label + ".up")
        up_b = g.param(h, h, "fp32", True, label + ".up.bias")
        z = g.cast(y, "fp32", label + " adapter input (fp32)")
        zh = self.to_half(z, label + " down")
        wd = self.weight_for_matmul(down_w, label + " down")
        d = g.linear(zh, down_w, r, label + " adapter down", bias=down_b, w_used=wd, out_dtype=self.amp)
        g.drop(zh, wd, z)
        a = g.unary(d, label + " adapter act", "output" if ad.activation == "relu" else "input")
        g.drop(d)
        ah = self.to_half(a, label + " up")
        wu = self.weight_for_matmul(up_w, label + " up")
        u = g.linear(ah, up_w, h, label + " adapter up", bias=up_b, w_used=wu, out_dtype=self.amp)
        g.drop(ah, wu, a)
        uc = g.cast(u, y.dtype, label + " adapter out")
        g.drop(u)
        out = g.add(y, uc, label + " + adapter")
        g.drop(uc, y)
        return out

    def norm(self, x: T, full_name: str, m: Module, label: str) -> T:
        g = self.g
        w = self.param(full_name, m)
        if self.spec.norm == "layernorm":
            b = self.param(full_name, m, "bias")
            xin = self.to_fp32(x, label)
            out = g.layer_norm(xin, w, b, label)
            g.drop(xin)
            return out
        return self.rms_norm(x, w, label)

    def rms_norm(self, x: T, w: T, label: str) -> T:
        """LlamaRMSNorm: x32 = x.float(); x32 * rsqrt(mean(x32^2) + eps); w * that.to(x dtype).
        Gemma: (x32 * rsqrt(...)) * (1 + w.float()), then .type_as(x)."""
        g = self.g
        dtype = x.dtype
        x32 = g.cast(x, "fp32", label + " input (fp32)")
        sq = g.unary(x32, label + " x^2", "input")  # pow(2) keeps its input (autocast: pow runs in fp32)
        var = g.unary(sq, label + " mean(x^2)", "none", width=1)
        g.drop(sq)
        var_eps = g.add(var, None, label + " +eps")
        g.drop(var)
        rs = g.unary(var_eps, label + " rsqrt", "output")
        g.drop(var_eps)
        normed = g.mul(x32, rs, label + " normalised (fp32)")
        g.drop(x32, rs)
        if self.spec.model_type.startswith("gemma"):
            w32 = g.cast(w, "fp32", label + " weight (fp32)")
            w1 = g.add(w32, None, label + " 1 + w")
            out32 = g.mul(normed, w1, label + " scaled (fp32)")
            g.drop(normed, w32, w1)
            out = g.cast(out32, dtype, label + " out")
            g.drop(out32)
            return out
        nh = g.cast(normed, dtype, label + " normalised")
        g.drop(normed)
        out = g.mul(nh, w, label + " out", dtype=dtype)
        g.drop(nh)
        return out


# ---------------------------------------------------------------------------------------------------------
# shapes: per-token tensors are k*b*(s+extra) elements; scores b*a*s*(s+kv extra)


def tok(ctx: Ctx, k: float) -> tuple:
    """k elements per token of the (possibly prompt-extended) sequence: k*b*(s+p)."""
    return P(bs=k, b=k * ctx.extra_q)


def scores(ctx: Ctx, heads: int) -> tuple:
    """heads*b*sq*sk with sq = s+p_q, sk = s+p_q+p_kv."""
    pq, pk = ctx.extra_q, ctx.extra_q + ctx.extra_kv
    # b*(s+pq)*(s+pk) = b*s^2 + (pq+pk)*b*s + pq*pk*b
    return P(bss=heads, bs=heads * (pq + pk), b=heads * pq * pk)


def kv_tok(ctx: Ctx, k: float) -> tuple:
    """k elements per key position: k*b*(s+p_q+p_kv)."""
    return P(bs=k, b=k * (ctx.extra_q + ctx.extra_kv))


# ---------------------------------------------------------------------------------------------------------
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
        contiguous_k = contiguous_v = bool(ctx.extra_kv)
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
    sin = ctx.to_fp32(scaled, label + " softmax") if not llama_like else g.alias(scaled)
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


# ---------------------------------------------------------------------------------------------------------
def bert_embeddings(ctx: Ctx, ids: T) -> T:
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
    word = _input_embeddings(ctx, g.embedding(ids, ctx.param(*mods["word_embeddings"]), h, ctx.wdt, "word embeddings"))
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
    return out


def bert_layer(ctx: Ctx, x: T, i: int) -> T:
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
    if ctx.extra_kv:
        k, v = _prefix_kv(ctx, k, v, i, spec.hidden_size)
    c, weights = attention_core(ctx, q, k, v, a, a, d, p_a, False, None, "self-attention")
    g.drop(q, k, v)
    # BertSelfOutput.forward(c, x): dense -> dropout -> LayerNorm(dropout + x); c lives until BertAttention returns
    o = lin(c, "attention.output.dense")
    o = _adapter_after(ctx, o, "attn", i)
    od = g.dropout(o, p_h, "attention output dropout")
    g.drop(o)
    r = g.add(od, x, "attention residual")
    a_out = ctx.norm(r, pre + "attention.output.LayerNorm", mods["attention.output.LayerNorm"], "attention LayerNorm")
    g.drop(r, od, c)
    # feed_forward_chunk: intermediate_output lives until the chunk returns
    f = lin(a_out, "intermediate.dense")
    act = _activation(ctx, f, "intermediate act")
    g.drop(f)
    o2 = lin(act, "output.dense")
    o2 = _adapter_after(ctx, o2, "ffn", i)
    o2d = g.dropout(o2, p_h, "output dropout")
    g.drop(o2)
    r2 = g.add(o2d, a_out, "output residual")
    out = ctx.norm(r2, pre + "output.LayerNorm", mods["output.LayerNorm"], "output LayerNorm")
    g.drop(r2, o2d, act, a_out, weights)
    return out


def bert_head(ctx: Ctx, x: T, held: list[T]) -> T:
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
    loss = _classification_loss(ctx, logits)
    g.drop(first, x)
    return loss


def _classification_loss(ctx: Ctx, logits: T) -> T:
    """CrossEntropyLoss(logits.view(-1, num_labels), labels): log_softmax keeps its output."""
    g = ctx.g
    lin = ctx.to_fp32(logits, "loss")
    ls = g.unary(lin, "log_softmax", "output")
    g.drop(lin, logits)
    loss = g.new(P(c=1), 1, ls.dtype, "loss")
    g.custom("nll_loss", [ls], [loss], [])
    g.drop(ls)
    return loss


# ---------------------------------------------------------------------------------------------------------
def gpt2_embeddings(ctx: Ctx, ids: T) -> tuple[T, list[T]]:
    """GPT2Model.forward up to the blocks. Returns the first block's input and the locals that GPT2Model
    keeps until it returns (inputs_embeds, position_ids, position_embeds)."""
    g, spec = ctx.g, ctx.spec
    mods = {m.name: m for m in global_modules(spec)}
    h = spec.hidden_size
    wte = _input_embeddings(ctx, g.embedding(ids, ctx.param("transformer.wte", mods["transformer.wte"]), h, ctx.wdt, "wte"))
    pos_ids = g.new(P(s=1), 1, "int64", "position ids")
    wpe = g.embedding(pos_ids, ctx.param("transformer.wpe", mods["transformer.wpe"]), h, ctx.wdt, "wpe")
    g.resize(wpe, P(s=h))
    e = g.add(wte, wpe, "embeddings sum")
    out = g.dropout(e, spec.embedding_dropout if ctx.setup.dropout else 0, "embedding dropout")
    g.drop(e)
    return out, [wte, wpe, pos_ids]


def gpt2_block(ctx: Ctx, x: T, i: int, mask: T | None) -> T:
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
    if ctx.extra_kv:
        k, v = _prefix_kv(ctx, k, v, i, h)
    c, weights = attention_core(ctx, q, k, v, a, a, d, p_a, True, mask, "self-attention")
    o = ctx.linear(c, pre + "attn.c_proj", mods["attn.c_proj"], "attn.c_proj")
    g.drop(c)
    o = _adapter_after(ctx, o, "attn", i)
    attn_out = g.dropout(o, p_h, "attention residual dropout")
    g.drop(o, q, k, v)
    r = g.add(attn_out, x, "attention residual")
    g.drop(n1)
    n2 = ctx.norm(r, pre + "ln_2", mods["ln_2"], "ln_2")
    # GPT2MLP.forward: each rebinding frees the previous value unless autograd keeps it
    f = ctx.linear(n2, pre + "mlp.c_fc", mods["mlp.c_fc"], "mlp.c_fc")
    act = _activation(ctx, f, "mlp act")
    g.drop(f)
    o2 = ctx.linear(act, pre + "mlp.c_proj", mods["mlp.c_proj"], "mlp.c_proj")
    g.drop(act)
    o2 = _adapter_after(ctx, o2, "ffn", i)
    ff = g.dropout(o2, p_h, "mlp dropout")
    g.drop(o2)
    out = g.add(r, ff, "mlp residual")
    g.drop(n2, r, ff, attn_out, weights)
    return out


# ---------------------------------------------------------------------------------------------------------
def llama_embeddings(ctx: Ctx, ids: T) -> tuple[T, list[T]]:
    """LlamaModel's embedding lookup; returns the first block's input and the held inputs_embeds."""
    g, spec = ctx.g, ctx.spec
    mods = {m.name: m for m in global_modules(spec)}
    e = _input_embeddings(ctx, g.embedding(ids, ctx.param("model.embed_tokens", mods["model.embed_tokens"]),
                                           spec.hidden_size, ctx.wdt, "embed_tokens"))
    if spec.embed_scale:  # Gemma: hidden * normalizer; inputs_embeds (e) stays referenced by the model's forward
        return g.mul(e, None, "embeddings * sqrt(h)"), [e]
    return e, []


def _input_embeddings(ctx: Ctx, e: T) -> T:
    """Gradient checkpointing calls enable_input_require_grads: a forward hook on the input embeddings makes
    their output require grad even when the embedding matrix is frozen."""
    if ctx.setup.grad_checkpointing and not e.rg:
        # a leaf that requires grad: its AccumulateGrad node keeps it alive until the backward ends
        e.rg = True
        ctx.g.leaf_holds.append(ctx.g.alias(e))
    return e


def llama_rope(ctx: Ctx) -> tuple[T, T]:
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


def llama_layer(ctx: Ctx, x: T, i: int, cos: T, sin: T, mask: T | None) -> T:
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
    else:
        q, k, v = lin(n1, "self_attn.q_proj"), lin(n1, "self_attn.k_proj"), lin(n1, "self_attn.v_proj")
    if spec.qk_norm:
        qn = ctx.rms_norm(q, ctx.param(pre + "self_attn.q_norm", mods["self_attn.q_norm"]), "q_norm")
        kn = ctx.rms_norm(k, ctx.param(pre + "self_attn.k_norm", mods["self_attn.k_norm"]), "k_norm")
        g.drop(q, k)
        q, k = qn, kn
    qr = _rotate(ctx, q, cos, sin, "q")
    kr = _rotate(ctx, k, cos, sin, "k")
    g.drop(q, k)
    if ctx.extra_kv:
        kr, v = _prefix_kv(ctx, kr, v, i, kv * d)
    c, weights = attention_core(ctx, qr, kr, v, a, kv, d, p_a, True, mask, "self-attention",
                                q_contiguous=spec.rotary_cat)
    o = lin(c, "self_attn.o_proj")
    g.drop(c, qr, kr, v)
    o = _adapter_after(ctx, o, "attn", i)
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
    # LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)), temporaries freed as the expression unwinds
    if spec.fused_qkv:
        inter = spec.intermediate_size
        gu = lin(n2, "mlp.gate_up_proj")
        gate, up = g.view(gu, inter, tok(ctx, inter)), g.view(gu, inter, tok(ctx, inter))
        g.drop(gu)
        act = _activation(ctx, gate, "mlp act")
    else:
        gate = lin(n2, "mlp.gate_proj")
        act = _activation(ctx, gate, "mlp act")
        g.drop(gate)
        up = lin(n2, "mlp.up_proj")
    prod = g.mul(act, up, "act * up")
    g.drop(act, up)
    if spec.fused_qkv:
        g.drop(gate)
    down = lin(prod, "mlp.down_proj")
    g.drop(prod)
    down = _adapter_after(ctx, down, "ffn", i)
    if spec.sandwich_norm:
        dn = norm(down, "post_feedforward_layernorm")
        g.drop(down)
        down = dn
    dd = g.dropout(down, p_h, "mlp residual dropout")
    g.drop(down, n2)
    out = g.add(r, dd, "mlp residual")
    g.drop(r, dd, weights)
    return out


def _prefix_kv(ctx: Ctx, k: T, v: T, i: int, width: int) -> tuple[T, T]:
    """Prefix tuning: DynamicCache.update concatenates the layer's prefix keys/values before the new ones."""
    g = ctx.g
    pk = ctx.prefix_kv[i]  # type: ignore[attr-defined]
    kk = g.cat([pk[0], k], "keys with prefix")
    vv = g.cat([pk[1], v], "values with prefix")
    g.resize(kk, kv_tok(ctx, width))
    g.resize(vv, kv_tok(ctx, width))
    g.drop(k, v, *pk)
    # the cache keeps the concatenations (layer.keys/values) until the model's forward returns; where
    # attention saves something else (autocast's half copies, CPU SDPA's working copies) they outlive it
    for t in (kk, vv):
        ctx.kv_cache.append(g.alias(t))
        t.st.carried = True
    return kk, vv


def _activation(ctx: Ctx, x: T, label: str) -> T:
    g = ctx.g
    act = ctx.spec.hidden_act
    if act == "gelu_new" or act == "gelu_fast":
        # NewGELUActivation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))); under autocast pow runs
        # in fp32 and the rest of the expression is promoted to fp32
        xp = ctx.to_fp32(x, label + " pow")
        x3 = g.unary(xp, label + " x^3", "input")
        g.drop(xp)
        t = g.mul(x3, None, label + " 0.044715x^3")
        g.drop(x3)
        u = g.add(x, t, label + " x + ...")
        g.drop(t)
        w = g.mul(u, None, label + " * sqrt(2/pi)")
        g.drop(u)
        th = g.unary(w, label + " tanh", "output")
        g.drop(w)
        one = g.add(th, None, label + " 1 + tanh")
        g.drop(th)
        half = g.mul(x, None, label + " 0.5x")
        out = g.mul(half, one, label)
        g.drop(half, one)
        return out
    if act == "relu":
        return g.unary(x, label, "output")
    return g.unary(x, label, "input")  # gelu, gelu_pytorch_tanh, silu: keep their input


def _adapter_after(ctx: Ctx, y: T, site: str, i: int) -> T:
    ad = ctx.setup.adapter
    if ctx.setup.method is not Method.adapter or ad is None:
        return y
    if site == "attn" and ad.variant is not AdapterVariant.houlsby:
        return y
    return ctx.adapter(y, f"adapter ({site})")


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
        loss = _classification_loss(ctx, pooled)
        g.drop(logits, n)
        return loss
    name = "model.embed_tokens" if spec.family is Family.llama else "transformer.wte"
    if tied_head(spec):
        logits = _head_linear(ctx, n, ctx.params[f"{name}.weight"], V)
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
    g.drop(logits)                    # the returned output, dropped by the harness
    return loss


def _head_linear(ctx: Ctx, n: T, w: T, V: int) -> T:
    g = ctx.g
    nh = ctx.to_half(n, "lm_head")
    wq = ctx.weight_for_matmul(w, "lm_head")
    logits = g.linear(nh, w, V, "logits", w_used=wq, out_dtype=ctx.amp)
    g.drop(nh, wq)
    return logits


# ---------------------------------------------------------------------------------------------------------
def build_context(g: Graph, spec: ModelSpec, setup: RunSetup) -> Ctx:
    regime = setup.effective_regime
    wdt = setup.dtype.value if regime in (Regime.pure, Regime.mixed) or setup.method is Method.qlora else "fp32"
    amp = setup.dtype.value if regime is Regime.amp else None
    ctx = Ctx(g, spec, setup, wdt, amp)
    method = setup.method
    if method in (Method.lora, Method.qlora):
        lora = setup.lora
        assert lora is not None
        ctx.lora = {name: lora.r for name, _ in resolve_lora_targets(spec, lora)}
        ctx.saved_modules = modules_to_save(spec, lora.modules_to_save)
    elif method is Method.ia3:
        from ..config import IA3Spec
        ctx.ia3 = {name: ff for name, _, ff in resolve_ia3_targets(spec, setup.ia3 or IA3Spec())}
        ctx.saved_modules = modules_to_save(spec, None)
    elif method in (Method.prefix, Method.prompt):
        ctx.saved_modules = modules_to_save(spec, None)
        n = setup.prompt.num_virtual_tokens if setup.prompt else 20
        if method is Method.prompt:
            ctx.extra_q = n
        else:
            ctx.extra_kv = n
    return ctx


def forward(ctx: Ctx, layers: int) -> T:
    """Script the whole forward with ``layers`` blocks; segments: embed, layer0, layer1.., head."""
    g, spec, setup = ctx.g, ctx.spec, ctx.setup
    g.segment("embed")
    ids = g.given(P(bs=1), 1, "int64", "input_ids")
    held: list[T] = []   # locals the model's forward keeps until it returns
    peft_held: list[T] = []  # locals of PeftModel.forward, kept until the whole forward (head, loss) returns
    if setup.method is Method.prompt:
        x, held, peft_held = _prompt_embeddings(ctx, ids)
    elif spec.family is Family.bert:
        x = bert_embeddings(ctx, ids)
    elif spec.family is Family.gpt2:
        x, held = gpt2_embeddings(ctx, ids)
    else:
        x, held = llama_embeddings(ctx, ids)
    held.append(g.alias(x))  # embedding_output / inputs_embeds stay referenced by the model's forward
    mask = None
    cos = sin = None
    if spec.family is not Family.bert and (setup.attn_impl is AttnImpl.eager or setup.method is Method.prefix):
        # create_causal_mask: a (b, 1, s, s_kv) additive mask in the model dtype, shared by all layers
        # (bool for SDPA, which attention_core converts per call; eager adds the dtype's minimum)
        held.append(g.new(scores(ctx, 1), 1, "bool" if setup.attn_impl is AttnImpl.sdpa
                          else ctx.amp and "fp32" or ctx.wdt, "causal mask"))
        mask = held[-1]
    if spec.family is Family.llama:
        cos, sin = llama_rope(ctx)
        held += [cos, sin]
    if setup.method is Method.prefix:
        _prefix_encoder(ctx)
    for i in range(layers):
        g.segment(f"layer{i}")
        if setup.grad_checkpointing:  # GradientCheckpointingLayer: checkpoint(block, hidden_states, ...)
            g.begin_checkpoint([x, cos, sin, mask] + list(getattr(ctx, "prefix_kv", [(None, None)] * (i + 1))[i]))
        if spec.family is Family.bert:
            y = bert_layer(ctx, x, i)
        elif spec.family is Family.gpt2:
            y = gpt2_block(ctx, x, i, mask)
        else:
            y = llama_layer(ctx, x, i, cos, sin, mask)
        if setup.grad_checkpointing:
            g.end_checkpoint()
        g.drop(x)
        x = y
    g.segment("head")
    if spec.family is Family.bert:
        loss = bert_head(ctx, x, held)
    else:
        loss = decoder_head(ctx, x, held)
    g.drop(*peft_held, *ctx.kv_cache)
    ctx.end_autocast()
    return loss


def _prompt_embeddings(ctx: Ctx, ids: T) -> tuple[T, list[T], list[T]]:
    """peft prompt tuning (PeftModel.forward): frozen word embeddings of the ids, the trainable virtual-token
    embeddings for the batch cast to the embedding dtype and concatenated in front (sequence s + p), then the
    base model's embedding path with ``inputs_embeds``. Returns the first block's input, the base model's held
    locals and PeftModel.forward's (inputs_embeds, prompts), which live until the loss is computed."""
    g, spec = ctx.g, ctx.spec
    n, h = ctx.extra_q, spec.hidden_size
    mods = {m.name: m for m in global_modules(spec)}
    name = next(m.name for m in global_modules(spec) if m.role == "embed")
    words = _input_embeddings(ctx, g.embedding(ids, ctx.param(name, mods[name]), h, ctx.wdt, "word embeddings"))
    g.resize(words, P(bs=h))
    prompt_w = g.param(n * h, h, "fp32", True, "prompt_encoder.embedding")
    pidx = g.new(P(b=n), 1, "int64", "prompt token ids")
    prompts = g.embedding(pidx, prompt_w, h, "fp32", "prompt embeddings")
    g.resize(prompts, P(b=n * h))
    pc = g.cast(prompts, ctx.wdt, "prompt embeddings (cast)")
    g.drop(prompts)
    x = g.cat([pc, words], "prompt + word embeddings")
    g.resize(x, tok(ctx, h))
    g.drop(words)
    peft_held = [pc, pidx, g.alias(x)]
    if spec.family is Family.gpt2:
        pos_ids = g.new(P(s=1, c=n), 1, "int64", "position ids")
        wpe = g.embedding(pos_ids, ctx.param("transformer.wpe", mods["transformer.wpe"]), h, ctx.wdt, "wpe")
        g.resize(wpe, P(s=h, c=h * n))
        e = g.add(x, wpe, "embeddings sum")
        out = g.dropout(e, spec.embedding_dropout if ctx.setup.dropout else 0, "embedding dropout")
        g.drop(e)
        g.drop(x)
        return out, [wpe, pos_ids], peft_held
    if spec.family is Family.bert:
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
        return out, [], peft_held
    if spec.embed_scale:
        scaled = g.mul(x, None, "embeddings * sqrt(h)")
        g.drop(x)
        return scaled, [], peft_held
    return x, [], peft_held


def _named(mods: dict, suffix: str) -> tuple[str, Module]:
    name = next(n for n in mods if n.endswith(suffix))
    return name, mods[name]


def _prefix_encoder(ctx: Ctx) -> None:
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
    for _ in range(getattr(ctx, "layers", spec.num_layers)):
        kvs.append((g.view(pkv, td, P(b=n * td)), g.view(pkv, td, P(b=n * td))))
    g.drop(pkv)
    ctx.prefix_kv = kvs  # type: ignore[attr-defined]
