"""ModelSpec: a model's architecture as plain numbers, normalised from a Hugging Face config dict (pure).

Families memprof describes analytically:
- ``bert``: BERT/RoBERTa encoders (MHA, GELU MLP, post-LayerNorm, learned positions, token types).
- ``gpt2``: GPT-2 decoders (Conv1D projections, pre-LayerNorm, learned positions, tied LM head).
- ``llama``: LLaMA-style decoders (GQA, gated MLP, RMSNorm, RoPE): llama, mistral, qwen2, qwen3, gemma,
  gemma2, gemma3_text, phi3. Other architectures go through the traced estimator (``--trace``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Mapping

from .errors import ConfigError, MemprofError, UnsupportedModelError


class Family(str, Enum):
    bert = "bert"
    gpt2 = "gpt2"
    llama = "llama"
    other = "other"  # only the traced estimator and measurements can describe it


class Task(str, Enum):
    seq_cls = "seq-cls"      # sequence classification head (num_labels)
    causal_lm = "causal-lm"  # next-token prediction over the vocabulary
    token_cls = "token-cls"  # a label per token (NER-style; *ForTokenClassification): traced, not modelled
    qa = "qa"                # extractive question answering (start / end logits; *ForQuestionAnswering): traced
    seq2seq = "seq2seq"      # encoder-decoder generation (T5, BART; *ForConditionalGeneration): traced
    image_cls = "image-cls"  # image classification (ViT; *ForImageClassification), sized by image: traced


# tasks the analytic families describe; the others are traced (memprof trace / estimate --trace)
ANALYTIC_TASKS = (Task.seq_cls, Task.causal_lm)
ENCODER_DECODER_TYPES = ("t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "led", "longt5", "switch_transformers")


FAMILY_OF_MODEL_TYPE: dict[str, Family] = {
    "bert": Family.bert, "roberta": Family.bert,
    "gpt2": Family.gpt2,
    "llama": Family.llama, "mistral": Family.llama, "qwen2": Family.llama, "qwen3": Family.llama,
    "gemma": Family.llama, "gemma2": Family.llama, "gemma3_text": Family.llama, "phi3": Family.llama,
    "mixtral": Family.llama, "qwen2_moe": Family.llama, "olmoe": Family.llama,
}
SUPPORTED_MODEL_TYPES = ", ".join(sorted(FAMILY_OF_MODEL_TYPE))

# attention types of transformers' config.layer_types
FULL, SLIDING = "full_attention", "sliding_attention"
# model types whose config has a layer_types list (the others apply one window to every block, or none)
LAYER_TYPED = ("qwen2", "qwen3", "gemma2", "gemma3_text")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers. Symbols follow Korthikanti et al. 2022: h, a, L, V, s, b."""

    name: str
    model_type: str                 # HF model_type ("llama", "roberta", ...)
    family: Family
    vocab_size: int                 # V
    hidden_size: int                # h
    num_layers: int                 # L
    num_heads: int                  # a
    num_kv_heads: int               # grouped-query attention: k/v heads (= a for MHA)
    head_dim: int                   # d (h / a unless the config overrides it)
    intermediate_size: int          # MLP width I (4h for BERT/GPT-2)
    max_positions: int              # learned position table rows (BERT/GPT-2); RoPE models learn none
    task: Task = Task.causal_lm
    num_labels: int = 2             # seq-cls head outputs
    hidden_act: str = "gelu"
    gated_mlp: bool = False         # SwiGLU/GeGLU: gate and up projections (3 matrices instead of 2)
    norm: str = "layernorm"         # layernorm (weight + bias) | rmsnorm (weight only)
    type_vocab_size: int = 0        # BERT token-type embeddings
    tie_embeddings: bool = True     # LM head shares the input embedding matrix
    qkv_bias: bool = True
    o_bias: bool = True
    mlp_bias: bool = True
    qk_norm: bool = False           # per-head RMSNorm on q and k (qwen3, gemma3)
    sandwich_norm: bool = False     # extra post-attention / pre- and post-FFN norms (gemma2, gemma3)
    fused_qkv: bool = False         # one qkv_proj and one gate_up_proj module (phi3)
    rotary_cat: bool = False        # apply_rotary_pos_emb ends in torch.cat with the pass-through part (phi3)
    embed_scale: bool = False       # embeddings multiplied by sqrt(h) (gemma)
    attn_softcap: float | None = None   # tanh soft-capping of attention scores (gemma2)
    final_softcap: float | None = None  # tanh soft-capping of logits (gemma2)
    sliding_window: int | None = None  # keys a sliding-window layer attends to (mistral, qwen2/3, gemma2/3, phi3)
    layer_types: tuple[str, ...] = ()  # per block: "full_attention" | "sliding_attention" (empty: all full)
    rope_per_layer_type: bool = False  # one rotary table per layer type (gemma3: local and global bases)
    num_experts: int = 0            # a sparse MoE block instead of the MLP (spec_variants.py; 0: the dense MLP):
    experts_per_tok: int = 0        # experts per token, of width moe_intermediate_size, the top-k weights
    moe_intermediate_size: int = 0  # renormalised when norm_topk_prob; shared_expert_size: Qwen2-MoE's shared
    norm_topk_prob: bool = True     # expert, scaled by a sigmoid gate
    shared_expert_size: int = 0
    qk_norm_full: bool = False      # olmoe: q/k norms over the whole projection (not per head)
    hidden_dropout: float = 0.0     # residual-branch dropout probability
    attention_dropout: float = 0.0  # dropout on attention probabilities
    embedding_dropout: float = 0.0
    classifier_dropout: float = 0.0
    source: str = "preset"          # preset | file | hub | params
    hf_config: Mapping[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        for what in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size"):
            value = getattr(self, what)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model {what} must be a positive integer, got {value!r}"[:200])
            limit = MAX_LAYERS if what == "num_layers" else MAX_SIZE
            if value > limit:  # a record or spec from a file: the estimator's work grows with the depth
                raise ConfigError(f"model {what} = {value} is beyond any real model (memprof accepts at most "
                                  f"{limit:,})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    def layer_type(self, i: int) -> str:
        """Block ``i``'s attention type, as transformers' ``config.layer_types`` names it."""
        return self.layer_types[i] if self.layer_types else FULL

    def with_layers(self, num_layers: int, layer_types: tuple[str, ...] | None = None) -> "ModelSpec":
        """The same architecture at another depth (used to trace a few layers and extrapolate). ``layer_types``:
        the blocks' attention types at that depth (default: the first ``num_layers`` of the model's)."""
        cfg = dict(self.hf_config or {})
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in cfg:
                cfg[key] = num_layers
        types = self.layer_types
        if types:
            types = tuple(layer_types) if layer_types is not None else types[:num_layers]
            if len(types) != num_layers:
                raise ValueError(f"{len(types)} layer types for {num_layers} layers")
        if self.model_type in LAYER_TYPED and (types or "layer_types" in cfg):
            # the config names each block's type and transformers checks its length against the depth
            cfg["layer_types"] = list(types or (FULL,) * num_layers)
        return replace(self, num_layers=num_layers, layer_types=types, hf_config=cfg or None)

    def with_task(self, task: Task, num_labels: int | None = None) -> "ModelSpec":
        return replace(self, task=task, num_labels=num_labels or self.num_labels)

    def to_hf_config(self) -> dict[str, Any]:
        """The config dict transformers builds this spec from (the loaded one, or one synthesised)."""
        if self.hf_config is not None:
            return dict(self.hf_config)
        if self.family is not Family.llama:
            raise UnsupportedModelError(f"{self.name} has no config to build from")
        return {
            "model_type": "llama", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "max_position_embeddings": 131072, "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": self.hidden_act, "rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False,
        }


def position_limit(spec: ModelSpec) -> int | None:
    """Longest sequence a model with learned position tables accepts (None: RoPE models have no table).
    RoBERTa numbers positions from padding_idx + 1, so two rows of its table are never used."""
    if spec.family in (Family.bert, Family.gpt2):
        return spec.max_positions - (2 if spec.model_type == "roberta" else 0)
    return None


def check_sequence_length(spec: ModelSpec, tokens: int) -> None:
    """Raise ConfigError if ``tokens`` (sequence + virtual tokens) exceeds the learned position table."""
    limit = position_limit(spec)
    if limit is not None and tokens > limit:
        raise ConfigError(f"sequence length {tokens} exceeds {spec.name}'s {limit} learned positions; "
                          f"use --seq-len {limit} or less")


def _get(cfg: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


# Bounds on a config's sizes, far beyond any released model (Llama 3.1 405B: 126 layers, h=16384, 128k vocab):
# a larger value is a typo or hostile input, and the estimator's work grows with the depth.
MAX_LAYERS = 4096
MAX_SIZE = 1 << 24


def _require(cfg: Mapping[str, Any], name: str, *keys: str) -> int:
    value = _get(cfg, *keys)
    if value is None:
        raise ConfigError(f"config of {name} has none of the keys {', '.join(keys)}")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"config of {name}: {keys[0]} must be a positive integer, got {value!r}")
    limit = MAX_LAYERS if "layer" in keys[0] else MAX_SIZE
    if value > limit:
        raise ConfigError(f"config of {name}: {keys[0]} = {value} is beyond any real model (memprof accepts at most "
                          f"{limit:,})")
    return value


def _int(cfg: Mapping[str, Any], name: str, key: str, default: int, minimum: int = 1) -> int:
    """An optional integer field: absent or null gives ``default``; otherwise an int in [minimum, MAX_SIZE]."""
    value = _get(cfg, key, default=default)
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= MAX_SIZE:
        raise ConfigError(f"config of {name}: {key} must be an integer between {minimum} and {MAX_SIZE:,}, "
                          f"got {value!r}"[:200])
    return value


def _prob(cfg: Mapping[str, Any], name: str, key: str, default: float) -> float:
    """A dropout probability: a finite number in [0, 1] (transformers' nn.Dropout refuses anything else)."""
    value = _get(cfg, key, default=default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"config of {name}: {key} must be a probability in [0, 1], got {value!r}"[:200])
    return float(value)


def _flag(cfg: Mapping[str, Any], name: str, key: str, default: bool) -> bool:
    """A boolean field: JSON true or false only (the string "false" is truthy and would flip the option)."""
    value = _get(cfg, key, default=default)
    if not isinstance(value, bool):
        raise ConfigError(f"config of {name}: {key} must be true or false, got {value!r}"[:200])
    return value


def default_task(cfg: Mapping[str, Any]) -> Task:
    """Encoders get a seq-cls head, decoders a causal-LM head, encoder-decoders seq2seq, vision encoders image-cls."""
    model_type = cfg.get("model_type")
    if model_type in ENCODER_DECODER_TYPES or cfg.get("is_encoder_decoder"):
        return Task.seq2seq
    if "vocab_size" not in cfg and "image_size" in cfg and "num_channels" in cfg:  # a vision encoder (ViT)
        return Task.image_cls
    return Task.seq_cls if model_type in ("bert", "roberta") else Task.causal_lm


def config_num_labels(cfg: Mapping[str, Any]) -> int:
    """Classes of the config's head: its id2label's size, else its num_labels (as transformers reads them), else 2."""
    if isinstance(cfg.get("id2label"), dict) and cfg["id2label"]:
        return len(cfg["id2label"])
    value = cfg.get("num_labels")
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SIZE else 2


def from_hf_config(cfg: Mapping[str, Any], name: str, source: str = "file", task: Task | None = None,
                   num_labels: int | None = None) -> ModelSpec:
    """Normalise a Hugging Face config dict into a ModelSpec.

    Args:
        cfg: the parsed config.json (``model_type`` required).
        name: how the model is called in reports.
        source: preset | file | hub | params (provenance, shown in reports).
        task: head to put on top; default seq-cls for encoders, causal-lm for decoders.
        num_labels: classifier outputs for seq-cls (default: the config's id2label size or 2).

    Raises:
        UnsupportedModelError: model_type missing or outside the analytic families.
        ConfigError: a required size is missing or not a positive integer.
    """
    if "text_config" in cfg and "model_type" not in cfg.get("text_config", {}):
        raise UnsupportedModelError(f"{name}: multimodal configs are not supported; pass the text model's config")
    model_type = cfg.get("model_type")
    if not model_type:
        raise UnsupportedModelError(f"{name}: config has no 'model_type'; is it a transformers config.json?")
    if not isinstance(model_type, str):
        raise ConfigError(f"{name}: model_type must be a string, got {model_type!r}"[:200])
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg = {**cfg, "model_type": model_type}
    family = FAMILY_OF_MODEL_TYPE.get(model_type)
    task = task or default_task(cfg)
    if num_labels is None:
        num_labels = config_num_labels(cfg)
    if family is None:
        raise UnsupportedModelError(
            f"{name}: model_type '{model_type}' is outside the analytic families; supported: {SUPPORTED_MODEL_TYPES}"
            " (use --trace for any architecture transformers can build)"
        )
    if task not in ANALYTIC_TASKS:
        raise UnsupportedModelError(
            f"{name}: the {task.value} task is traced, not modelled analytically; use memprof trace or "
            "estimate --trace")
    builder = {Family.bert: _bert, Family.gpt2: _gpt2, Family.llama: _llama}[family]
    try:
        return builder(cfg, name, source, task, num_labels)
    except MemprofError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a field of the wrong type or shape
        raise ConfigError(f"config of {name}: a field has the wrong type or value ({type(exc).__name__}: "
                          f"{str(exc)[:120]})") from None


def _bert(cfg: Mapping[str, Any], name: str, source: str, task: Task, num_labels: int) -> ModelSpec:
    if task is not Task.seq_cls:
        raise UnsupportedModelError(f"{name}: encoders are described with a seq-cls head only")
    h = _require(cfg, name, "hidden_size")
    a = _require(cfg, name, "num_attention_heads")
    if h % a:
        raise ConfigError(f"config of {name}: hidden_size {h} is not divisible by num_attention_heads {a}")
    hidden_dropout = _prob(cfg, name, "hidden_dropout_prob", 0.1)
    classifier_dropout = _prob(cfg, name, "classifier_dropout", hidden_dropout)
    return ModelSpec(
        name=name, model_type=cfg["model_type"], family=Family.bert,
        vocab_size=_require(cfg, name, "vocab_size"), hidden_size=h,
        num_layers=_require(cfg, name, "num_hidden_layers"), num_heads=a, num_kv_heads=a, head_dim=h // a,
        intermediate_size=_require(cfg, name, "intermediate_size"),
        max_positions=_require(cfg, name, "max_position_embeddings"), task=task, num_labels=num_labels,
        hidden_act=str(_get(cfg, "hidden_act", default="gelu")), norm="layernorm",
        type_vocab_size=_int(cfg, name, "type_vocab_size", 2, minimum=0), tie_embeddings=False,
        hidden_dropout=hidden_dropout, attention_dropout=_prob(cfg, name, "attention_probs_dropout_prob", 0.1),
        embedding_dropout=hidden_dropout, classifier_dropout=classifier_dropout,
        source=source, hf_config=cfg,
    )


def _gpt2(cfg: Mapping[str, Any], name: str, source: str, task: Task, num_labels: int) -> ModelSpec:
    h = _require(cfg, name, "n_embd", "hidden_size")
    a = _require(cfg, name, "n_head", "num_attention_heads")
    if h % a:
        raise ConfigError(f"config of {name}: n_embd {h} is not divisible by n_head {a}")
    return ModelSpec(
        name=name, model_type="gpt2", family=Family.gpt2,
        vocab_size=_require(cfg, name, "vocab_size"), hidden_size=h,
        num_layers=_require(cfg, name, "n_layer", "num_hidden_layers"), num_heads=a, num_kv_heads=a, head_dim=h // a,
        intermediate_size=_int(cfg, name, "n_inner", 4 * h),
        max_positions=_require(cfg, name, "n_positions", "max_position_embeddings"), task=task, num_labels=num_labels,
        hidden_act=str(_get(cfg, "activation_function", default="gelu_new")), norm="layernorm",
        tie_embeddings=_flag(cfg, name, "tie_word_embeddings", True),
        hidden_dropout=_prob(cfg, name, "resid_pdrop", 0.1),
        attention_dropout=_prob(cfg, name, "attn_pdrop", 0.1),
        embedding_dropout=_prob(cfg, name, "embd_pdrop", 0.1),
        source=source, hf_config=cfg,
    )


# Per model_type facts the configs don't spell out (read from transformers' modeling files).
_LLAMA_VARIANTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},                                   # Qwen2Attention: bias on q, k, v only
    "qwen3": {"qk_norm": True},
    "gemma": {"embed_scale": True, "tie": True},
    "gemma2": {"embed_scale": True, "tie": True, "sandwich_norm": True},
    "gemma3_text": {"embed_scale": True, "tie": True, "sandwich_norm": True, "qk_norm": True},
    "phi3": {"fused_qkv": True, "rotary_cat": True},
    "mixtral": {"moe": True},                                      # MixtralSparseMoeBlock instead of the MLP
    "qwen2_moe": {"moe": True, "qkv_bias": True}, "olmoe": {"moe": True, "qk_norm": True},  # olmoe: whole-width
}


def _llama(cfg: Mapping[str, Any], name: str, source: str, task: Task, num_labels: int) -> ModelSpec:
    from .spec_variants import moe_fields, softcap  # noqa: PLC0415 (they read configs with this module's helpers)
    model_type = cfg["model_type"]
    variant = _LLAMA_VARIANTS[model_type]
    h = _require(cfg, name, "hidden_size")
    a = _require(cfg, name, "num_attention_heads")
    kv = _int(cfg, name, "num_key_value_heads", a)
    head_dim = _get(cfg, "head_dim")
    if head_dim is not None:
        head_dim = _int(cfg, name, "head_dim", 0)
    else:
        if h % a:
            raise ConfigError(f"config of {name}: hidden_size {h} is not divisible by num_attention_heads {a}")
        head_dim = h // a
    attention_bias = _flag(cfg, name, "attention_bias", False)
    act = str(_get(cfg, "hidden_activation", "hidden_act", default="silu"))
    if model_type.startswith("gemma") and act == "gelu":
        act = "gelu_pytorch_tanh"  # transformers maps the legacy "gelu" of Gemma configs to the tanh approximation
    # transformers' config defaults: untied for llama/mistral/qwen/phi3, tied for gemma
    tie = _flag(cfg, name, "tie_word_embeddings", variant.get("tie", False))
    resid_dropout = _prob(cfg, name, "resid_pdrop", 0.0)
    layers = _require(cfg, name, "num_hidden_layers")
    window, types = _attention_types(cfg, name, model_type, layers)
    moe = moe_fields(cfg, name, task.value) if variant.get("moe") else {}
    qkv_bias = attention_bias or moe.pop("qkv_bias", variant.get("qkv_bias", False))
    return ModelSpec(
        name=name, model_type=model_type, family=Family.llama,
        vocab_size=_require(cfg, name, "vocab_size"), hidden_size=h,
        num_layers=layers, num_heads=a, num_kv_heads=kv, head_dim=int(head_dim),
        intermediate_size=_require(cfg, name, "intermediate_size"),
        max_positions=_int(cfg, name, "max_position_embeddings", 2048), task=task, num_labels=num_labels,
        hidden_act=act, gated_mlp=True, norm="rmsnorm", tie_embeddings=tie,
        qkv_bias=qkv_bias, o_bias=attention_bias,
        mlp_bias=_flag(cfg, name, "mlp_bias", False),
        qk_norm=variant.get("qk_norm", False), sandwich_norm=variant.get("sandwich_norm", False),
        fused_qkv=variant.get("fused_qkv", False), rotary_cat=variant.get("rotary_cat", False),
        embed_scale=variant.get("embed_scale", False), **moe,
        sliding_window=window, layer_types=types, rope_per_layer_type=model_type == "gemma3_text" and len(set(types)) > 1,
        attn_softcap=softcap(cfg, name, "attn_logit_softcapping", model_type),
        final_softcap=softcap(cfg, name, "final_logit_softcapping", model_type),
        hidden_dropout=resid_dropout, attention_dropout=_prob(cfg, name, "attention_dropout", 0.0),
        embedding_dropout=_prob(cfg, name, "embd_pdrop", 0.0),
        source=source, hf_config=cfg,
    )


# transformers 5.23's config defaults: sliding_window (MistralConfig, Qwen2/3Config, Gemma2/3TextConfig: 4096;
# Phi3Config: None), Qwen2/3Config.max_window_layers 28, Gemma3TextConfig's sliding_window_pattern 6
_WINDOW_DEFAULT = {"mistral": 4096, "qwen2": 4096, "qwen3": 4096, "gemma2": 4096, "gemma3_text": 4096}


def _attention_types(cfg: Mapping[str, Any], name: str, model_type: str, layers: int
                     ) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers' config classes derive them (configuration_*.py
    __post_init__): Mistral and Phi-3 window every block when sliding_window is set; Qwen2/3 window the blocks
    from max_window_layers on when use_sliding_window; Gemma-2 alternates sliding and full from the first block;
    Gemma-3 makes every sliding_window_pattern-th block full. An explicit ``layer_types`` list wins."""
    if model_type not in _WINDOW_DEFAULT and model_type not in ("phi3", "mixtral"):
        return None, ()
    window = cfg.get("sliding_window", _WINDOW_DEFAULT.get(model_type))
    if model_type in ("qwen2", "qwen3") and not _flag(cfg, name, "use_sliding_window", False):
        window = None
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= MAX_SIZE):
        raise ConfigError(f"config of {name}: sliding_window must be a positive integer or null, got {window!r}"[:200])
    given = cfg.get("layer_types")
    if model_type in LAYER_TYPED and given is not None:
        if (not isinstance(given, list) or len(given) != layers
                or not all(t in (FULL, SLIDING) for t in given)):
            raise ConfigError(f"config of {name}: layer_types must list {layers} of {FULL!r} / {SLIDING!r}, got "
                              f"{given!r}"[:200])
        types = tuple(given)
    elif model_type in ("mistral", "phi3", "mixtral"):
        types = (SLIDING,) * layers if window is not None else ()
    elif model_type in ("qwen2", "qwen3"):
        first = _int(cfg, name, "max_window_layers", 28, minimum=0)
        types = tuple(SLIDING if window is not None and i >= first else FULL for i in range(layers))
    elif model_type == "gemma2":
        types = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(layers))
    else:
        pattern = _int(cfg, name, "sliding_window_pattern", 6)
        types = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(layers))
    if SLIDING in types and window is None:
        raise ConfigError(f"config of {name}: sliding_attention layers need a sliding_window")
    if model_type in ("qwen2", "qwen3") and SLIDING not in types:
        types = ()
    return window, types


def parse_config_json(text: str, where: str) -> dict[str, Any]:
    """Parse config.json text, raising ConfigError with the location of a syntax error."""
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a model config") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


# Real LLaMA-family shapes used to synthesise a model from a parameter count (--params N). Each row is a
# published config (name, h, I, a, kv, L, V, tied). The shape nearest to N (in log params) is taken and its
# depth scaled so the total lands within 2% of N.
LLAMA_SHAPES: tuple[tuple[str, int, int, int, int, int, int, bool], ...] = (
    ("HuggingFaceTB/SmolLM2-135M", 576, 1536, 9, 3, 30, 49152, True),
    ("HuggingFaceTB/SmolLM2-360M", 960, 2560, 15, 5, 32, 49152, True),
    ("meta-llama/Llama-3.2-1B", 2048, 8192, 32, 8, 16, 128256, True),
    ("meta-llama/Llama-3.2-3B", 3072, 8192, 24, 8, 28, 128256, True),
    ("meta-llama/Llama-3.1-8B", 4096, 14336, 32, 8, 32, 128256, False),
    ("meta-llama/Llama-2-13b-hf", 5120, 13824, 40, 40, 40, 32000, False),
    ("Qwen/Qwen2.5-32B", 5120, 27648, 40, 8, 64, 152064, False),
    ("meta-llama/Llama-3.1-70B", 8192, 28672, 64, 8, 80, 128256, False),
    ("meta-llama/Llama-3.1-405B", 16384, 53248, 128, 8, 126, 128256, False),
)
MIN_SYNTH_PARAMS = 50_000_000
MAX_SYNTH_PARAMS = 2_000_000_000_000


def _llama_params(h: int, inter: int, a: int, kv: int, layers: int, vocab: int, tied: bool) -> tuple[int, int]:
    d = h // a
    per_layer = h * a * d + 2 * h * kv * d + a * d * h + 3 * h * inter + 2 * h  # q, k, v, o, gate/up/down, 2 norms
    fixed = vocab * h * (1 if tied else 2) + h                                    # embeddings (+ head) + final norm
    return fixed, per_layer


def synthesize_from_params(n_params: float, name: str | None = None) -> tuple[ModelSpec, str]:
    """A LLaMA-like ModelSpec with about ``n_params`` parameters, and the real shape it was scaled from.

    Raises:
        ConfigError: n_params outside [5e7, 2e12], or no depth lands within 2%.
    """
    if not (isinstance(n_params, (int, float)) and math.isfinite(n_params)):
        raise ConfigError(f"--params must be a number, got {n_params!r}")
    if not MIN_SYNTH_PARAMS <= n_params <= MAX_SYNTH_PARAMS:
        raise ConfigError(f"--params must be between {MIN_SYNTH_PARAMS:.0e} and {MAX_SYNTH_PARAMS:.0e}, got {n_params:.3g}")
    candidates = []
    for shape in LLAMA_SHAPES:
        ref, h, inter, a, kv, layers, vocab, tied = shape
        fixed, per_layer = _llama_params(h, inter, a, kv, layers, vocab, tied)
        depth = max(1, round((n_params - fixed) / per_layer))
        total = fixed + depth * per_layer
        error = abs(total - n_params) / n_params
        distance = abs(math.log((fixed + layers * per_layer) / n_params))
        candidates.append((error > 0.02, distance, shape, depth, total))
    candidates.sort(key=lambda c: (c[0], c[1]))
    missed, _, (ref, h, inter, a, kv, _layers, vocab, tied), depth, total = candidates[0]
    if missed:
        raise ConfigError(f"no LLaMA-like depth lands within 2% of {n_params:.3g} parameters")
    spec = ModelSpec(
        name=name or f"llama-like-{n_params:.3g}", model_type="llama", family=Family.llama, vocab_size=vocab,
        hidden_size=h, num_layers=depth, num_heads=a, num_kv_heads=kv, head_dim=h // a, intermediate_size=inter,
        max_positions=131072, task=Task.causal_lm, hidden_act="silu", gated_mlp=True, norm="rmsnorm",
        tie_embeddings=tied, qkv_bias=False, o_bias=False, mlp_bias=False, source="params",
    )
    return spec, ref
