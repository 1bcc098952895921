"""Exact parameter counts: the base model, and what each fine-tuning method adds and trains (pure).

Every number here is checked in tests against the model transformers builds on the meta device and against
peft's ``get_nb_trainable_parameters()``.
"""

from __future__ import annotations

import re

import functools
from dataclasses import dataclass

from ..config import LORA_FAMILY, AdapterVariant, Device, IA3Spec, LoraSpec, Method, PromptLearningSpec, Regime, RunSetup
from ..errors import ConfigError
from ..spec import Family, ModelSpec
from .modules import Module, all_module_names, classifier_module_names, global_modules, layer_modules, tied_head

# peft.utils.constants (peft 0.21): default targets per model_type.
LORA_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"), "roberta": ("query", "value"), "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
}
IA3_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("key", "value", "output.dense"), "roberta": ("key", "value", "output.dense"),
    "gpt2": ("c_attn", "mlp.c_proj"), "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"), "qwen2": ("q_proj", "v_proj", "down_proj"),
    "qwen3": ("q_proj", "v_proj", "down_proj"), "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"), "gemma3_text": ("q_proj", "v_proj", "down_proj"),
    "mixtral": ("k_proj", "v_proj", "w2"),  # w2: transformers 4's expert, matching nothing in the fused experts
}
IA3_DEFAULT_FEEDFORWARD: dict[str, tuple[str, ...]] = {
    "bert": ("output.dense",), "roberta": ("output.dense",), "gpt2": ("mlp.c_proj",), "llama": ("down_proj",),
    "mistral": ("down_proj",), "qwen2": ("down_proj",), "qwen3": ("down_proj",), "gemma": ("down_proj",),
    "gemma2": ("down_proj",), "gemma3_text": ("down_proj",), "mixtral": ("w2",),
}
# Where another LoRA-like method's mapping differs from LoRA's (peft 0.21): AdaLoRA on RoBERTa adapts more, and
# has no default for Mistral. VeRA, LoHa and LoKr use LoRA's.
ADALORA_DEFAULT_TARGETS: dict[str, tuple[str, ...] | None] = {
    "roberta": ("query", "key", "value", "dense"), "mistral": None,
}
# peft 0.21 TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING; a model type without an entry makes peft ask
# for target_modules, and memprof names every normalisation layer of the model then.
LN_TUNING_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("ln_1", "ln_2", "ln_f"), "llama": ("input_layernorm", "post_attention_layernorm", "norm"),
    "mistral": ("input_layernorm", "post_attention_layernorm", "norm"), "qwen2": ("post_attention_layernorm",),
    "qwen3": ("post_attention_layernorm",), "gemma": ("input_layernorm", "post_attention_layernorm", "norm"),
    "gemma2": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"),
    "gemma3_text": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"),
}
# The layer kinds peft's LoRA-like layers wrap (their layer classes, peft 0.21), where narrower than LoRA's (linear,
# Conv1D, embedding): LyCORIS (LoHa, LoKr) has nn.Linear / Conv layers only, AdaLoRA and VeRA Linear and Conv1D.
ADAPTED_KINDS: dict[Method, tuple[str, ...]] = {
    Method.loha: ("linear",), Method.lokr: ("linear",), Method.adalora: ("linear", "conv1d"),
    Method.vera: ("linear", "conv1d"),
}
REGEX_PREFIX = "re:"  # a target given as a regular expression (peft: target_modules as one string)
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model under one method. ``total`` is what peft's counter reports."""

    base: int                         # the model as transformers builds it (tied weights once)
    total: int                        # after the method: base + added (4-bit weights counted unpacked)
    trainable: int
    added: int                        # new tensors: adapters, prompt encoders, modules_to_save copies
    adapter_fp32: int                 # trainable params peft keeps in fp32 on a half base (autocast_adapter_dtype)
    quantized: int                    # frozen weights stored 4-bit (QLoRA)
    largest_trainable_tensor: int     # numel of the biggest trainable tensor (per-tensor optimizer temporaries)
    adapted_modules: int              # modules the method wraps (LoRA/IA3 targets, adapter sites)
    components: tuple[tuple[str, int], ...]  # named parts summing to total
    buffers_fp32: int = 0             # frozen fp32 buffers the method adds (VeRA's shared projections): not params

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


@functools.cache
def base_param_components(spec: ModelSpec) -> tuple[tuple[str, int], ...]:
    """Base model parameters by part: embeddings, attention, mlp, norms, head (tied head counted zero)."""
    per_layer = {"attention": 0, "mlp": 0, "norms": 0}
    for m in layer_modules(spec):
        part = "norms" if m.kind == "norm" else ("attention" if m.role in ("qkv", "attn_out") else "mlp")
        per_layer[part] += m.params
    parts = {"embeddings": 0, **{k: v * spec.num_layers for k, v in per_layer.items()}, "head": 0}
    for m in global_modules(spec):
        if m.kind == "embedding":
            parts["embeddings"] += m.params
        elif m.kind == "norm":
            parts["norms"] += m.params
        elif not (m.role == "head" and tied_head(spec)):
            parts["head"] += m.params
    return tuple(parts.items())


def count_params(spec: ModelSpec) -> int:
    """Total parameters of the base model (meta-device ``sum(p.numel())``)."""
    return sum(n for _, n in base_param_components(spec))


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    # peft check_target_module_exists: a list matches the exact name or a ".target" suffix; a string (here
    # "re:<pattern>", from a peft config's target_modules string) is matched with re.fullmatch on the full name
    if len(targets) == 1 and targets[0].startswith(REGEX_PREFIX):
        return re.fullmatch(targets[0][len(REGEX_PREFIX):], name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def _saved_match(name: str, modules_to_save: tuple[str, ...]) -> bool:
    # peft: adapters never go on modules_to_save (regex (^|.*\.)m($|\..*)), simplified for plain names
    return any(name == m or name.startswith(m + ".") or f".{m}." in f".{name}." for m in modules_to_save)


def modules_to_save(spec: ModelSpec, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    return requested if requested is not None else classifier_module_names(spec)


def _copied_params(spec: ModelSpec, names: tuple[str, ...]) -> tuple[int, int]:
    """(params, largest tensor) of the modules peft wraps in ModulesToSaveWrapper (a trainable copy each).

    peft ``_set_trainable`` wraps every module whose name ends with a listed name; children of a wrapped
    module are not wrapped again.
    """
    total, largest = 0, 0
    for full, m in all_module_names(spec):
        top = full.split(".")[0]
        if any(full == n or full.endswith("." + n) or top == n for n in names) and not (m.role == "head" and tied_head(spec)):
            total += m.params
            largest = max(largest, m.weight_params)
    return total, largest


def _linear_names(spec: ModelSpec) -> list[str]:
    return [full for full, m in all_module_names(spec) if m.is_linear]


def resolve_lora_targets(spec: ModelSpec, lora: LoraSpec, method: Method = Method.lora
                         ) -> tuple[tuple[str, Module], ...]:
    """The modules peft wraps with LoRA (or the LoRA-like ``method``), with their shapes.

    Raises:
        ConfigError: no default targets for the model type, targets matching nothing, or matching a norm.
    """
    saved = modules_to_save(spec, lora.modules_to_save)
    targets = lora.targets
    if spec.num_experts:
        from .moe_targets import moe_lora_targets  # noqa: PLC0415 (it builds on this module's matching rules)

        return moe_lora_targets(spec, lora, method, saved)
    if targets is None:
        defaults = dict(LORA_DEFAULT_TARGETS)
        if method is Method.adalora:
            defaults.update(ADALORA_DEFAULT_TARGETS)
        targets = defaults.get(spec.model_type)
        if targets is None:
            raise ConfigError(
                f"peft has no default {method.value} target modules for model_type '{spec.model_type}'; pass "
                f"--lora-targets (for example {ALL_LINEAR})"
            )
    named = all_module_names(spec)
    if targets == (ALL_LINEAR,):
        # peft _maybe_include_all_linear_layers: every Linear/Conv1D except the output embedding (causal LM)
        # or the classifier (seq-cls)
        chosen = [(n, m) for n, m in named if m.is_linear and m.role not in ("head", "classifier")
                  and not _saved_match(n, saved)]
    else:
        chosen = [(n, m) for n, m in named if _matches(n, targets) and not _saved_match(n, saved)]
        bad = [n for n, m in chosen if m.kind == "norm"]
        if bad:
            raise ConfigError(f"LoRA target '{bad[0]}' is a normalisation layer; LoRA adapts linear and embedding modules")
    kinds = ADAPTED_KINDS.get(method, ())
    odd = [(n, m) for n, m in chosen if kinds and m.kind not in kinds]
    if odd:
        what = "a transformers Conv1D" if odd[0][1].kind == "conv1d" else f"an {odd[0][1].kind}"
        raise ConfigError(f"{method.value} target '{odd[0][0]}' is {what}; peft's {method.value} adapts "
                          f"{' and '.join(('nn.Linear', 'Conv1D')[:len(kinds)])} layers only (use --method lora)")
    if not chosen:
        linear = sorted({n.split(".")[-1] for n in _linear_names(spec)})
        raise ConfigError(
            f"LoRA targets {', '.join(targets)} match no module of {spec.name}; its linear modules are: "
            f"{', '.join(linear)} (or use {ALL_LINEAR})"
        )
    return tuple(chosen)


def lora_family_tensors(method: Method, m: Module, lora: LoraSpec) -> list[tuple[int, int]]:
    """The trainable tensors (rows, cols) a LoRA-like method adds to one target module, all fp32.

    LoRA (Hu et al. 2021): A r x d_in, B d_out x r (embeddings: A r x V, B h x r); DoRA adds a magnitude per output
    feature. AdaLoRA (peft adalora/layer.py): A, B and the singular values E (r x 1). VeRA (vera/layer.py): scales
    lambda_b (d_out) and lambda_d (r) over shared frozen projections. LoHa (loha/layer.py): two pairs
    w_a d_out x r, w_b r x d_in. LoKr (lokr/layer.py): kron(w1, w2) with w1 a x c full and w2 b x d, factored
    as w2_a b x r, w2_b r x d when r < max(b, d) / 2 (a*b = d_out, c*d = d_in, lokr_factors).
    """
    r, d_in, d_out = lora.r * m.rank_scale * m.count, m.d_in, m.d_out  # fused experts: r per expert
    if method is Method.adalora:
        return [(r, d_in), (d_out, r), (r, 1)]
    if method is Method.vera:
        return [(1, d_out), (1, r)]  # registered lambda_b first
    if method is Method.loha:
        return [(d_out, r), (r, d_in)] * 2
    if method is Method.lokr:
        (a, b), (c, d) = lokr_factors(d_out), lokr_factors(d_in)
        return [(a, c)] + ([(b, d)] if not r < max(b, d) / 2 else [(b, r), (r, d)])
    return [(r, d_in), (d_out, r)] + ([(1, d_out)] if lora.dora else [])


def adalora_ranknum_trains(setup: RunSetup) -> bool:
    """AdaLoRA's rank counter ``ranknum`` (one per target, created frozen on the CPU in fp32) trains whenever peft
    moves it to the base layer's device or dtype: ``_move_adapter_to_device_of_base_layer`` stores
    ``item.to(device, dtype)`` back into a ParameterDict, which wraps a new tensor as a Parameter with
    requires_grad=True (peft 0.21 tuners_utils.py). So it trains on CUDA or a half base, and stays frozen only on
    an fp32 CPU model."""
    return setup.device is not Device.cpu or setup.effective_regime in (Regime.pure, Regime.mixed)


def lokr_factors(dimension: int) -> tuple[int, int]:
    """peft lokr/layer.py ``factorization(dimension, factor=-1)``: the divisor pair (m <= n) nearest sqrt."""
    m, n = 1, dimension
    length = m + n  # peft never updates it: the walk goes on while m < n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def vera_projection_params(spec: ModelSpec, lora: LoraSpec) -> int:
    """VeRA's shared frozen projections (peft vera/model.py ``_init_vera_A_vera_B``): one vera_A r x max d_in and
    one vera_B max d_out x r over all targets, fp32 buffers on the device (not parameters)."""
    chosen = resolve_lora_targets(spec, lora, Method.vera)
    return lora.r * (max(m.d_in for _, m in chosen) + max(m.d_out for _, m in chosen))


def resolve_ln_targets(spec: ModelSpec) -> tuple[tuple[str, Module], ...]:
    """The normalisation layers LN tuning copies: peft's default for the model type, else every one."""
    names = LN_TUNING_DEFAULT_TARGETS.get(spec.model_type)
    norms = [(n, m) for n, m in all_module_names(spec) if m.kind == "norm"]
    return tuple((n, m) for n, m in norms if names is None or _matches(n, names))


def ln_tuning_target_names(spec: ModelSpec) -> list[str]:
    """target_modules memprof hands peft's LNTuningConfig (the leaf names of resolve_ln_targets)."""
    return sorted({n.split(".")[-1] for n, _ in resolve_ln_targets(spec)})


def resolve_ia3_targets(spec: ModelSpec, ia3: IA3Spec) -> tuple[tuple[str, Module, bool], ...]:
    targets = ia3.targets if ia3.targets is not None else IA3_DEFAULT_TARGETS.get(spec.model_type)
    ff = ia3.feedforward if ia3.feedforward is not None else IA3_DEFAULT_FEEDFORWARD.get(spec.model_type)
    if targets is None or ff is None:
        raise ConfigError(f"peft has no default IA3 target modules for model_type '{spec.model_type}'; "
                          "pass --ia3-targets and --ia3-feedforward")
    saved = modules_to_save(spec, None)
    out = []
    for name, m in all_module_names(spec):
        if not m.is_linear or not _matches(name, targets) or _saved_match(name, saved):
            continue
        out.append((name, m, _matches(name, ff)))
    if not out:
        raise ConfigError(f"IA3 targets {', '.join(targets)} match no linear module of {spec.name}")
    return tuple(out)


def prefix_token_dim(spec: ModelSpec) -> int:
    """peft _prepare_prompt_learning_config: GQA-aware width of one layer's prefix key (or value)."""
    return spec.kv_dim if spec.family is Family.llama else spec.hidden_size


def _prompt_params(spec: ModelSpec, method: Method, p: PromptLearningSpec) -> tuple[int, int]:
    n, h = p.num_virtual_tokens, spec.hidden_size
    if method is Method.prompt:  # peft PromptEmbedding: Embedding(n, token_dim)
        return n * h, n * h
    if method is Method.p_tuning:
        # peft PromptEncoder (MLP): Embedding(n, h) -> Linear(h, e) ReLU Linear(e, e) ReLU Linear(e, h)
        e = p.projection_hidden or h
        return n * h + (h * e + e) + (e * e + e) + (e * h + h), max(n * h, h * e, e * e)
    token_dim = prefix_token_dim(spec)
    width = spec.num_layers * 2 * token_dim  # keys and values for every layer
    if not p.projection:  # peft PrefixEncoder: Embedding(n, L * 2 * token_dim)
        return n * width, n * width
    hidden = p.projection_hidden or token_dim
    # Embedding(n, token_dim) -> Linear(token_dim, hidden) -> Tanh -> Linear(hidden, L * 2 * token_dim)
    total = n * token_dim + token_dim * hidden + hidden + hidden * width + width
    return total, hidden * width


@functools.lru_cache(maxsize=1024)
def method_params(spec: ModelSpec, setup: RunSetup) -> ParamCounts:
    """Total, trainable and added parameters of ``spec`` fine-tuned with ``setup.method``.

    Raises:
        ConfigError: the method trains nothing on this model, or its targets match nothing.
    """
    base = count_params(spec)
    comps = list(base_param_components(spec))
    method = setup.method
    named = all_module_names(spec)
    largest_weight = max(m.weight_params for _, m in named if not (m.role == "head" and tied_head(spec)))

    if method is Method.full:
        return ParamCounts(base, base, base, 0, 0, 0, largest_weight, 0, tuple(comps))

    trainable = added = adapter_fp32 = quantized = largest = adapted = 0
    saved = modules_to_save(spec, setup.lora.modules_to_save if setup.lora else None)
    copy_params, copy_largest = _copied_params(spec, saved)

    if method in LORA_FAMILY:
        lora = setup.lora or LoraSpec()
        chosen = resolve_lora_targets(spec, lora, method)
        for _, m in chosen:
            shapes = lora_family_tensors(method, m, lora)
            added += sum(r * c for r, c in shapes)
            largest = max([largest] + [r * c for r, c in shapes])
        if method is Method.adalora and adalora_ranknum_trains(setup):
            added += len(chosen)
        adapter_fp32 = added
        adapted = len(chosen)
        comps.append((method.value if method is not Method.qlora else "lora", added))
        if method is Method.adalora and not adalora_ranknum_trains(setup):
            added += len(chosen)  # the frozen ranknum
            comps.append(("adalora ranknum", len(chosen)))
        if lora.bias == "all":  # every 'bias' tensor except the frozen originals of modules_to_save
            bias = sum(m.bias_params for n, m in named if not _saved_match(n, saved))
        elif lora.bias == "lora_only":
            bias = sum(m.bias_params for _, m in chosen)
        else:
            bias = 0
        trainable = adapter_fp32 + bias
        if method is Method.qlora:
            # transformers' bitsandbytes integration converts every Linear/Conv1D except the output layer
            quantized = sum(m.weight_params for _, m in named if m.is_linear and m.role not in ("head", "classifier"))
    elif method is Method.ln_tuning:
        chosen = resolve_ln_targets(spec)
        added = trainable = sum(m.params for _, m in chosen)  # a trainable copy in the base dtype, original frozen
        largest = max(m.weight_params for _, m in chosen)
        adapted = len(chosen)
        comps.append(("ln tuning copies", added))
    elif method is Method.trainable_tokens:
        assert setup.trainable_tokens is not None
        embed = next(m for m in global_modules(spec) if m.role == "embed")
        added = adapter_fp32 = trainable = largest = setup.trainable_tokens.count * embed.d_out
        adapted = 1
        comps.append(("trainable tokens delta", added))
    elif method is Method.adapter:
        ad = setup.adapter
        assert ad is not None
        r = ad.bottleneck_size(spec.hidden_size)
        per_site = 2 * spec.hidden_size * r + r + spec.hidden_size  # down (h*r + r) + up (r*h + h)
        sites = (2 if ad.variant is AdapterVariant.houlsby else 1) * spec.num_layers
        added = adapter_fp32 = sites * per_site
        adapted = sites
        largest = spec.hidden_size * r
        comps.append(("adapters", added))
        norms = sum(m.params for _, m in named if m.kind == "norm") if ad.train_norms else 0
        head = _head_params(spec)
        trainable = added + norms + head[0]
        largest = max(largest, head[1])
    elif method is Method.bitfit:
        bias = sum(m.bias_params for _, m in named)
        head = _head_params(spec)
        head_bias = sum(m.bias_params for _, m in named if m.role == "classifier")
        trainable = bias - head_bias + head[0]
        largest = max([m.bias_params for _, m in named] + [head[1]])
        if trainable == 0:
            raise ConfigError(
                f"BitFit trains nothing on {spec.name}: it has no bias parameters and no task head "
                "(LLaMA-style models have no biases); choose another method"
            )
    elif method is Method.ia3:
        chosen3 = resolve_ia3_targets(spec, setup.ia3 or IA3Spec())
        for _, m, is_ff in chosen3:
            added += m.d_in if is_ff else m.d_out  # peft IA3: one scale per input (feedforward) or output feature
        adapter_fp32 = added
        adapted = len(chosen3)
        largest = max(m.d_in if ff else m.d_out for _, m, ff in chosen3)
        comps.append(("ia3", added))
        trainable = added
    else:  # prefix / prompt / p-tuning
        p = setup.prompt or PromptLearningSpec()
        added, largest = _prompt_params(spec, method, p)
        adapter_fp32 = added  # peft builds the prompt encoder in fp32
        comps.append(("prefix encoder" if method is Method.prefix else "prompt encoder", added))
        trainable = added

    if method not in (Method.adapter, Method.bitfit, Method.trainable_tokens):
        # peft modules_to_save (SEQ_CLS: the classifier): a trainable copy next to the frozen original
        added += copy_params
        trainable += copy_params
        largest = max(largest, copy_largest)
        if copy_params:
            comps.append(("modules_to_save copy", copy_params))
    total = base + added
    buffers = vera_projection_params(spec, setup.lora or LoraSpec()) if method is Method.vera else 0
    return ParamCounts(base, total, trainable, added, adapter_fp32, quantized, largest, adapted, tuple(comps), buffers)


def _head_params(spec: ModelSpec) -> tuple[int, int]:
    """(params, largest tensor) of the task head that non-peft methods train (seq-cls classifier only)."""
    mods = [m for m in global_modules(spec) if m.role == "classifier"]
    return sum(m.params for m in mods), max((m.weight_params for m in mods), default=0)


@functools.lru_cache(maxsize=256)
def trainable_tensors(spec: ModelSpec, setup: RunSetup) -> tuple[tuple[int, int, bool], ...]:
    """Every trainable tensor as (rows, cols, is_adapter): 1-D tensors have rows=1. ``is_adapter`` marks
    tensors a method adds (kept in fp32 on a half base); the others live in the base model's dtype.
    Their total equals ``method_params(spec, setup).trainable``; optimizers that factor or group by tensor
    (Adafactor, 8-bit AdamW, per-tensor temporaries) read shapes from here.
    """
    method = setup.method
    named = all_module_names(spec)

    def module_tensors(m: Module) -> list[tuple[int, int, bool]]:
        if m.kind == "norm":
            out = [(1, m.d_in, False)]
        else:
            by_out = m.is_linear or m.kind in ("router", "experts")  # (d_out, d_in) weights; experts stacked
            out = [(m.count * m.d_out if by_out else m.d_in, m.d_in if by_out else m.d_out, False)]
        if m.bias:
            out.append((1, m.d_out if m.kind != "norm" else m.d_in, False))
        return out

    def is_tied_head(m: Module) -> bool:
        return m.role == "head" and tied_head(spec)

    if method is Method.full:
        return tuple(t for _, m in named if not is_tied_head(m) for t in module_tensors(m))
    saved = modules_to_save(spec, setup.lora.modules_to_save if setup.lora else None)
    copies = [t for n, m in named if _saved_match(n, saved) and not is_tied_head(m) for t in module_tensors(m)]
    out: list[tuple[int, int, bool]] = []
    if method in LORA_FAMILY:
        lora = setup.lora or LoraSpec()
        chosen = resolve_lora_targets(spec, lora, method)
        ranknum = [(1, 1, True)] if method is Method.adalora and adalora_ranknum_trains(setup) else []
        for _, m in chosen:
            out += [(r, c, True) for r, c in lora_family_tensors(method, m, lora)] + ranknum
        if lora.bias == "all":
            out += [(1, m.bias_params, False) for n, m in named if m.bias and not _saved_match(n, saved)]
        elif lora.bias == "lora_only":
            out += [(1, m.bias_params, False) for _, m in chosen if m.bias]
        return tuple(out + copies)
    if method is Method.adapter:
        ad = setup.adapter
        assert ad is not None
        h, r = spec.hidden_size, ad.bottleneck_size(spec.hidden_size)
        sites = (2 if ad.variant is AdapterVariant.houlsby else 1) * spec.num_layers
        out += [(r, h, True), (1, r, True), (h, r, True), (1, h, True)] * sites
        if ad.train_norms:
            out += [t for _, m in named if m.kind == "norm" for t in module_tensors(m)]
        out += [t for _, m in named if m.role == "classifier" for t in module_tensors(m)]
        return tuple(out)
    if method is Method.bitfit:
        out += [(1, m.bias_params, False) for _, m in named if m.bias and m.role != "classifier"]
        out += [t for _, m in named if m.role == "classifier" for t in module_tensors(m)]
        return tuple(out)
    if method is Method.ia3:
        out += [(1, m.d_in if ff else m.d_out, True) for _, m, ff in resolve_ia3_targets(spec, setup.ia3 or IA3Spec())]
        return tuple(out + copies)
    if method is Method.ln_tuning:
        return tuple(t for _, m in resolve_ln_targets(spec) for t in module_tensors(m)) + tuple(copies)
    if method is Method.trainable_tokens:
        assert setup.trainable_tokens is not None
        embed = next(m for m in global_modules(spec) if m.role == "embed")
        return ((setup.trainable_tokens.count, embed.d_out, True),)
    p = setup.prompt or PromptLearningSpec()
    n, h = p.num_virtual_tokens, spec.hidden_size
    if method is Method.prompt:
        return tuple([(n, h, True)] + copies)
    if method is Method.p_tuning:
        e = p.projection_hidden or h
        return tuple([(n, h, True), (e, h, True), (1, e, True), (e, e, True), (1, e, True), (h, e, True), (1, h, True)]
                     + copies)
    td = prefix_token_dim(spec)
    width = spec.num_layers * 2 * td
    if not p.projection:
        return tuple([(n, width, True)] + copies)
    hidden = p.projection_hidden or td
    out += [(n, td, True), (hidden, td, True), (1, hidden, True), (width, hidden, True), (1, width, True)]
    return tuple(out + copies)
