"""Run options: what is trained, how, at which size. Frozen dataclasses plus one resolve function.

Precedence when resolving (``resolve_setup``): dataclass defaults < TOML file < explicit overrides (CLI flags).
Longer than 500 lines because every run option and the check of its values live here, one dataclass per group.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import ConfigError


class Dtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Regime(str, Enum):
    """How weights, gradients and optimizer states are stored (README, Precision regimes)."""

    fp32 = "fp32"    # everything fp32
    pure = "pure"    # model.to(half) + torch optimizer: weights, grads, states all in the half dtype
    amp = "amp"      # fp32 params/grads/states, autocast runs matmuls in half and caches half weight copies
    mixed = "mixed"  # ZeRO-paper mixed precision: half weights + fp32 master, half grads, fp32 states (16 B/param)


# --dtype alone picks a regime. fp16 -> amp: pure fp16 updates underflow without fp32 master weights, and
# HF Trainer(fp16=True) / accelerate --mixed_precision fp16 run autocast. bf16 -> pure: what model.to(bf16) +
# torch AdamW does, torchtune's default and peft's own benchmarks.
DEFAULT_REGIME = {Dtype.fp32: Regime.fp32, Dtype.bf16: Regime.pure, Dtype.fp16: Regime.amp}


class Method(str, Enum):
    full = "full"
    lora = "lora"
    qlora = "qlora"
    adapter = "adapter"   # bottleneck adapters (Houlsby / Pfeiffer), memprof's own modules
    bitfit = "bitfit"
    ia3 = "ia3"
    prefix = "prefix"
    prompt = "prompt"
    adalora = "adalora"                    # AdaLoRA (Zhang et al. 2023): SVD-form LoRA, rank budget reallocated
    vera = "vera"                          # VeRA (Kopiczko et al. 2024): shared frozen random A, B; trained scales
    loha = "loha"                          # LoHa (LyCORIS): Hadamard product of two low-rank products
    lokr = "lokr"                          # LoKr (LyCORIS): Kronecker product of two small factors
    ln_tuning = "ln-tuning"                # LN tuning (Zhao et al. 2024): trainable copies of the norm layers
    p_tuning = "p-tuning"                  # P-tuning (Liu et al. 2021): virtual tokens through an MLP encoder
    trainable_tokens = "trainable-tokens"  # peft trainable tokens: a trained delta for chosen embedding rows


# LoRA-like methods: each adapts the linear targets that [lora] names (r, alpha, dropout, targets,
# modules_to_save); each peft config's own default rank (AdaLoRA's init_r: the rank it starts from and holds).
LORA_FAMILY: dict[Method, int] = {Method.lora: 8, Method.qlora: 8, Method.adalora: 12, Method.vera: 256,
                                  Method.loha: 8, Method.lokr: 8}


class Optimizer(str, Enum):
    adamw = "adamw"
    adamw_8bit = "adamw-8bit"
    sgd = "sgd"
    sgd_momentum = "sgd-momentum"
    adafactor = "adafactor"
    lion = "lion"


class AttnImpl(str, Enum):
    auto = "auto"    # what transformers picks for the model: sdpa where it supports it, else eager (compat.py)
    eager = "eager"  # explicit b*a*s*s scores, softmax and dropout mask kept for backward
    sdpa = "sdpa"    # torch scaled_dot_product_attention; on CUDA a flash / mem-efficient kernel (no s^2 tensors)


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


class Loop(str, Enum):
    """The training loop around the model: it decides the optimizer kernel, when gradients are freed, what the
    loop keeps alive. Each field a loop sets can be overridden (``optimizer_impl``, ``zero_grad``, ...)."""

    torch = "torch"       # model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
    trainer = "trainer"   # transformers Trainer: adamw_torch_fused (torch >= 2.8), model.zero_grad(), loss / K


class OptimizerImpl(str, Enum):
    foreach = "foreach"    # _foreach_* over a (device, dtype) group: group-sized temporaries (torch's CUDA default)
    fused = "fused"        # one fused kernel, in place: no parameter-sized temporaries (Trainer's default AdamW)
    for_loop = "for-loop"  # one tensor at a time: temporaries of the largest tensors (torch's CPU default)


class ZeroGrad(str, Enum):
    none = "none"    # zero_grad(set_to_none=True): gradients freed after the step (torch >= 2.0, Trainer)
    zeros = "zeros"  # zero_grad(set_to_none=False): gradients kept between steps, zeroed in place


class AdapterVariant(str, Enum):
    houlsby = "houlsby"    # after attention output and after FFN output (Houlsby et al. 2019)
    pfeiffer = "pfeiffer"  # after FFN output only (Pfeiffer et al. 2020)


# A LoRA target naming fused expert weights (transformers 5 MoE models keep each block's experts as 3-D parameters,
# ``mlp.experts.gate_up_proj`` / ``down_proj``): peft adapts those through ``LoraConfig(target_parameters=...)``
# (its ParamWrapper), not target_modules. ``experts`` alone names every fused expert weight (compat.py expands it).
EXPERTS_TARGET = "experts"


def is_expert_target(name: str) -> bool:
    """``experts``, ``experts.gate_up_proj``, ``mlp.experts.down_proj``: a target that is a parameter, not a module."""
    return name == EXPERTS_TARGET or name.startswith(EXPERTS_TARGET + ".") or f".{EXPERTS_TARGET}." in name


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8                              # rank; adds r*(d_in+d_out) params per adapted linear
    alpha: int = 8                          # peft default lora_alpha
    dropout: float = 0.0                    # > 0 keeps one dropout output per adapted linear for backward
    targets: tuple[str, ...] | None = None  # None = peft's default for the model type; ("all-linear",) = every linear
    bias: str = "none"                      # none | all | lora_only (which biases train)
    modules_to_save: tuple[str, ...] | None = None  # None = peft's task default (classifier/score for seq-cls)
    dora: bool = False                      # DoRA (Liu et al. 2024): + a trainable magnitude per output feature

    def __post_init__(self) -> None:
        _check_field_types(self, "lora")
        _check_int("lora r", self.r, 1, 65536)
        _check_int("lora alpha", self.alpha, 1, 10**6)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"lora bias '{self.bias}' is not supported; choose one of: none, all, lora_only")
        if self.targets is not None and not self.targets:
            raise ConfigError("lora targets must name at least one module (or 'all-linear')")
        if self.targets is not None and any(is_expert_target(t) for t in self.targets) and (self.dropout or self.dora):
            # peft 0.21 lora/layer.py ParamWrapper raises for both
            raise ConfigError("LoRA on the fused expert weights (targets 'experts...') works without dropout and "
                              "without DoRA only (peft's ParamWrapper); set lora dropout to 0 and leave DoRA off")


@dataclass(frozen=True)
class QuantSpec:
    """bitsandbytes 4-bit storage of the frozen base linears (QLoRA, Dettmers et al. 2023)."""

    quant_type: str = "nf4"     # nf4 | fp4; both store 0.5 byte per weight
    double_quant: bool = True   # quantize the fp32 absmax constants to 8 bit (saves ~0.37 bit/param)
    blocksize: int = 64         # weights per absmax constant

    def __post_init__(self) -> None:
        _check_field_types(self, "quant")
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"quant type '{self.quant_type}' is not supported; choose one of: nf4, fp4")
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"quant blocksize must be a power of two in 64..4096, got {self.blocksize}")


DEFAULT_ADAPTER_BOTTLENECK = 64  # r = 64, one of the two sizes the Houlsby reports use (8 and 64)


@dataclass(frozen=True)
class AdapterSpec:
    variant: AdapterVariant = AdapterVariant.houlsby
    bottleneck: int | None = None      # r: hidden -> r -> hidden; None = hidden // reduction_factor, else 64
    reduction_factor: int | None = None
    activation: str = "relu"           # relu | gelu
    train_norms: bool = False          # also train the LayerNorm/RMSNorm weights (Houlsby trains them)

    def __post_init__(self) -> None:
        _check_field_types(self, "adapter")
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ConfigError("give the adapter bottleneck size or its reduction factor, not both")
        if self.bottleneck is not None:
            _check_int("adapter bottleneck", self.bottleneck, 1, 65536)
        if self.reduction_factor is not None:
            _check_int("adapter reduction factor", self.reduction_factor, 1, 65536)
        if self.activation not in ("relu", "gelu"):
            raise ConfigError(f"adapter activation '{self.activation}' is not supported; choose one of: relu, gelu")

    def bottleneck_size(self, hidden_size: int) -> int:
        if self.reduction_factor is not None:
            return max(1, hidden_size // self.reduction_factor)
        return self.bottleneck if self.bottleneck is not None else DEFAULT_ADAPTER_BOTTLENECK


@dataclass(frozen=True)
class IA3Spec:
    targets: tuple[str, ...] | None = None       # None = peft's default for the model type
    feedforward: tuple[str, ...] | None = None   # targets whose *input* is scaled; None = peft default

    def __post_init__(self) -> None:
        _check_field_types(self, "ia3")


@dataclass(frozen=True)
class PromptLearningSpec:
    """Prefix tuning (Li & Liang 2021) or prompt tuning (Lester et al. 2021), as peft builds them."""

    num_virtual_tokens: int = 20
    projection: bool = False                 # prefix only: reparameterise through a 2-layer MLP
    projection_hidden: int | None = None     # prefix projection width; None = token_dim (peft default)

    def __post_init__(self) -> None:
        _check_field_types(self, "prompt")
        _check_int("num virtual tokens", self.num_virtual_tokens, 1, 65536)
        if self.projection_hidden is not None:
            _check_int("prefix projection hidden size", self.projection_hidden, 1, 1 << 20)


@dataclass(frozen=True)
class TokensSpec:
    """peft trainable tokens: how many embedding rows train (their indices do not change the memory)."""

    count: int = 3

    def __post_init__(self) -> None:
        _check_field_types(self, "trainable_tokens")
        _check_int("trainable token count", self.count, 1, 1 << 22)


@dataclass(frozen=True)
class Overheads:
    """Memory outside tensors. Defaults are typical values; measure yours with `memprof measure` on the GPU."""

    cuda_context_bytes: int = 500 * 2**20  # CUDA context + cuBLAS/cuDNN handles: 0.3-1.4 GiB by GPU/driver
    allocator_reserve_frac: float = 0.05   # reserved minus allocated (caching allocator fragmentation), of peak
    cublas_workspace_bytes: int = 8 * 2**20  # per stream; allocated on the first matmul and kept

    def __post_init__(self) -> None:
        _check_field_types(self, "overheads")
        if self.cuda_context_bytes < 0 or self.cublas_workspace_bytes < 0:
            raise ConfigError("overhead sizes must be >= 0 bytes")
        if not 0.0 <= self.allocator_reserve_frac <= 1.0:
            raise ConfigError(f"allocator reserve fraction must be in [0, 1], got {self.allocator_reserve_frac}")


class Strategy(str, Enum):
    """How N data-parallel ranks hold the model states (README, Beyond one GPU; analytic/parallel.py)."""

    ddp = "ddp"                    # torch DistributedDataParallel: every state replicated, gradient buckets
    fsdp = "fsdp"                  # FSDP2 fully_shard, reshard_after_forward=True: params, grads, states sharded
    fsdp_grad_op = "fsdp-grad-op"  # FSDP2 reshard_after_forward=False: blocks stay unsharded forward to backward
    hsdp = "hsdp"                  # FSDP2 on a 2-D mesh: sharded within a shard group, replicated across groups
    zero1 = "zero1"                # DeepSpeed ZeRO stage 1: optimizer states (and fp32 masters) partitioned
    zero2 = "zero2"                # + gradients partitioned
    zero3 = "zero3"                # + parameters partitioned, gathered per module


class Offload(str, Enum):
    none = "none"
    optimizer = "optimizer"   # optimizer states (and fp32 masters, gradients' fp32 partition) in host memory
    params = "params"         # ZeRO-3 / FSDP CPUOffload: the parameter shards too


FSDP_STRATEGIES = (Strategy.fsdp, Strategy.fsdp_grad_op, Strategy.hsdp)
ZERO_STRATEGIES = (Strategy.zero1, Strategy.zero2, Strategy.zero3)
# ZeRO's buffer sizes, ParallelSpec fields (flag: --zero-...): (field, DeepSpeed zero_optimization key, label in
# ParallelSpec.describe, lowest value, ZeRO-3 only)
ZERO_BUFFERS: tuple[tuple[str, str, str, int, bool], ...] = (
    ("zero_bucket", "reduce_bucket_size", "bucket", 1, False),
    ("zero_prefetch", "stage3_prefetch_bucket_size", "prefetch", 0, True),
    ("zero_persistence", "stage3_param_persistence_threshold", "persistence", 0, True),
)
ZERO_BUFFER_FIELDS = tuple(name for name, *_ in ZERO_BUFFERS)
# ZeRO's on/off options, ParallelSpec fields (flag: --zero-... / --no-zero-...; None: DeepSpeed's default): (field,
# DeepSpeed zero_optimization key, also ParallelSpec.describe's label, ZeRO-3 only)
ZERO_SWITCHES: tuple[tuple[str, str, bool], ...] = (
    ("zero_overlap", "overlap_comm", False),
    ("zero_efficient_linear", "memory_efficient_linear", True),
)
ZERO_FIELDS = (*ZERO_BUFFER_FIELDS, *(name for name, *_ in ZERO_SWITCHES))  # every ZeRO option of ParallelSpec


@dataclass(frozen=True)
class ParallelSpec:
    """Data parallelism over ``world_size`` ranks (one GPU each): which engine shards what. ``nodes`` only splits the
    ranks into machines (HSDP's default shard group is one node's ranks); ``shard_size``: HSDP's shard group.

    ZeRO's buffer sizes, in elements, as a DeepSpeed config's ``zero_optimization`` names them; None is DeepSpeed's
    default (deepspeed/runtime/zero/config.py): ``zero_bucket`` reduce_bucket_size (5e8), ``zero_prefetch``
    stage3_prefetch_bucket_size (5e7), ``zero_persistence`` stage3_param_persistence_threshold (1e5). HF Trainer's
    "auto" values are hidden², 0.9 hidden² and 10 hidden (transformers/integrations/deepspeed.py)."""

    world_size: int = 1
    strategy: Strategy = Strategy.ddp
    offload: Offload = Offload.none
    nodes: int = 1
    shard_size: int | None = None
    zero_bucket: int | None = None
    zero_prefetch: int | None = None
    zero_persistence: int | None = None
    zero_overlap: bool | None = None   # overlap_comm (None: DeepSpeed's default, off below stage 3, on at stage 3)
    # ZeRO-3's memory_efficient_linear (None: DeepSpeed's default, on): torch's linear replaced by
    # LinearFunctionForZeroStage3 (zero/partition_parameters.py _enable_mem_efficient_linear)
    zero_efficient_linear: bool | None = None

    def __post_init__(self) -> None:
        for name, enum in (("strategy", Strategy), ("offload", Offload)):
            value = getattr(self, name)
            if not isinstance(value, enum):
                try:
                    object.__setattr__(self, name, enum(str(value).lower().replace("_", "-")
                                                        if enum is Strategy else str(value).lower()))
                except ValueError:
                    raise ConfigError(f"{name} '{value}' is not supported; choose one of: "
                                      f"{', '.join(m.value for m in enum)}") from None
        _check_int("world size", self.world_size, 1, 1 << 20)
        _check_int("nodes", self.nodes, 1, 1 << 16)
        if self.world_size % self.nodes:
            raise ConfigError(f"world size {self.world_size} is not a multiple of nodes {self.nodes} "
                              "(each node runs the same number of ranks)")
        if self.shard_size is not None:
            _check_int("shard size", self.shard_size, 1, self.world_size)
            if self.strategy is not Strategy.hsdp:
                raise ConfigError("shard size applies to --strategy hsdp only (the others shard over every rank)")
            if self.world_size % self.shard_size:
                raise ConfigError(f"hsdp shard size {self.shard_size} does not divide world size {self.world_size}")
        if self.offload is Offload.params and self.strategy not in (Strategy.fsdp, Strategy.fsdp_grad_op,
                                                                    Strategy.hsdp, Strategy.zero3):
            raise ConfigError(f"offload params needs sharded parameters (fsdp, fsdp-grad-op, hsdp, zero3), "
                              f"not {self.strategy.value}")
        if self.offload is Offload.optimizer and self.strategy is Strategy.ddp:
            raise ConfigError("offload optimizer applies to ZeRO (zero1/2/3) and FSDP (CPUOffload); DDP has none")
        for name, _key, _label, lo, stage3 in ZERO_BUFFERS:
            flag = "--" + name.replace("_", "-")
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, float) and value.is_integer():  # 5e8 as a TOML or JSON number
                value = int(value)
                object.__setattr__(self, name, value)
            _check_int(flag.lstrip("-").replace("-", " "), value, lo, 1 << 40)
            allowed = (Strategy.zero3,) if stage3 else ZERO_STRATEGIES
            if self.strategy not in allowed:
                raise ConfigError(f"{flag} applies to --strategy {' / '.join(s.value for s in allowed)} only, "
                                  f"not {self.strategy.value}")
        for name, _key, stage3 in ZERO_SWITCHES:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, bool):
                raise ConfigError(f"{name.replace('_', ' ')} must be true or false, not {value!r}")
            allowed = (Strategy.zero3,) if stage3 else ZERO_STRATEGIES
            if self.strategy not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} applies to --strategy "
                                  f"{' / '.join(s.value for s in allowed)} only, not {self.strategy.value}")

    @property
    def gpus_per_node(self) -> int:
        return self.world_size // self.nodes

    @property
    def shard_group(self) -> int:
        """Ranks one state is split over: all of them, HSDP's shard group (default: a node's ranks), 1 for DDP."""
        if self.strategy is Strategy.ddp:
            return 1
        if self.strategy is Strategy.hsdp:
            return self.shard_size if self.shard_size is not None else self.gpus_per_node
        return self.world_size

    def describe(self) -> str:
        """'fsdp x 8' / 'zero3 x 16 (2 nodes), offload optimizer': a run's parallel part in one phrase."""
        text = f"{self.strategy.value} x {self.world_size}"
        if self.nodes > 1:
            text += f" ({self.nodes} nodes)"
        if self.strategy is Strategy.hsdp:
            text += f", shard group {self.shard_group}"
        if self.offload is not Offload.none:
            text += f", offload {self.offload.value}"
        for name, _key, label, _lo, _stage3 in ZERO_BUFFERS:
            if getattr(self, name) is not None:
                text += f", {label} {getattr(self, name):.3g}"
        for name, key, _stage3 in ZERO_SWITCHES:
            if getattr(self, name) is not None:
                text += f", {key} {'on' if getattr(self, name) else 'off'}"
        return text


@dataclass(frozen=True)
class RunSetup:
    """One training step's configuration (everything except the model's architecture)."""

    method: Method = Method.full
    batch_size: int = 1                 # sequences per micro-batch (b)
    seq_len: int = 512                  # tokens per sequence (s); image-cls: the tokens of an image (memprof.images)
    dtype: Dtype = Dtype.bf16           # compute dtype; storage follows the regime
    regime: Regime | None = None        # None = DEFAULT_REGIME[dtype]
    optimizer: Optimizer = Optimizer.adamw
    attn_impl: AttnImpl = AttnImpl.auto  # eager keeps b*a*s*s scores; sdpa on CUDA keeps none
    device: Device = Device.cuda        # decides dropout-mask bytes and the optimizer's foreach temporaries
    grad_checkpointing: bool = False    # True keeps one input per layer, recomputes the layer in backward
    dropout: bool = True                # False = train with every dropout probability set to 0
    lora: LoraSpec | None = None        # method options; the method's own spec is filled in by resolve_setup
    quant: QuantSpec | None = None
    adapter: AdapterSpec | None = None
    ia3: IA3Spec | None = None
    prompt: PromptLearningSpec | None = None
    trainable_tokens: TokensSpec | None = None
    overheads: Overheads = field(default_factory=Overheads)
    # ---- the loop around the model (defaults: a plain torch loop, one micro-batch, no padding) ----------------
    loop: Loop = Loop.torch
    optimizer_impl: OptimizerImpl | None = None  # None = the loop's: torch foreach on CUDA / for-loop on CPU; Trainer fused
    zero_grad: ZeroGrad = ZeroGrad.none   # zeros keeps every gradient alive between steps
    grad_accum: int = 1                   # micro-batches per optimizer step (K): gradients held between them
    padded: bool = False                  # batches carry padding: a b x s mask reaches every attention layer
    keep_outputs: bool = False            # the loop holds the model output (logits) until backward ends
    use_cache: bool = False               # decoders build a KV cache in training (config.use_cache left on)
    image_size: int | None = None         # image-cls: pixels per side of the images (None: the config's image_size)
    # ---- beyond one device: per-rank memory under data parallelism (None: one device) -------------------------
    parallel: ParallelSpec | None = None

    def __post_init__(self) -> None:
        _check_int("batch size", self.batch_size, 1, 1 << 20)
        _check_int("sequence length", self.seq_len, 1, 1 << 22)
        _check_int("gradient accumulation steps", self.grad_accum, 1, 1 << 16)
        if self.image_size is not None:
            _check_int("image size", self.image_size, 1, 1 << 16)
        if self.parallel is not None and not isinstance(self.parallel, ParallelSpec):
            raise ConfigError(f"parallel must be a ParallelSpec, got {self.parallel!r}")
        _check_field_types(self, "")  # the booleans (a string "no" would be truthy)
        if self.optimizer_impl is OptimizerImpl.fused and self.optimizer not in FUSED_OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer.value} has no fused kernel; fused applies to: "
                              f"{', '.join(o.value for o in FUSED_OPTIMIZERS)}")
        if self.regime is Regime.fp32 and self.dtype is not Dtype.fp32:
            raise ConfigError(f"regime fp32 needs --dtype fp32, got {self.dtype.value}")
        if self.regime in (Regime.pure, Regime.amp, Regime.mixed) and self.dtype is Dtype.fp32:
            raise ConfigError(f"regime {self.regime.value} needs a half dtype (bf16 or fp16), got fp32")
        allowed = METHOD_OPTIONS[self.method]
        for name in OPTION_GROUPS:
            if getattr(self, name) is not None and name not in allowed:
                raise ConfigError(
                    f"{name} options do not apply to method '{self.method.value}'"
                    f" (they apply to: {', '.join(m.value for m, o in METHOD_OPTIONS.items() if name in o)})"
                )
        lora = self.lora
        if lora is not None and self.method not in (Method.lora, Method.qlora) and (lora.bias != "none" or lora.dora):
            raise ConfigError(f"lora {'bias' if lora.bias != 'none' else 'dora'} applies to lora and qlora only, "
                              f"not to {self.method.value} (its peft config has no such option)")

    @property
    def effective_regime(self) -> Regime:
        return self.regime if self.regime is not None else DEFAULT_REGIME[self.dtype]

    @property
    def world_size(self) -> int:
        return self.parallel.world_size if self.parallel is not None else 1

    @property
    def sharded_masters(self) -> bool:
        """FSDP in the mixed regime: FSDP2's mixed precision keeps fp32 parameters (sharded: they are the masters)
        and gathers them in the half dtype (MixedPrecisionPolicy), instead of half weights beside fp32 masters."""
        return (self.parallel is not None and self.parallel.strategy in FSDP_STRATEGIES
                and self.effective_regime is Regime.mixed)

    def on_one_device(self) -> RunSetup:
        """The same step on one device (what every rank computes under data parallelism)."""
        return dataclasses.replace(self, parallel=None) if self.parallel is not None else self

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def effective_optimizer_impl(self) -> OptimizerImpl:
        """The optimizer kernel the loop runs: the explicit one, else the loop's default (torch 2.13's
        _default_to_fused_or_foreach: foreach on CUDA, the for-loop on CPU; transformers' Trainer on torch >= 2.8:
        optim="adamw_torch_fused" for AdamW, torch's default otherwise)."""
        if self.optimizer_impl is not None:
            return self.optimizer_impl
        if self.loop is Loop.trainer and self.optimizer is Optimizer.adamw:
            return OptimizerImpl.fused
        if self.optimizer in (Optimizer.lion, Optimizer.adamw_8bit):
            return OptimizerImpl.for_loop  # memprof's Lion and bitsandbytes: one tensor at a time
        return OptimizerImpl.foreach if self.device is Device.cuda else OptimizerImpl.for_loop

    @property
    def grads_kept(self) -> bool:
        """Gradients exist before a backward starts: every micro-step after the first accumulates into them,
        and with zero_grad=zeros every step does (not in the mixed regime, whose step hands the half gradients to
        the fp32 masters and drops them)."""
        return self.grad_accum > 1 or (self.zero_grad is ZeroGrad.zeros and self.effective_regime is not Regime.mixed)

    @property
    def prepended_tokens(self) -> int:
        """Virtual tokens prompt tuning and P-tuning put in front of every sequence (they take positions too)."""
        if self.method in (Method.prompt, Method.p_tuning) and self.prompt is not None:
            return self.prompt.num_virtual_tokens
        return 0

    @property
    def builds_cache(self) -> bool:
        """transformers builds a DynamicCache in training only with use_cache on and no gradient checkpointing
        (checkpointed layers turn use_cache off, modeling_layers.py)."""
        return self.use_cache and not self.grad_checkpointing


def check_runnable(setup: RunSetup) -> None:
    """Combinations that are valid options but no training step runs as configured (checked by the estimators
    and the harness, so a sweep records them as n/a rows instead of stopping).

    Raises:
        ConfigError: prefix tuning with gradient checkpointing (transformers' GradientCheckpointingLayer sets
            past_key_values=None while training, modeling_layers.py, so the prefixes are dropped).
    """
    if setup.method is Method.prefix and setup.grad_checkpointing:
        raise ConfigError(
            "prefix tuning cannot run with gradient checkpointing: transformers drops the prefix cache "
            "(past_key_values=None) in checkpointed layers, so encoders ignore the prefixes and decoders fail; "
            "turn one of them off (prompt tuning works with checkpointing)")


# optimizers torch ships a fused kernel for (torch.optim AdamW and SGD, fused=True)
FUSED_OPTIMIZERS = (Optimizer.adamw, Optimizer.sgd, Optimizer.sgd_momentum)

# `memprof measure` on a CPU: a size a 2-core machine finishes in minutes, in fp32 (CPU bf16 matmuls are slow).
CPU_MEASURE_DEFAULTS: dict[str, Any] = {"dtype": Dtype.fp32, "batch_size": 8, "seq_len": 128}

# The RunSetup fields that hold one method's options
OPTION_GROUPS = ("lora", "quant", "adapter", "ia3", "prompt", "trainable_tokens")

# Methods peft builds (the others: full fine-tuning, memprof's bottleneck adapters, BitFit).
PEFT_METHODS: tuple[Method, ...] = tuple(m for m in Method if m not in (Method.full, Method.adapter, Method.bitfit))

# Which option groups each method reads; resolve_setup fills in the defaults for them.
METHOD_OPTIONS: dict[Method, tuple[str, ...]] = {
    Method.full: (),
    Method.lora: ("lora",),
    Method.qlora: ("lora", "quant"),
    Method.adapter: ("adapter",),
    Method.bitfit: (),
    Method.ia3: ("ia3",),
    Method.prefix: ("prompt",),
    Method.prompt: ("prompt",),
    Method.adalora: ("lora",),
    Method.vera: ("lora",),
    Method.loha: ("lora",),
    Method.lokr: ("lora",),
    Method.ln_tuning: (),
    Method.p_tuning: ("prompt",),
    Method.trainable_tokens: ("trainable_tokens",),
}
_DEFAULT_OPTIONS = {"lora": LoraSpec, "quant": QuantSpec, "adapter": AdapterSpec, "ia3": IA3Spec,
                    "prompt": PromptLearningSpec, "trainable_tokens": TokensSpec}


def method_option_defaults(method: Method, group: str) -> dict[str, Any]:
    """Option values a method's peft config defaults differently from the group's dataclass (the rank)."""
    return {"r": LORA_FAMILY[method]} if group == "lora" and method in LORA_FAMILY else {}


def with_method_defaults(setup: RunSetup) -> RunSetup:
    """Fill the option groups the method reads with their defaults (an unset LoraSpec for LoRA, ...)."""
    missing = {name: _DEFAULT_OPTIONS[name](**method_option_defaults(setup.method, name))
               for name in METHOD_OPTIONS[setup.method] if getattr(setup, name) is None}
    return dataclasses.replace(setup, **missing) if missing else setup


def _check_int(what: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{what} must be between {lo} and {hi}, got {value}")


def check_timeout(timeout_s: float | None) -> None:
    """A timeout is a finite number of seconds > 0 (NaN would never fire; 0 would kill every run)."""
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not math.isfinite(timeout_s) or timeout_s <= 0):
        raise ConfigError(f"--timeout must be a number of seconds > 0, got {timeout_s!r}")


def _check_field_types(obj: Any, what: str) -> None:
    """Every bool, str, number and name-list field of an options dataclass holds that type: a string "no" is not
    a boolean (it would be truthy), a float is not a count, NaN is not a number. Enum and nested option fields
    are parsed by memprof.resolve."""
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), str(f.type).replace(" ", "")
        name = f"{what} {f.name.replace('_', ' ')}".strip()
        if value is None and kind.endswith("|None"):
            continue
        base = kind.removesuffix("|None")
        if base == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        if base == "str" and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        if base == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if base == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                or not math.isfinite(value)):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if base == "tuple[str,...]" and (not isinstance(value, tuple)
                                         or not all(isinstance(v, str) and v for v in value)):
            raise ConfigError(f"{name} must be a list of module names, got {value!r}")


def __getattr__(name: str):  # noqa: ANN202 - kept importable from here: resolution moved to memprof.resolve
    if name in ("resolve_setup", "parse_enum", "resolve_measured", "read_config_file"):
        from . import resolve

        return getattr(resolve, name)
    raise AttributeError(f"module 'memprof.config' has no attribute {name!r}")
