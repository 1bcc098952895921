"""A live training run described as memprof's ModelSpec and RunSetup: read from the model (its config, the peft
config peft attached, its parameter dtype, checkpointing), the optimizer object and, for a Trainer, its
TrainingArguments. The Trainer callback and the plain-loop profiler estimate each step from these (torch side).

What the analytic model does not cover is said, not guessed: ``describe_run`` returns the setup it could build
and the notes on what it approximated; ``method_fields`` returns None for a peft method memprof does not model
(the run is still measured; its estimate needs ``memprof trace``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from ..config import AttnImpl, Device, Dtype, Loop, Optimizer, OptimizerImpl, Regime, RunSetup
from ..resolve import resolve_setup
from ..errors import MemprofError
from ..spec import ModelSpec, Task, from_hf_config

_DTYPES = {torch.float32: Dtype.fp32, torch.bfloat16: Dtype.bf16, torch.float16: Dtype.fp16}


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under peft's wrappers (``PeftModel.get_base_model``), or the model itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def spec_from_model(model: nn.Module) -> ModelSpec:
    """The ModelSpec of a live transformers model (its config and its task head)."""
    inner = base_model(model)
    config = inner.config.to_dict()
    name = config.get("_name_or_path") or config.get("model_type", "model")
    cls = type(inner).__name__
    task = Task.seq_cls if "SequenceClassification" in cls else Task.causal_lm
    return from_hf_config(config, name, task=task, num_labels=config.get("num_labels"), source="file")


def method_fields(model: nn.Module) -> dict[str, Any] | None:
    """The method and its option group (resolve_setup overrides) of the peft config on ``model``; {"method":
    "full"} without peft; None for a peft config memprof does not model analytically."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return {"method": "full"}
    config = configs.get(getattr(model, "active_adapter", "default")) or next(iter(configs.values()))
    kind = str(getattr(getattr(config, "peft_type", None), "value", config.peft_type))
    if kind == "LORA":
        if isinstance(config.target_modules, str) and config.target_modules != "all-linear":
            return None  # regex targets: not in the analytic model
        targets = config.target_modules
        lora = {"r": int(config.r), "alpha": int(config.lora_alpha), "dropout": float(config.lora_dropout),
                "bias": config.bias,
                "targets": ("all-linear",) if targets == "all-linear" else tuple(sorted(targets or ())) or None}
        if config.modules_to_save:
            lora["modules_to_save"] = tuple(config.modules_to_save)
        if getattr(config, "use_dora", False):
            lora["dora"] = True
        quantized = any(type(p).__name__ == "Params4bit" for p in model.parameters())
        return {"method": "qlora" if quantized else "lora", "lora": lora}
    if kind == "IA3":
        return {"method": "ia3", "ia3": {"targets": tuple(sorted(config.target_modules or ())) or None,
                                         "feedforward": tuple(sorted(config.feedforward_modules or ())) or None}}
    if kind == "PREFIX_TUNING":
        return {"method": "prefix", "prompt": {"num_virtual_tokens": int(config.num_virtual_tokens),
                                               "projection": bool(config.prefix_projection)}}
    if kind == "PROMPT_TUNING":
        return {"method": "prompt", "prompt": {"num_virtual_tokens": int(config.num_virtual_tokens)}}
    return None


def optimizer_fields(optimizer: Any) -> dict[str, Any]:
    """The optimizer and its kernel, read from the object (unwrapping accelerate's AcceleratedOptimizer)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    name = type(inner).__name__
    defaults = getattr(inner, "defaults", {}) or {}
    impl = None
    if defaults.get("fused"):
        impl = OptimizerImpl.fused.value
    elif defaults.get("foreach") is True:
        impl = OptimizerImpl.foreach.value
    elif defaults.get("foreach") is False:
        impl = OptimizerImpl.for_loop.value
    kind = {"AdamW": Optimizer.adamw, "Adam": Optimizer.adamw, "SGD": Optimizer.sgd, "Adafactor": Optimizer.adafactor,
            "Lion": Optimizer.lion, "AdamW8bit": Optimizer.adamw_8bit, "PagedAdamW8bit": Optimizer.adamw_8bit}.get(name)
    out: dict[str, Any] = {}
    if kind is Optimizer.sgd and defaults.get("momentum"):
        kind = Optimizer.sgd_momentum
    if kind is not None:
        out["optimizer"] = kind.value
        if impl is not None and kind not in (Optimizer.lion, Optimizer.adamw_8bit):
            out["optimizer_impl"] = impl
    return out


def describe_run(model: nn.Module, optimizer: Any = None, args: Any = None,
                 overrides: Mapping[str, Any] | None = None) -> tuple[ModelSpec | None, RunSetup | None, list[str]]:
    """(spec, setup, notes) of a live run, ``args`` a Trainer's TrainingArguments (the Trainer loop). spec is None
    for an architecture outside the analytic families, setup None for a method they do not model.

    The batch shape (b, s) and padding are per step; the setup carries b=1, s=1 placeholders.
    """
    notes: list[str] = []
    try:
        spec = spec_from_model(model)
    except MemprofError as exc:
        return None, None, [f"no analytic estimate: {exc}"]
    fields = method_fields(model)
    if fields is None:
        return spec, None, ["this peft method is not in memprof's analytic model: measured only "
                            "(memprof trace MODEL --peft-config DIR estimates it)"]
    param = next((p for p in model.parameters()), None)
    device = Device.cuda if param is not None and param.device.type == "cuda" else Device.cpu
    weight_dtype = _DTYPES.get(_dominant_dtype(model), Dtype.fp32)
    run: dict[str, Any] = {**fields, "device": device.value, "batch_size": 1, "seq_len": 1}
    autocast = None
    if args is not None:
        run["loop"] = Loop.trainer.value
        run["grad_accum"] = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
        if getattr(args, "bf16", False):
            autocast = Dtype.bf16
        elif getattr(args, "fp16", False):
            autocast = Dtype.fp16
    if weight_dtype is not Dtype.fp32:
        run.update(dtype=weight_dtype.value, regime=Regime.pure.value)
        if autocast is not None:
            notes.append(f"weights in {weight_dtype.value} under {autocast.value} autocast: estimated as pure "
                         f"{weight_dtype.value} (autocast's fp32 ops on half weights are not modelled)")
    elif autocast is not None:
        run.update(dtype=autocast.value, regime=Regime.amp.value)
    else:
        run["dtype"] = Dtype.fp32.value
    inner = base_model(model)
    # transformers >= 5.23 names it is_activation_checkpointing (is_gradient_checkpointing warns, goes in v6)
    name = "is_activation_checkpointing" if hasattr(type(inner), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    if getattr(inner, name, False) or getattr(args, "gradient_checkpointing", False):
        run["grad_checkpointing"] = True
    attn = getattr(inner.config, "_attn_implementation", "sdpa")
    if attn not in (AttnImpl.sdpa.value, AttnImpl.eager.value):
        notes.append(f"attention '{attn}' estimated as sdpa (flash kernels keep no s x s tensors either)")
        attn = AttnImpl.sdpa.value
    run["attn_impl"] = attn
    run["dropout"] = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    run["use_cache"] = bool(getattr(inner.config, "use_cache", False))
    if optimizer is not None:
        run.update(optimizer_fields(optimizer))
    run.update(overrides or {})
    try:
        setup = resolve_setup(None, run)
    except MemprofError as exc:
        return spec, None, [f"memprof cannot describe this run: {exc}"]
    return spec, setup, notes


def step_setup(setup: RunSetup, batch_size: int, seq_len: int, padded: bool) -> RunSetup:
    """The run's setup at one step's shape."""
    return dataclasses.replace(setup, batch_size=batch_size, seq_len=seq_len, padded=padded)


def _dominant_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype holding most of the model's parameters (peft's fp32 adapters on a bf16 base: bf16)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


