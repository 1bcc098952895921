"""Training FLOPs per step, aware of what trains, and model FLOPs utilisation (pure: no torch import).

Counting follows Kaplan et al. 2020 (Sec. 2.1, Table 1: C_forward = 2N per token, training = 6N per token
for full training) and Chowdhery et al. 2022 (PaLM, App. B: 6N + 12·L·H·Q·T per token, the second term for
the attention score and value matmuls). Only matmuls are counted (2 FLOPs per multiply-accumulate);
norms, activations, softmax and the optimizer are ignored, as in both papers.

Fine-tuning differs from pre-training in the backward pass. A matmul ``y = x·W`` costs 2·T·d_in·d_out
forward; backward computes ``dx = dy·Wᵀ`` only if ``x`` requires grad (something trainable lies below it) and
``dW = xᵀ·dy`` only if ``W`` is trainable. So full fine-tuning costs 3x forward (6N), while LoRA on a frozen
base skips every frozen weight's ``dW`` and every ``dx`` below the lowest trainable module: about 4N per
token rather than 6N. Bottleneck adapters and LoRA add their own (small) matmuls.

NB: attention is counted without causal halving (the score matrix is s x s even when half of it is masked;
PaLM does the same); activation-checkpointing recomputation is reported separately and is not part of the
model FLOPs used for MFU (PaLM App. B); the prefix encoder's MLP (prefix tuning with projection) and the
embedding lookups are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import LORA_FAMILY, PEFT_METHODS, IA3Spec, LoraSpec, Method, RunSetup
from ..errors import UnsupportedModelError
from ..spec import Family, ModelSpec
from . import params as _params
from .modules import Module, all_module_names, global_modules, layer_modules, layer_prefix

TFLOPS = 1e12


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step (one micro-batch), split by where they are spent."""

    forward_flops: int           # every matmul of the forward pass, attention scores and values included
    backward_input_flops: int    # dx = dy·Wᵀ (and attention's input grads), where x requires grad
    backward_weight_flops: int   # dW = xᵀ·dy for trainable weights only
    recompute_flops: int = 0     # activation checkpointing re-runs each block's forward (not model FLOPs)

    @property
    def total_flops(self) -> int:
        """Model FLOPs of the step (PaLM App. B: recomputation excluded), the numerator of MFU."""
        return self.forward_flops + self.backward_input_flops + self.backward_weight_flops

    @property
    def hardware_flops(self) -> int:
        """FLOPs the device executes, recomputation included."""
        return self.total_flops + self.recompute_flops


@dataclass(frozen=True)
class _Matmul:
    d_in: int
    d_out: int
    trainable: bool              # W gets a gradient
    input_grad: bool = False     # x requires grad whatever lies below (LoRA B: its input x·A depends on A)


@dataclass(frozen=True)
class _Node:
    """One step of a block's forward chain: matmuls reading the same input, or a parameter-only module."""

    matmuls: tuple[_Matmul, ...] = ()
    makes_grad: bool = False     # holds trainable parameters: its output requires grad from here on
    attention: bool = False      # the score/value matmuls (no weights)
    tokens: int | None = None    # tokens it runs on when not every token (BERT pooler/classifier: the CLS token)
    per_token: int = 1           # rows per token (MoE experts: each token's top-k (token, expert) pairs)


@dataclass(frozen=True)
class _Plan:
    """Which parameters train under the method, by full module name."""

    weights: frozenset[str]          # modules whose weight trains
    biases: frozenset[str]           # modules whose bias trains
    lora: dict[str, int]             # module -> rank
    ia3: dict[str, bool]             # module -> scales its input (feedforward) rather than its output
    adapters_after: frozenset[str]   # modules a bottleneck adapter follows
    adapter_r: int
    prefix: bool                     # trainable keys/values in every attention layer
    input_grad: bool                 # the embedding output requires grad (trainable embeddings, prompts, ...)


def _saved(name: str, names: tuple[str, ...]) -> bool:
    # peft _set_trainable: the module, anything ending in ".<name>", or anything under a top-level <name>
    return any(name == n or name.endswith("." + n) or name.split(".")[0] == n for n in names)


def _plan(spec: ModelSpec, setup: RunSetup) -> _Plan:
    named = all_module_names(spec)
    everything = frozenset(n for n, _ in named)
    biases = frozenset(n for n, m in named if m.bias)
    method = setup.method
    heads = frozenset(n for n, m in named if m.role == "classifier")
    weights: frozenset[str] = frozenset()
    bias_set: frozenset[str] = frozenset()
    lora: dict[str, int] = {}
    ia3: dict[str, bool] = {}
    adapters: frozenset[str] = frozenset()
    adapter_r = 0
    input_grad = setup.grad_checkpointing  # transformers enables input grads with checkpointing
    if method is Method.full:
        return _Plan(everything, biases, {}, {}, frozenset(), 0, False, True)
    if method in PEFT_METHODS and method is not Method.trainable_tokens:
        lora_spec = setup.lora or LoraSpec()
        saved = _params.modules_to_save(spec, lora_spec.modules_to_save if setup.lora else None)
        weights = frozenset(n for n in everything if _saved(n, saved))
        bias_set = frozenset(n for n in biases if _saved(n, saved))
    if method in LORA_FAMILY:
        # AdaLoRA and VeRA run two rank-r matmuls per target as LoRA does; LoHa and LoKr are counted by the same
        # rank-r path (their per-forward delta matmul at full weight size is not counted: a known gap)
        lora_spec = setup.lora or LoraSpec()
        chosen = _params.resolve_lora_targets(spec, lora_spec, method)
        lora = {n: lora_spec.r for n, _ in chosen}
        if lora_spec.bias == "all":
            bias_set |= biases
        elif lora_spec.bias == "lora_only":
            bias_set |= frozenset(n for n, m in chosen if m.bias)
        input_grad |= any(m.kind == "embedding" for _, m in chosen)
    elif method is Method.ia3:
        # peft IA3 target resolution lives in params (exact counts are tested there)
        ia3 = {n: ff for n, _, ff in _params.resolve_ia3_targets(spec, setup.ia3 or IA3Spec())}
    elif method in (Method.prompt, Method.p_tuning):
        input_grad = True
    elif method is Method.ln_tuning:
        tuned = frozenset(n for n, _ in _params.resolve_ln_targets(spec))
        weights |= tuned
        bias_set |= frozenset(n for n in tuned if n in biases)
    elif method is Method.adapter:
        ad = setup.adapter
        assert ad is not None
        adapter_r = ad.bottleneck_size(spec.hidden_size)
        roles = ("attn_out", "mlp_out") if ad.variant.value == "houlsby" else ("mlp_out",)
        prefix = layer_prefix(spec)
        sites = [m.name for m in layer_modules(spec) if m.role in roles]
        adapters = frozenset(prefix.format(i=i) + s for i in range(spec.num_layers) for s in sites)
        weights = heads
        bias_set = frozenset(n for n in biases if n in heads)
        if ad.train_norms:
            norms = frozenset(n for n, m in named if m.kind == "norm")
            weights |= norms
            bias_set |= frozenset(n for n in norms if n in biases)
    elif method is Method.bitfit:
        weights, bias_set = heads, biases
    return _Plan(weights, bias_set, lora, ia3, adapters, adapter_r, method is Method.prefix, input_grad)


def _module_node(full: str, m: Module, plan: _Plan, top_k: int = 1) -> list[_Node]:
    """The node of one module, plus the adapter node that follows it."""
    trains = full in plan.weights or full in plan.biases or full in plan.lora or full in plan.ia3
    nodes: list[_Node] = []
    if m.kind in ("router", "experts"):
        # sparse MoE: the router is one matmul per token; each fused expert weight runs on the top_k (token, expert)
        # rows (grouped_mm) as one d_in x d_out matmul per row. LoRA on it (peft ParamWrapper) merges B A into the
        # weight every forward and backpropagates through the merged weight: the weight gradient's matmul runs as
        # in full fine-tuning (the E * d_out * r * d_in merge itself is not counted: a known gap)
        mm = _Matmul(m.d_in, m.d_out, full in plan.weights or full in plan.lora)
        return [_Node((mm,), makes_grad=trains, per_token=top_k if m.kind == "experts" else 1)]
    if m.is_linear:
        mms = [_Matmul(m.d_in, m.d_out, full in plan.weights, input_grad=plan.ia3.get(full, False))]
        r = plan.lora.get(full)
        if r:  # Hu et al. 2021: h = W x + B A x, A: r x d_in, B: d_out x r
            mms += [_Matmul(m.d_in, r, True), _Matmul(r, m.d_out, True, input_grad=True)]
        nodes.append(_Node(tuple(mms), makes_grad=trains))
    else:
        mms = []
        r = plan.lora.get(full)
        if r and m.kind == "embedding":  # peft lora.Embedding: lookup in A, then B: r -> h
            mms = [_Matmul(r, m.d_out, True, input_grad=True)]
        nodes.append(_Node(tuple(mms), makes_grad=trains))
    if full in plan.adapters_after:
        h, r = m.d_out, plan.adapter_r  # Houlsby et al. 2019: x + up(act(down(x))), down: h -> r, up: r -> h
        nodes.append(_Node((_Matmul(h, r, True), _Matmul(r, h, True, input_grad=True)), makes_grad=True))
    return nodes


def _block_nodes(spec: ModelSpec, i: int, plan: _Plan) -> list[_Node]:
    """Block i's forward chain; the attention core sits between q/k/v (and their norms) and the out proj."""
    prefix = layer_prefix(spec).format(i=i)
    keyed: list[tuple[str | None, _Node]] = []
    for m in layer_modules(spec):
        if m.role == "attn_out":
            keyed.append((None, _Node(attention=True, makes_grad=plan.prefix)))
        own = _module_node(prefix + m.name, m, plan, spec.experts_per_tok or 1)
        key = m.role if m.is_linear and m.role in ("qkv", "mlp_in") else None
        keyed += [(key, own[0])] + [(None, n) for n in own[1:]]
    chain: list[tuple[str | None, _Node]] = []
    for key, node in keyed:
        if key is not None and chain and chain[-1][0] == key:  # q/k/v, gate/up: same input, one node
            prev = chain[-1][1]
            node = _Node(prev.matmuls + node.matmuls, makes_grad=prev.makes_grad or node.makes_grad)
            chain[-1] = (key, node)
        else:
            chain.append((key, node))
    return [node for _, node in chain]


def _head_nodes(spec: ModelSpec, plan: _Plan, b: int) -> list[_Node]:
    """Modules after the last block: final norm, pooler, classifier or LM head (a tied LM head is the
    embedding matrix: it trains with the embeddings, i.e. in full fine-tuning)."""
    out: list[_Node] = []
    for m in global_modules(spec):
        if m.kind == "embedding" or (spec.family is Family.bert and m.kind == "norm"):
            continue  # embeddings (and BERT's embedding LayerNorm) run before block 0
        nodes = _module_node(m.name, m, plan)
        if spec.family is Family.bert and m.is_linear:  # BERT pooler / RoBERTa head read the first token only
            nodes = [_Node(n.matmuls, n.makes_grad, tokens=b) for n in nodes]
        out += nodes
    return out


def _embedding_trains(spec: ModelSpec, plan: _Plan) -> bool:
    named = [(m.name, m) for m in global_modules(spec)]
    if spec.family is Family.bert:  # the embedding LayerNorm sits before block 0
        return any(n in plan.weights or n in plan.biases or n in plan.lora for n, m in named
                   if m.kind in ("embedding", "norm"))
    return any(n in plan.weights or n in plan.lora for n, m in named if m.kind == "embedding")


def step_flops(spec: ModelSpec, setup: RunSetup) -> StepFlops:
    """Training FLOPs of one optimizer step: ``setup.grad_accum`` micro-batches of ``setup.batch_size``
    sequences of ``setup.seq_len`` tokens (padding included: padded positions are computed like the others).

    Forward: 2·T·d_in·d_out per matmul (T tokens; the BERT pooler and classifier see one token per sequence)
    plus 2·2·b·s_q·s_k·(a·d) per block for attention scores and values (Kaplan et al. 2020; PaLM App. B).
    Backward: input grads for every matmul above the lowest trainable parameter (attention's input grads
    cost 2x its forward), weight grads only for trainable weights. Prompt tuning lengthens the sequence by
    its virtual tokens; prefix tuning lengthens the keys/values.

    Args:
        spec: a model of the bert, gpt2 or llama family.
        setup: method, batch size b, sequence length s, activation checkpointing.

    Returns:
        StepFlops in FLOPs (not FLOP/s).

    Raises:
        UnsupportedModelError: a family whose modules memprof does not list (``other``).
        ConfigError: the method's targets match nothing (as ``method_params``).
    """
    if spec.family is Family.other:
        raise UnsupportedModelError(f"{spec.name}: FLOPs are counted for the bert, gpt2 and llama families only")
    plan = _plan(spec, setup)
    b, s = setup.batch_size, setup.seq_len
    n_virtual = setup.prompt.num_virtual_tokens if setup.prompt is not None else 0
    s_q = s + setup.prepended_tokens
    s_k = s_q + (n_virtual if setup.method is Method.prefix else 0)
    tokens = b * s_q
    attn = 2 * 2 * b * s_q * s_k * spec.q_dim  # QKᵀ and P·V, no causal halving

    fwd = bwd_in = bwd_w = block_fwd = 0
    requires_grad = plan.input_grad or _embedding_trains(spec, plan)

    def run(nodes: list[_Node], rg: bool) -> tuple[bool, int, int, int]:
        f = di = dw = 0
        for node in nodes:
            if node.attention:
                f += attn
                if rg or node.makes_grad:
                    di += 2 * attn  # dQ, dK from the scores; dP, dV from the values
            t = node.tokens if node.tokens is not None else tokens * node.per_token
            for mm in node.matmuls:
                cost = 2 * t * mm.d_in * mm.d_out
                f += cost
                if rg or mm.input_grad:
                    di += cost
                if mm.trainable:
                    dw += cost
            rg = rg or node.makes_grad
        return rg, f, di, dw

    for i in range(spec.num_layers):
        requires_grad, f, di, dw = run(_block_nodes(spec, i, plan), requires_grad)
        fwd, bwd_in, bwd_w, block_fwd = fwd + f, bwd_in + di, bwd_w + dw, block_fwd + f
    _, f, di, dw = run(_head_nodes(spec, plan, b), requires_grad)
    fwd, bwd_in, bwd_w = fwd + f, bwd_in + di, bwd_w + dw
    k = setup.grad_accum  # an optimizer step runs K micro-batches
    return StepFlops(k * fwd, k * bwd_in, k * bwd_w, recompute_flops=k * block_fwd if setup.grad_checkpointing else 0)


def palm_flops_per_token(spec: ModelSpec, seq_len: int, matmul_params: int) -> int:
    """PaLM App. B model FLOPs per token of full training: 6N + 12·L·H·Q·T (N: matmul parameters)."""
    return 6 * matmul_params + 12 * spec.num_layers * spec.num_heads * spec.head_dim * seq_len


def mfu(flops_per_step: float, step_time_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak FLOP/s (PaLM App. B).

    Args:
        flops_per_step: model FLOPs of one step (``StepFlops.total_flops``).
        step_time_s: measured seconds per step.
        peak_flops: the device's dense peak in FLOP/s for the compute dtype (not TFLOP/s).
    """
    if step_time_s <= 0 or peak_flops <= 0:
        raise ValueError("step time and peak FLOP/s must be positive")
    return flops_per_step / step_time_s / peak_flops


def _normalise_gpu_name(name: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in name.lower())
    for prefix in ("nvidia-", "tesla-", "geforce-"):
        out = out.replace(prefix, "")
    return "-".join(part for part in out.split("-") if part)


def _bounded_in(needle: str, haystack: str) -> bool:
    return f"-{needle}-" in f"-{haystack}-"


def match_gpu(device_name: str) -> dict | None:
    """The GPU catalog row for a CUDA device name ("NVIDIA H100 80GB HBM3" -> H100-80GB), None if unknown.

    Names and aliases are matched as whole dash-separated words; the longest match wins, and between rows of
    the same chip (A100 40/80GB) the memory size in the device name decides.
    """
    from ..presets import gpu_catalog  # noqa: PLC0415 (loads gpus.json on demand)

    dev = _normalise_gpu_name(device_name)
    best: tuple[int, int, str] | None = None
    rows: dict[str, dict] = {}
    for alias, row in gpu_catalog().items():
        rows[row["name"]] = row
        name = _normalise_gpu_name(row["name"])
        chip = name.rsplit("-", 1)[0] if name.endswith("gb") and "-" in name else name
        size = name.rsplit("-", 1)[1] if name.endswith("gb") and "-" in name else ""
        for cand in (_normalise_gpu_name(alias), name, chip):
            if cand and _bounded_in(cand, dev):
                score = (len(cand), int(bool(size) and _bounded_in(size, dev)), row["name"])
                if best is None or score[:2] > best[:2]:
                    best = score
    return rows[best[2]] if best is not None else None


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of a CUDA device for a compute dtype (fp32 | bf16 | fp16) from the GPU catalog.

    fp32 is the non-tensor-core peak (torch does not use TF32 for matmuls unless asked). None when the
    device or the dtype's peak is unknown.
    """
    row = match_gpu(device_name)
    if row is None:
        return None
    tflops = row.get(f"peak_{dtype}_tflops")
    return float(tflops) * TFLOPS if tflops else None
