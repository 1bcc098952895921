"""Exact parameter counts: the base model, and what each fine-tuning method adds and trains (pure).

Every number here is checked in tests against the model transformers builds on the meta device and against
peft's ``get_nb_trainable_parameters()``.
"""

from __future__ import annotations

import re

import functools
from dataclasses import dataclass

from ..config import AdapterVariant, IA3Spec, LoraSpec, Method, PromptLearningSpec, RunSetup
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
}
IA3_DEFAULT_FEEDFORWARD: dict[str, tuple[str, ...]] = {
    "bert": ("output.dense",), "roberta": ("output.dense",), "gpt2": ("mlp.c_proj",), "llama": ("down_proj",),
    "mistral": ("down_proj",), "qwen2": ("down_proj",), "qwen3": ("down_proj",), "gemma": ("down_proj",),
    "gemma2": ("down_proj",), "gemma3_text": ("down_proj",),
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


def resolve_lora_targets(spec: ModelSpec, lora: LoraSpec) -> tuple[tuple[str, Module], ...]:
    """The modules peft wraps with LoRA, with their shapes.

    Raises:
        ConfigError: no default targets for the model type, targets matching nothing, or matching a norm.
    """
    saved = modules_to_save(spec, lora.modules_to_save)
    targets = lora.targets
    if targets is None:
        if spec.model_type not in LORA_DEFAULT_TARGETS:
            raise ConfigError(
                f"peft has no default LoRA target modules for model_type '{spec.model_type}'; pass --lora-targets "
                f"(for example {ALL_LINEAR})"
            )
        targets = LORA_DEFAULT_TARGETS[spec.model_type]
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
    if not chosen:
        linear = sorted({n.split(".")[-1] for n in _linear_names(spec)})
        raise ConfigError(
            f"LoRA targets {', '.join(targets)} match no module of {spec.name}; its linear modules are: "
            f"{', '.join(linear)} (or use {ALL_LINEAR})"
        )
    return tuple(chosen)


def _lora_params(m: Module, r: int) -> tuple[int, int]:
    # Hu et al. 2021: W + B A with A: r x d_in, B: d_out x r. Embeddings: A: r x V, B: h x r (peft lora.Embedding).
    return r * (m.d_in + m.d_out), max(r * m.d_in, r * m.d_out)


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
    n = p.num_virtual_tokens
    if method is Method.prompt:  # peft PromptEmbedding: Embedding(n, token_dim)
        return n * spec.hidden_size, n * spec.hidden_size
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

    if method in (Method.lora, Method.qlora):
        lora = setup.lora or LoraSpec()
        chosen = resolve_lora_targets(spec, lora)
        for _, m in chosen:
            n, big = _lora_params(m, lora.r)
            added += n + (m.d_out if lora.dora else 0)  # DoRA: lora_magnitude_vector, one per output feature
            largest = max(largest, big)
        adapter_fp32 = added
        adapted = len(chosen)
        comps.append(("lora", added))
        if lora.bias == "all":  # every 'bias' tensor except the frozen originals of modules_to_save
            bias = sum(m.bias_params for n, m in named if not _saved_match(n, saved))
        elif lora.bias == "lora_only":
            bias = sum(m.bias_params for _, m in chosen)
        else:
            bias = 0
        trainable = added + bias
        if method is Method.qlora:
            # transformers' bitsandbytes integration converts every Linear/Conv1D except the output layer
            quantized = sum(m.weight_params for _, m in named if m.is_linear and m.role not in ("head", "classifier"))
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
    else:  # prefix / prompt
        p = setup.prompt or PromptLearningSpec()
        added, largest = _prompt_params(spec, method, p)
        adapter_fp32 = added  # peft builds the prompt encoder in fp32
        comps.append(("prompt encoder" if method is Method.prompt else "prefix encoder", added))
        trainable = added

    if method is not Method.adapter and method is not Method.bitfit:
        # peft modules_to_save (SEQ_CLS: the classifier): a trainable copy next to the frozen original
        added += copy_params
        trainable += copy_params
        largest = max(largest, copy_largest)
        if copy_params:
            comps.append(("modules_to_save copy", copy_params))
    total = base + added
    return ParamCounts(base, total, trainable, added, adapter_fp32, quantized, largest, adapted, tuple(comps))


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
            out = [(m.d_out if m.is_linear else m.d_in, m.d_in if m.is_linear else m.d_out, False)]
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
    if method in (Method.lora, Method.qlora):
        lora = setup.lora or LoraSpec()
        chosen = resolve_lora_targets(spec, lora)
        for _, m in chosen:
            d_in, d_out = (m.d_in, m.d_out)
            out += [(lora.r, d_in, True), (d_out, lora.r, True)] + ([(1, d_out, True)] if lora.dora else [])
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
    p = setup.prompt or PromptLearningSpec()
    n = p.num_virtual_tokens
    if method is Method.prompt:
        return tuple([(n, spec.hidden_size, True)] + copies)
    td = prefix_token_dim(spec)
    width = spec.num_layers * 2 * td
    if not p.projection:
        return tuple([(n, width, True)] + copies)
    hidden = p.projection_hidden or td
    out += [(n, td, True), (hidden, td, True), (1, hidden, True), (width, hidden, True), (1, width, True)]
    return tuple(out + copies)
