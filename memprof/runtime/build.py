"""Build what a training step needs: the model with its fine-tuning method, the optimizer, a synthetic batch.

Shared by the measurement harness (real tensors) and the traced estimator (meta -> fake tensors), so a trace,
a measurement and the estimator's parameter counts describe the same model. Imports the torch stack.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..analytic.params import LN_TUNING_DEFAULT_TARGETS, ln_tuning_target_names
from ..compat import NO_SDPA_WHY, lora_targets, resolve_attention
from ..config import LORA_FAMILY, PEFT_METHODS, AttnImpl, Dtype, LoraSpec, Method, Optimizer, OptimizerImpl, Regime, RunSetup, check_runnable
from ..errors import ConfigError, DependencyMissingError, DeviceUnavailableError
from ..images import IMAGE_HEADS, image_batch, saved_head
from ..spec import Family, ModelSpec, Task, check_sequence_length
from .adapters import add_bottleneck_adapters, is_norm_module

TORCH_DTYPE = {Dtype.fp32: torch.float32, Dtype.bf16: torch.bfloat16, Dtype.fp16: torch.float16}
SEQ_CLS_HEADS = ("classifier", "score")


def storage_dtype(setup: RunSetup) -> torch.dtype:
    """dtype the base weights are stored in: half for pure/mixed/qlora, fp32 for fp32 and AMP."""
    regime = setup.effective_regime
    if regime in (Regime.pure, Regime.mixed) and not setup.sharded_masters:  # FSDP mixed: fp32 parameters
        return TORCH_DTYPE[setup.dtype]
    return torch.float32


def autocast_dtype(setup: RunSetup) -> torch.dtype | None:
    return TORCH_DTYPE[setup.dtype] if setup.effective_regime is Regime.amp else None


def hf_config_for(spec: ModelSpec, setup: RunSetup):  # noqa: ANN201 (transformers.PretrainedConfig)
    """The transformers config object for ``spec``: task head, labels, dropout switch, attention kernel."""
    from transformers import AutoConfig

    cfg = spec.to_hf_config()
    model_type = cfg.pop("model_type")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if not setup.dropout:
        for key, value in list(cfg.items()):
            if ("dropout" in key or "pdrop" in key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                cfg[key] = 0.0
    if spec.task in (Task.seq_cls, Task.token_cls, Task.image_cls):
        cfg["num_labels"] = spec.num_labels
        cfg.pop("id2label", None)
        cfg.pop("label2id", None)
        if cfg.get("pad_token_id") is None and spec.family is not Family.bert and spec.task is not Task.image_cls:
            # decoders pick the last non-pad token; with no pad id they refuse batches > 1
            cfg["pad_token_id"] = cfg.get("eos_token_id") if isinstance(cfg.get("eos_token_id"), int) else 0
    cfg["use_cache"] = setup.use_cache  # transformers turns it off itself in checkpointed layers
    if setup.image_size is not None:  # image-cls: the model built at the run's image size (memprof.images)
        cfg["image_size"] = setup.image_size
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"transformers cannot build model_type '{model_type}': {exc}") from None
    config._attn_implementation = _attn_argument(setup)
    return config


def _attn_argument(setup: RunSetup) -> str | None:
    """transformers' attn_implementation: None lets it pick (memprof's auto), as a plain from_pretrained does."""
    return None if setup.attn_impl is AttnImpl.auto else setup.attn_impl.value


def resolve_attention_of_class(spec: ModelSpec, setup: RunSetup) -> tuple[RunSetup, str | None]:
    """compat.resolve_attention with the model class's own ``_supports_sdpa`` (any architecture transformers
    builds; the analytic estimate reads compat.NO_SDPA_TYPES, which a test keeps equal to these flags).

    Raises:
        LibraryRefusalError: ``--attn sdpa`` on a model class without SDPA.
        ConfigError: transformers cannot build the config.
    """
    if setup.attn_impl is AttnImpl.eager:
        return setup, None
    import transformers

    config = hf_config_for(spec, setup)
    auto = getattr(transformers, AUTO_CLASS[spec.task])
    try:
        cls = auto._model_mapping[type(config)]
    except KeyError:
        raise ConfigError(f"transformers has no {AUTO_CLASS[spec.task]} for model_type '{spec.model_type}'") from None
    why = NO_SDPA_WHY.get(spec.model_type, f"{cls.__name__} sets _supports_sdpa = False")
    return resolve_attention(spec, setup, supports_sdpa=bool(cls._supports_sdpa), why=why)


def build_base_model(spec: ModelSpec, setup: RunSetup, device: str | torch.device = "meta",
                     pretrained: str | None = None) -> nn.Module:
    """The transformers model with its task head, in the regime's storage dtype, on ``device``.

    ``pretrained`` loads real weights (local path or hub cache); otherwise weights are random (memory and
    time do not depend on weight values).
    """
    import transformers

    config = hf_config_for(spec, setup)
    auto = getattr(transformers, AUTO_CLASS[spec.task])
    dtype = storage_dtype(setup)
    if setup.method is Method.qlora:
        dtype = TORCH_DTYPE[setup.dtype]
    if pretrained is not None:
        try:
            model = auto.from_pretrained(pretrained, config=config, dtype=dtype,
                                         attn_implementation=_attn_argument(setup))
        except OSError as exc:
            raise ConfigError(f"cannot load pretrained weights from '{pretrained}': {exc}") from None
        return model.to(device)
    with torch.device(device):
        try:
            model = auto.from_config(config, dtype=dtype, attn_implementation=_attn_argument(setup))
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"transformers cannot build {spec.name}: {exc}") from None
    return model


AUTO_CLASS = {Task.seq_cls: "AutoModelForSequenceClassification", Task.causal_lm: "AutoModelForCausalLM",
              Task.token_cls: "AutoModelForTokenClassification", Task.qa: "AutoModelForQuestionAnswering",
              Task.seq2seq: "AutoModelForSeq2SeqLM", Task.image_cls: "AutoModelForImageClassification"}
PEFT_TASK = {Task.seq_cls: "SEQ_CLS", Task.causal_lm: "CAUSAL_LM", Task.token_cls: "TOKEN_CLS",
             Task.qa: "QUESTION_ANS", Task.seq2seq: "SEQ_2_SEQ_LM", Task.image_cls: None}  # peft has no image task
HEADS = {Task.seq_cls: ("classifier", "score"), Task.token_cls: ("classifier", "score"), Task.qa: ("qa_outputs",),
         Task.image_cls: IMAGE_HEADS}


def _peft_task(spec: ModelSpec) -> str | None:
    return PEFT_TASK[spec.task]


def peft_config_for(spec: ModelSpec, setup: RunSetup):  # noqa: ANN201 (peft.PeftConfig)
    """The peft config memprof uses for a peft-backed method (LoRA, QLoRA, IA3, prefix, prompt)."""
    import peft

    task = _peft_task(spec)
    method = setup.method
    if method in LORA_FAMILY:
        return _lora_family_config(spec, setup, task)
    if method is Method.ln_tuning:
        # peft's own default where it has one (LN_TUNING_DEFAULT_TARGETS mirrors it), else every norm layer
        names = None if spec.model_type in LN_TUNING_DEFAULT_TARGETS or spec.family is Family.other \
            else ln_tuning_target_names(spec)  # an architecture outside the families: peft's default or its refusal
        return peft.LNTuningConfig(task_type=task, target_modules=names, modules_to_save=saved_head(spec))
    if method is Method.p_tuning:
        p = setup.prompt
        assert p is not None
        return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=p.num_virtual_tokens,
                                        encoder_hidden_size=p.projection_hidden or spec.hidden_size)
    if method is Method.trainable_tokens:
        assert setup.trainable_tokens is not None
        return peft.TrainableTokensConfig(task_type=task, token_indices=list(range(setup.trainable_tokens.count)))
    if method is Method.ia3:
        ia3 = setup.ia3
        return peft.IA3Config(
            task_type=task,
            target_modules=list(ia3.targets) if ia3 and ia3.targets else None,
            feedforward_modules=list(ia3.feedforward) if ia3 and ia3.feedforward else None,
            modules_to_save=saved_head(spec),
        )
    if method is Method.prefix:
        p = setup.prompt
        assert p is not None
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=p.num_virtual_tokens,
                                       prefix_projection=p.projection, encoder_hidden_size=p.projection_hidden)
    if method is Method.prompt:
        p = setup.prompt
        assert p is not None
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=p.num_virtual_tokens)
    raise ConfigError(f"method '{method.value}' is not built with peft")


def _lora_family_config(spec: ModelSpec, setup: RunSetup, task: str):  # noqa: ANN202 (peft.PeftConfig)
    """LoRA, QLoRA, AdaLoRA, VeRA, LoHa, LoKr from the [lora] options: rank, alpha, dropout, targets,
    modules_to_save (and LoRA's bias and DoRA)."""
    import peft

    lora = setup.lora or LoraSpec()
    chosen = lora_targets(spec, setup)  # names, "all-linear", None (peft's default), + fused expert weights
    targets: Any = list(chosen.modules) if isinstance(chosen.modules, tuple) else chosen.modules
    saved = list(lora.modules_to_save) if lora.modules_to_save is not None else saved_head(spec)
    common = {"task_type": task, "target_modules": targets, "modules_to_save": saved}
    if setup.method in (Method.lora, Method.qlora):
        return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                               use_dora=lora.dora, target_parameters=list(chosen.parameters) or None, **common)
    if setup.method is Method.adalora:
        # the rank schedule (target_r, total_step) masks singular values and never resizes a tensor in a step:
        # it changes no memory. total_step has no default in peft 0.21; any positive length builds the same model.
        return peft.AdaLoraConfig(init_r=lora.r, target_r=min(8, lora.r), total_step=1000, lora_alpha=lora.alpha,
                                  lora_dropout=lora.dropout, **common)
    if setup.method is Method.vera:
        return peft.VeraConfig(r=lora.r, vera_dropout=lora.dropout, **common)
    if setup.method is Method.loha:
        return peft.LoHaConfig(r=lora.r, alpha=lora.alpha, **common)
    return peft.LoKrConfig(r=lora.r, alpha=lora.alpha, **common)


def load_peft_config(path: str | Path):  # noqa: ANN201
    """A peft config object from a JSON file or a saved adapter directory (``PeftConfig.save_pretrained``)."""
    import peft

    from ..peft_input import load_peft_config as load_json

    data = load_json(path)
    peft_type = str(data.get("peft_type", "")).upper()
    mapping = peft.PEFT_TYPE_TO_CONFIG_MAPPING
    if peft_type not in mapping:
        raise ConfigError(f"peft config {path}: peft_type '{data.get('peft_type')}' is not one of: "
                          f"{', '.join(sorted(mapping))}")
    try:
        config = mapping[peft_type].from_peft_type(**data) if hasattr(mapping[peft_type], "from_peft_type") \
            else mapping[peft_type](**{k: v for k, v in data.items() if k != "peft_type"})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"peft config {path} is invalid: {' '.join(str(exc).split())[:300]}") from None
    except ImportError as exc:  # an option that needs an optional package (LoftQ init: scipy; AdaMSS: scikit-learn)
        from .refusals import missing_package

        error = missing_package(exc, f"peft config {path}")
        if error is None:
            raise
        raise error from None
    _check_hub_resources(config, path)
    return config


def _check_hub_resources(config: Any, path: str | Path) -> None:
    """A peft config that loads files by name when applied (prompt tuning initialised from text loads its
    tokenizer) is checked now: an unreachable hub would otherwise be retried for a minute inside the run."""
    init = getattr(config, "prompt_tuning_init", None)
    tokenizer = getattr(config, "tokenizer_name_or_path", None)
    if str(getattr(init, "value", init)).upper() == "TEXT" and tokenizer:
        from ..hub import check_pretrained

        check_pretrained(str(tokenizer), what=f"peft config {path}: tokenizer_name_or_path",
                         filename="tokenizer_config.json")


def check_peft_config(spec: ModelSpec, setup: RunSetup, path: str | Path) -> None:
    """Everything a measurement would find wrong with ``--peft-config`` before its worker starts: the file, the
    packages and hub files its options need, and peft applying it to the model (targets that match nothing,
    feedforward modules outside the targets), on the meta device, which allocates nothing.

    Raises:
        ConfigError, DependencyMissingError, LibraryRefusalError: what the run would have failed with.
    """
    import warnings

    from .refusals import library_refusals, what_runs

    config = load_peft_config(path)
    with warnings.catch_warnings(), library_refusals(what_runs(spec, setup, config)):
        warnings.simplefilter("ignore")
        try:
            apply_method(build_base_model(spec, setup, "meta"), spec, setup, config)
        except ValuesNeededError:  # an initialisation that reads weight values (FRoD): the run has them
            pass


def host_buffers(model: torch.nn.Module, device_type: str) -> list[tuple[torch.nn.Module, str]]:
    """(module, buffer name) of the buffers of peft tuner layers that are not on ``device_type``."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")  # not imported: no peft layer can be in the model
    if tuners is None:
        return []
    BaseTunerLayer = tuners.BaseTunerLayer  # noqa: N806
    return [(m, name) for m in model.modules() if isinstance(m, BaseTunerLayer)
            for name, b in m._buffers.items() if b is not None and b.device.type != device_type]


def _freeze_all_but(model: nn.Module, keep: Iterable[str], spec: ModelSpec) -> None:
    heads = HEADS.get(spec.task, ())
    keep = tuple(keep)
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        p.requires_grad_(any(k in name for k in keep) or top in heads)


class ValuesNeededError(ConfigError):
    """Applying a peft config to a model on the meta device failed because its initialisation reads the weights'
    values (FRoD's decomposition, SHiRA's random mask from the weights): the trace applies it to real weights."""


def apply_method(model: nn.Module, spec: ModelSpec, setup: RunSetup, peft_config: Any = None) -> nn.Module:
    """Apply ``setup.method`` to ``model`` (works on meta, CPU and CUDA models).

    Raises:
        ConfigError: peft rejects the config (targets match nothing, ...) or the method trains nothing.
    """
    check_runnable(setup)
    method = setup.method
    if peft_config is not None or method in PEFT_METHODS:
        import peft

        config = peft_config if peft_config is not None else peft_config_for(spec, setup)
        on_meta = any(p.device.type == "meta" for p in model.parameters())
        try:
            model = peft.get_peft_model(model, config)
        except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError, RuntimeError) as exc:
            if on_meta and isinstance(exc, (NotImplementedError, RuntimeError)) and "meta" in str(exc):
                raise ValuesNeededError(f"peft's {type(config).__name__} initialisation reads the weights' values "
                                        f"({' '.join(str(exc).split())[:120]})") from None
            if isinstance(exc, RuntimeError):
                raise
            raise ConfigError(f"peft cannot apply {type(config).__name__} to {spec.name}: {exc}") from None
        return model
    if method is Method.adapter:
        ad = setup.adapter
        assert ad is not None
        for p in model.parameters():
            p.requires_grad_(False)
        add_bottleneck_adapters(model, spec.model_type, spec.hidden_size, ad, dtype=torch.float32)
        for name, p in model.named_parameters():
            if "memprof_adapters" in name or name.split(".")[0] in HEADS.get(spec.task, ()):
                p.requires_grad_(True)
        if ad.train_norms:
            for module in model.modules():
                if is_norm_module(module):
                    for p in module.parameters(recurse=False):
                        p.requires_grad_(True)
        return model
    if method is Method.bitfit:
        _freeze_all_but(model, ("bias",), spec)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"BitFit trains nothing on {spec.name}: it has no bias parameters and no task head "
                              "(LLaMA-style models have no biases); choose another method")
        return model
    return model  # full fine-tuning


def enable_checkpointing(model: nn.Module, **checkpoint_kwargs: Any) -> None:
    """Activation checkpointing of every block, non-reentrant (transformers' default), through the
    non-deprecated entry point when it exists."""
    kwargs = {"use_reentrant": False, **checkpoint_kwargs}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) as peft's get_nb_trainable_parameters counts them (4-bit weights unpacked x2)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, arXiv:2302.06675, Alg. 2): one momentum state, sign update. Not in torch."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return None


def build_optimizer(params: list[torch.nn.Parameter], setup: RunSetup, device_type: str) -> torch.optim.Optimizer:
    """The optimizer of ``setup`` with the loop's kernel (``setup.effective_optimizer_impl``: foreach, fused or
    the for-loop), always explicit so that fake CUDA tensors in a trace take the same code path as a real run.

    Raises:
        ConfigError: nothing to train.
        DependencyMissingError / DeviceUnavailableError: 8-bit AdamW without bitsandbytes or CUDA.
    """
    if not params:
        raise ConfigError("nothing to train: the method left no parameter with requires_grad=True")
    impl = setup.effective_optimizer_impl
    kernel = {"fused": True, "foreach": False} if impl is OptimizerImpl.fused else \
        {"foreach": impl is OptimizerImpl.foreach}
    opt = setup.optimizer
    if opt is Optimizer.adamw:
        return torch.optim.AdamW(params, lr=1e-5, **kernel)
    if opt is Optimizer.sgd:
        return torch.optim.SGD(params, lr=1e-3, **kernel)
    if opt is Optimizer.sgd_momentum:
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, **kernel)
    if opt is Optimizer.adafactor:
        return torch.optim.Adafactor(params, lr=1e-3, foreach=impl is OptimizerImpl.foreach)
    if opt is Optimizer.lion:
        return Lion(params)
    if opt is Optimizer.adamw_8bit:
        if device_type != "cuda":
            raise DeviceUnavailableError("adamw-8bit (bitsandbytes) runs on CUDA only; use --optimizer adamw on CPU")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise DependencyMissingError("adamw-8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=1e-5)
    raise ConfigError(f"optimizer {opt.value} is not supported")


class MasterWeightOptimizer:
    """The 'mixed' regime (Rajbhandari et al. 2020, Sec. 3.1): half weights and grads, fp32 master weights
    and optimizer states. After backward the half grads are upcast into the masters' .grad, the inner
    optimizer steps the masters and the result is copied back into the half weights.
    """

    def __init__(self, params: list[torch.nn.Parameter], setup: RunSetup, device_type: str) -> None:
        self.params = params
        self.masters = [p.detach().float().requires_grad_(True) for p in params]
        self.inner = build_optimizer(self.masters, setup, device_type)
        self.state = self.inner.state
        self.param_groups = self.inner.param_groups

    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        self.inner.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)
                m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:  # step() has already handed the half gradients to the masters and dropped them
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad.zero_()


def make_optimizer(model: nn.Module, setup: RunSetup, device_type: str):  # noqa: ANN201
    params = [p for p in model.parameters() if p.requires_grad]
    if setup.effective_regime is Regime.mixed and not setup.sharded_masters:  # FSDP's fp32 shards are the masters
        return MasterWeightOptimizer(params, setup, device_type)
    return build_optimizer(params, setup, device_type)


def synthetic_batch(spec: ModelSpec, setup: RunSetup, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Random token ids of the task's shape: (b, s) inputs; seq-cls labels (b,), causal-LM labels = inputs.

    Unpadded (the default): no attention mask, so transformers materialises none. ``setup.padded``: an int64
    (b, s) attention mask whose rows after the first end in padding (right padding, as tokenizers pad for
    training), pad positions labelled -100 for causal LM; transformers then builds the mask every attention layer
    reads. Works under FakeTensorMode (device="cuda" on a CPU build).
    """
    if spec.task is Task.image_cls:  # pixels in the patch projection's dtype, a label per image
        return image_batch(spec, setup, device, TORCH_DTYPE[setup.dtype] if setup.method is Method.qlora
                           else storage_dtype(setup))
    b, s = setup.batch_size, setup.seq_len
    eos = _pooled_eos(spec, setup)
    ids = torch.randint(0, spec.vocab_size - (eos is not None), (b, s), device=device)
    batch = {"input_ids": ids}
    if spec.task is Task.qa:  # a start and an end position per sequence
        batch["start_positions"] = torch.randint(0, s, (b,), device=device)
        batch["end_positions"] = torch.randint(0, s, (b,), device=device)
    elif spec.task is Task.token_cls:  # a label per token
        batch["labels"] = torch.randint(0, spec.num_labels, (b, s), device=device)
    elif spec.task is Task.seq2seq:  # targets as long as the inputs; the model shifts them into decoder inputs
        batch["labels"] = torch.randint(0, spec.vocab_size, (b, s), device=device)
    lengths = [max(1, s - (i * s) // (2 * b)) for i in range(b)] if setup.padded else [s] * b
    if eos is not None:  # each example's last token is its <eos>, as the tokenizer appends it; no other one
        ids += (ids >= eos).long()
        for i, n in enumerate(lengths):
            ids[i, n - 1] = eos
    if setup.padded:
        mask = torch.zeros(b, s, dtype=torch.long, device=device)
        for i, n in enumerate(lengths):  # row 0 full, the others shorter
            mask[i, :n] = 1
        batch["attention_mask"] = mask
    if spec.task in (Task.qa, Task.token_cls, Task.seq2seq):
        if setup.padded and "labels" in batch:
            batch["labels"] = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    elif spec.task is Task.seq_cls:
        batch["labels"] = torch.randint(0, spec.num_labels, (b,), device=device)
    elif setup.padded:
        batch["labels"] = ids.masked_fill(batch["attention_mask"] == 0, -100)
    else:
        batch["labels"] = ids
    return batch


def _pooled_eos(spec: ModelSpec, setup: RunSetup) -> int | None:
    """The <eos> id an encoder-decoder classifier pools at (transformers 5.23 T5ForSequenceClassification,
    BartForSequenceClassification: ``sequence_output[input_ids.eq(eos_token_id)]``, refusing examples without one
    or with unequal counts), or None for every other model and task."""
    if spec.task is not Task.seq_cls or not spec.hf_config:
        return None
    config = hf_config_for(spec, setup)
    eos = getattr(config, "eos_token_id", None)
    return eos if getattr(config, "is_encoder_decoder", False) and isinstance(eos, int) else None


def check_positions(spec: ModelSpec, setup: RunSetup) -> None:
    """Learned position tables cap the sequence length (BERT 512, GPT-2 1024); prompt tokens count too."""
    check_sequence_length(spec, setup.seq_len + setup.prepended_tokens)


def nan_to_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
