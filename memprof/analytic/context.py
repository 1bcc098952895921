"""The forward scripts' context: dtypes and autocast, trainability, and the linear/norm layers every family
uses (pure). A script calls ``ctx.linear`` for each projection; the method wrapping it (LoRA, IA3, QLoRA's 4-bit
matmul) is in peft_methods.py.

Mirrors, with the family modules: torch.autocast's CUDA op lists (cast policies), transformers 5.23 nn.Linear /
Conv1D / LayerNorm / RMSNorm usage, peft 0.21's ``modules_to_save`` and bias trainability rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Device, Method, RunSetup
from ..spec import Family, ModelSpec, Task
from . import peft_methods
from .modules import Module
from .sim import WCOPY, Graph, P, T


@dataclass
class Ctx:
    """What a script needs to know besides the architecture: dtypes, autocast, method, trainability."""

    g: Graph
    spec: ModelSpec
    setup: RunSetup
    wdt: str                    # storage dtype of base weights (fp32 under fp32/AMP regimes)
    amp: str | None             # autocast dtype (AMP regime) else None
    adapter_dtype: str = "fp32"  # peft's tensors: fp32 on a half base (autocast_adapter_dtype); DeepSpeed casts them
    lora: dict = field(default_factory=dict)       # full module name -> rank
    ia3: dict = field(default_factory=dict)        # full module name -> is_feedforward
    ln_tuned: set = field(default_factory=set)     # norm layers LN tuning copies (trainable)
    adalora_factors: dict = field(default_factory=dict)  # block (None: outside) -> AdaLoRA's lora_A / lora_B
    block: int | None = None    # the block the script is in (None: embeddings, head)
    saved_modules: tuple = ()                      # peft modules_to_save (trainable copy)
    params: dict = field(default_factory=dict)     # name -> param handle (tied weights share one)
    wcache: dict = field(default_factory=dict)     # autocast cache of half weight copies
    kv_cache: list = field(default_factory=list)   # DynamicCache's per-layer keys/values (prefix tuning)
    extra_q: int = 0            # virtual tokens prepended to the sequence (prompt tuning)
    extra_kv: int = 0           # prefix length added to keys/values (prefix tuning)
    layers: int | None = None   # blocks in this replay (None: the spec's depth)
    block_types: tuple = ()     # each replayed block's attention type (spec.layer_types; empty: all full)
    window_reached: bool = False  # the keys reach the sliding window: SDPA gets a sliding mask (forward.py)
    prefix_kv: list = field(default_factory=list)  # per-layer (key, value) prefix views (prefix tuning)
    last_linear: tuple = ()     # the weight and bias of the last ``linear`` (an adapter's site)

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
        if full_name in self.ln_tuned:
            return True   # LN tuning: the forward runs the trainable copy (ln_tuning_layers), not the original
        if method in (Method.lora, Method.qlora) and kind == "bias" and self.setup.lora is not None:
            if self.setup.lora.bias == "all":
                return True
            if self.setup.lora.bias == "lora_only":
                return full_name in self.lora
        return False

    def quantized(self, m: Module) -> bool:
        """QLoRA stores this projection's weight in 4 bits (bitsandbytes Linear4bit; not the head)."""
        return self.setup.method is Method.qlora and m.role not in ("head", "classifier", "router")

    def param(self, full_name: str, m: Module, kind: str = "weight") -> T:
        key = f"{full_name}.{kind}"
        if key not in self.params:
            numel = m.weight_params if kind == "weight" else m.bias_params
            width = m.d_out if m.kind in ("linear", "conv1d", "embedding") else m.d_in
            self.params[key] = self.g.param(numel, width, self.wdt, self.trainable(full_name, m, kind), key)
            if kind == "weight" and m.is_linear and self.quantized(m):
                self.params[key].st.dtype = "nf4"  # stored packed (the handle keeps the compute dtype)
        return self.params[key]

    def embed(self, ids: T, full_name: str, m: Module, label: str) -> T:
        """The input embedding lookup. peft trainable tokens (trainable_tokens/layer.py) look up a merged copy,
        ``W.index_copy(0, indices, delta.to(W))``: a vocabulary-sized tensor built every forward and freed after
        the lookup, whose gradient (embedding_dense_backward) is vocabulary-sized too before index_copy's
        backward selects the delta's rows."""
        g, h = self.g, self.spec.hidden_size
        w = self.param(full_name, m)
        if self.setup.method is not Method.trainable_tokens:
            return g.embedding(ids, w, h, self.wdt, label)
        merged = self.merged_tokens(w, label)
        out = g.embedding(ids, merged, h, self.wdt, label)
        g.drop(merged)
        return out

    def merged_tokens(self, w: T, label: str) -> T:
        """peft TrainableTokensLayer.get_merged_weights: ``W.index_copy(0, indices, delta.to(W))``, a new
        matrix of W's size; a tied output layer shares the embedding's delta (tied_adapter)."""
        g, h = self.g, self.spec.hidden_size
        assert self.setup.trainable_tokens is not None
        n = self.setup.trainable_tokens.count
        if "trainable_tokens_delta" not in self.params:
            self.params["trainable_tokens_delta"] = g.param(n * h, h, "fp32", True, "trainable_tokens_delta")
        cast = g.cast(self.params["trainable_tokens_delta"], w.dtype, label + " trainable tokens delta (cast)")
        index = g.new(P(c=n), 1, "int64", label + " token indices")
        merged = g.new(w.numel, h, w.dtype, label + " merged matrix")
        g.custom("index_copy", [w, cast], [merged], [index], [False, True])
        g.drop(cast, index)
        return merged

    @property
    def kv_cat(self) -> bool:
        """Each layer's keys/values go through DynamicCache.update (a torch.cat: new contiguous tensors): prefix
        tuning's prefix cache, or a decoder's own cache when the model builds one in training (use_cache)."""
        return bool(self.extra_kv) or (self.setup.builds_cache and self.spec.family is not Family.bert)

    def keep_output(self, t: T) -> None:
        """``t`` is part of the model output: a loop that keeps the output (keep_outputs) holds it past the
        backward, into the next step's forward."""
        if self.setup.keep_outputs:
            self.g.step_holds.append(self.g.alias(t))

    @property
    def out_dtype(self) -> str:
        """dtype of a matmul's output: autocast's half dtype, else the weights' storage dtype."""
        return self.amp or self.wdt

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

    def weight_for_matmul(self, w: T, label: str, f_linear: bool = True) -> T | None:
        """The tensor a matmul reads for weight ``w``: the cached half copy under autocast (rg leaves are
        cached for the whole forward; frozen weights are cast at every use), else the parameter itself. Under
        ZeRO-3's linear (``Graph.ds_linear``, for ``f_linear`` calls) the matmul reads ``weight.t()``, a view,
        which autocast never caches (autocast_mode.cpp ``cached_cast``: leaves that are not views): cast at
        every use."""
        if self.amp is None or w.dtype != "fp32":
            return None
        if w.rg and not (self.g.ds_linear and f_linear):
            if id(w) not in self.wcache:
                self.wcache[id(w)] = self.g.cast(w, self.amp, label + " weight copy", fate=WCOPY)
                self.wcache[id(w)].st.carried = True
            return self.g.alias(self.wcache[id(w)])
        return self.g.cast(w, self.amp, label + " weight copy", fate=WCOPY)

    def end_autocast(self) -> None:
        for t in self.wcache.values():
            self.g.drop(t)
        self.wcache.clear()

    # ---- linear with its method wrapper (peft_methods.py) --------------------------------------------
    def linear(self, x: T, full_name: str, m: Module, label: str) -> T:
        g = self.g
        w = self.param(full_name, m)
        bias = self.param(full_name, m, "bias") if m.bias else None
        self.last_linear = (w, bias)
        ia3_ff = self.ia3.get(full_name)
        x_in = x
        if ia3_ff:
            x_in = peft_methods.ia3_scale_input(self, x, full_name, m, label)
        xh = self.to_half(x_in, label)
        if self.quantized(m):
            y = peft_methods.linear_4bit(self, xh, bias, m, label)
            if y.rg:  # the packed weight is the module's, read through its dequantized copy
                self.g.grad_uses.add(id(w.st))
            if y.dtype != x_in.dtype:  # Linear4bit.forward returns out.to(inp_dtype)
                back = g.cast(y, x_in.dtype, label + " (back to the input dtype)")
                g.drop(y)
                y = back
        else:
            f_linear = m.kind != "conv1d"
            wq = self.weight_for_matmul(w, label, f_linear)
            y = g.linear(xh, w, m.d_out, label, bias=bias, w_used=wq, out_dtype=self.amp, f_linear=f_linear,
                         x_saved=x_in)
            if wq is not None:
                g.drop(wq)
            if g.ds_linear and f_linear:  # its autocast copy of the input dies with the function's forward
                g.drop(xh)
                xh = None
        r = self.lora.get(full_name)
        if r and self.setup.lora is not None and self.setup.lora.dora:
            y = peft_methods.dora(self, x_in, y, r, m, label, w, bias)
        elif r:
            y = peft_methods.LORA_LIKE[self.setup.method](self, x_in, y, r, m, label)
        if x_in is not x:
            g.drop(x_in)
        if xh is not None:
            g.drop(xh)
        if ia3_ff is False:
            y = peft_methods.ia3_scale_output(self, y, full_name, m, label)
        return y

    def hooked_site(self) -> None:
        """A forward hook on the last ``linear``'s module returns an output that needs a gradient (an adapter): the
        hooks registered after it (DeepSpeed ZeRO-3's) see the module take part in the backward."""
        self.g.grad_uses.update(id(p.st) for p in self.last_linear if p is not None)

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
