"""The options every run command shares (estimate, fit, trace, measure, compare) and their resolution into a
ModelSpec and a RunSetup: flag definitions, the flags -> resolve_setup overrides mapping, the measured device
and the CPU defaults, the sweep axes. Commands are in cli.py; nothing here prints.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from .config import ZERO_FIELDS, RunSetup
from .resolve import measured_device, resolve_measured, resolve_setup
from .errors import ConfigError
from .images import image_run
from .report import Format
from .spec import ModelSpec, Task

ModelArg = Annotated[Optional[str], typer.Argument(
    help="Preset name or hub id (roberta-base, meta-llama/Llama-3.2-3B), or a local config.json / model directory.",
    show_default=False)]
ParamsOpt = Annotated[Optional[float], typer.Option(
    "--params", help="Instead of a model: a parameter count (3e9); a LLaMA-like shape is assumed and printed.")]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="table | json | csv | markdown | html")]
ColumnsOpt = Annotated[Optional[str], typer.Option(
    "--columns", help="Tables: the columns to show, comma-separated keys or labels ('all': every one).  "
                      "\\[default: what fits the terminal]")]
PeftConfigOpt = Annotated[Optional[Path], typer.Option(
    "--peft-config", help="A peft config: its adapter_config.json, or the directory save_pretrained wrote. Sets "
                          "the method and its options (flags override them); trace and measure apply it as given.")]
GpuOpt = Annotated[Optional[str], typer.Option(
    "--gpu", help="Check the fit on a GPU: a catalog name (A100-80GB, H100, 4090, T4, ...) or a size (24GiB, 80GB).")]
# compare's sweep beyond one GPU (scaling.py): one rank's estimate per world size and strategy
WorldSizesOpt = Annotated[Optional[str], typer.Option(
    "--world-sizes", help="Comma-separated data-parallel world sizes, e.g. 1,2,4,8: one rank's memory on each "
                          "(1: one device; instead of --world-size; analytic only; --gpu: does one rank fit).")]
StrategiesOpt = Annotated[Optional[str], typer.Option(
    "--strategies", help="With --world-sizes: comma-separated strategies, e.g. fsdp,zero3 (instead of --strategy).  "
                         "\\[default: ddp]")]

RUN_OPTIONS: list[tuple[str, Any]] = [
    ("method", Annotated[Optional[str], typer.Option(
        "--method", "-m", help="full | lora | qlora | adapter | bitfit | ia3 | prefix | prompt | adalora | vera | loha | "
                               "lokr | ln-tuning | p-tuning | trainable-tokens (DoRA: lora with --lora-dora; any other "
                               "peft config: --peft-config with trace or measure)  \\[default: full]")]),
    ("batch_size", Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Sequences per step.  \\[default: 1]")]),
    ("seq_len", Annotated[Optional[int], typer.Option("--seq-len", "-s", help="Tokens per sequence.  \\[default: 512]")]),
    ("dtype", Annotated[Optional[str], typer.Option("--dtype", help="fp32 | bf16 | fp16  \\[default: bf16]")]),
    ("regime", Annotated[Optional[str], typer.Option(
        "--regime", help="fp32 | pure | amp | mixed  \\[default: fp32 for fp32, pure for bf16, amp for fp16]")]),
    ("optimizer", Annotated[Optional[str], typer.Option(
        "--optimizer", help="adamw | adamw-8bit | sgd | sgd-momentum | adafactor | lion  \\[default: adamw]")]),
    ("attn", Annotated[Optional[str], typer.Option("--attn", help="auto | sdpa | eager  \\[default: auto: what transformers picks for the model, "
                                                  "sdpa where it has it]")]),
    ("device", Annotated[Optional[str], typer.Option(
        "--device", help="cuda | cpu (estimate: the device modelled; measure: also auto)  \\[default: cuda; measure: auto]")]),
    ("grad_checkpointing", Annotated[Optional[bool], typer.Option(
        "--grad-checkpointing/--no-grad-checkpointing", help="Recompute each block in backward.  \\[default: off]")]),
    ("dropout", Annotated[Optional[bool], typer.Option(
        "--dropout/--no-dropout", help="Keep the model's dropout probabilities.  \\[default: on]")]),
    ("task", Annotated[Optional[str], typer.Option(
        "--task", help="seq-cls | causal-lm | token-cls | qa | seq2seq | image-cls (the last four traced, not modelled)  "
                       "\\[default: seq-cls for encoders, causal-lm for decoders, seq2seq for encoder-decoders, "
                       "image-cls for vision encoders]")]),
    ("image_size", Annotated[Optional[int], typer.Option(
        "--image-size", help="image-cls: pixels per side of the images (instead of --seq-len: the run's seq_len is "
                             "the tokens of one image, (size / patch)^2 + 1 for ViT).  \\[default: the config's]")]),
    ("num_labels", Annotated[Optional[int], typer.Option("--num-labels", help="Classes of a seq-cls, token-cls or image-cls head. \\[default: the config's id2label, else 2]")]),
    ("lora_r", Annotated[Optional[int], typer.Option(
        "--lora-r", help="Rank of LoRA, QLoRA, AdaLoRA (init_r), VeRA, LoHa, LoKr.  \\[default: 8; AdaLoRA 12, VeRA 256]")]),
    ("lora_alpha", Annotated[Optional[int], typer.Option("--lora-alpha", help="LoRA alpha.  \\[default: 8]")]),
    ("lora_dropout", Annotated[Optional[float], typer.Option("--lora-dropout", help="LoRA dropout.  \\[default: 0]")]),
    ("lora_targets", Annotated[Optional[str], typer.Option(
        "--lora-targets", help="Comma-separated module names, or all-linear.  \\[default: peft's for the model type]")]),
    ("lora_bias", Annotated[Optional[str], typer.Option("--lora-bias", help="none | all | lora_only  \\[default: none]")]),
    ("lora_dora", Annotated[Optional[bool], typer.Option(
        "--lora-dora/--no-lora-dora", help="DoRA: LoRA plus a trained magnitude per output feature.  \\[default: off]")]),
    ("modules_to_save", Annotated[Optional[str], typer.Option(
        "--modules-to-save", help="Comma-separated modules trained in full.  \\[default: the seq-cls head]")]),
    ("quant_type", Annotated[Optional[str], typer.Option("--quant-type", help="QLoRA: nf4 | fp4  \\[default: nf4]")]),
    ("double_quant", Annotated[Optional[bool], typer.Option(
        "--double-quant/--no-double-quant", help="QLoRA: quantize the quantization constants.  \\[default: on]")]),
    ("adapter_variant", Annotated[Optional[str], typer.Option(
        "--adapter-variant", help="houlsby (after attention and FFN) | pfeiffer (after FFN)  \\[default: houlsby]")]),
    ("adapter_size", Annotated[Optional[int], typer.Option("--adapter-size", help="Bottleneck size r. \\[default: 64]")]),
    ("adapter_reduction", Annotated[Optional[int], typer.Option(
        "--adapter-reduction", help="Bottleneck as hidden_size // factor (instead of --adapter-size).")]),
    ("adapter_act", Annotated[Optional[str], typer.Option("--adapter-act", help="relu | gelu  \\[default: relu]")]),
    ("adapter_train_norms", Annotated[Optional[bool], typer.Option(
        "--adapter-train-norms/--adapter-freeze-norms", help="Also train the norm layers.  \\[default: frozen]")]),
    ("ia3_targets", Annotated[Optional[str], typer.Option("--ia3-targets", help="IA3 target modules (comma-separated).")]),
    ("ia3_feedforward", Annotated[Optional[str], typer.Option(
        "--ia3-feedforward", help="IA3 targets whose input is scaled (comma-separated).")]),
    ("virtual_tokens", Annotated[Optional[int], typer.Option(
        "--virtual-tokens", help="Prefix/prompt tuning: virtual tokens.  \\[default: 20]")]),
    ("prefix_projection", Annotated[Optional[bool], typer.Option(
        "--prefix-projection/--no-prefix-projection", help="Prefix tuning through an MLP.  \\[default: off]")]),
    ("prompt_encoder_hidden", Annotated[Optional[int], typer.Option(
        "--prompt-encoder-hidden", help="P-tuning's encoder width (prefix: the projection's).  \\[default: hidden size]")]),
    ("tokens_trained", Annotated[Optional[int], typer.Option(
        "--tokens-trained", help="Trainable tokens: how many embedding rows train.  \\[default: 3]")]),
    ("loop", Annotated[Optional[str], typer.Option(
        "--loop", help="torch | trainer: the training loop (trainer: transformers' Trainer defaults).  \\[default: torch]")]),
    ("optimizer_impl", Annotated[Optional[str], typer.Option(
        "--optimizer-impl", help="foreach | fused | for-loop  \\[default: the loop's: torch foreach on CUDA, for-loop on "
                                 "CPU; trainer fused AdamW]")]),
    ("zero_grad", Annotated[Optional[str], typer.Option(
        "--zero-grad", help="none (set_to_none) | zeros (gradients kept, zeroed in place)  \\[default: none]")]),
    ("grad_accum", Annotated[Optional[int], typer.Option(
        "--grad-accum", help="Micro-batches per optimizer step (gradients held between them).  \\[default: 1]")]),
    ("padded", Annotated[Optional[bool], typer.Option(
        "--padded/--no-padded", help="Batches carry padding (an attention mask in every layer).  \\[default: off]")]),
    ("keep_outputs", Annotated[Optional[bool], typer.Option(
        "--keep-outputs/--no-keep-outputs", help="The loop holds the model output (logits) until the next "
                                                 "forward.  \\[default: off]")]),
    ("use_cache", Annotated[Optional[bool], typer.Option(
        "--use-cache/--no-use-cache", help="Decoders build a KV cache in training (config.use_cache left on).  "
                                           "\\[default: off]")]),
    ("world_size", Annotated[Optional[int], typer.Option(
        "--world-size", help="Data-parallel ranks (one GPU each): the estimate is one rank's.  \\[default: 1]")]),
    ("strategy", Annotated[Optional[str], typer.Option(
        "--strategy", help="ddp | fsdp | fsdp-grad-op | hsdp | zero1 | zero2 | zero3: how ranks hold the model states "
                           "(FSDP2; DeepSpeed ZeRO).  \\[default: ddp]")]),
    ("offload", Annotated[Optional[str], typer.Option(
        "--offload", help="none | optimizer (ZeRO) | params (ZeRO-3, FSDP CPUOffloadPolicy): states kept in host "
                          "memory.  \\[default: none]")]),
    ("nodes", Annotated[Optional[int], typer.Option(
        "--nodes", help="Machines the ranks span (HSDP shards within a node).  \\[default: 1]")]),
    ("shard_size", Annotated[Optional[int], typer.Option(
        "--shard-size", help="HSDP: ranks one shard group spans.  \\[default: world size / nodes]")]),
    ("zero_bucket", Annotated[Optional[float], typer.Option(
        "--zero-bucket", help="ZeRO's reduce_bucket_size, elements (HF Trainer's auto: hidden²).  \\[default: 5e8, "
                              "DeepSpeed's]")]),
    ("zero_prefetch", Annotated[Optional[float], typer.Option(
        "--zero-prefetch", help="ZeRO-3's stage3_prefetch_bucket_size, elements (auto: 0.9 hidden²).  \\[default: "
                                "5e7]")]),
    ("zero_persistence", Annotated[Optional[float], typer.Option(
        "--zero-persistence", help="ZeRO-3's stage3_param_persistence_threshold, elements (auto: 10 hidden).  "
                                   "\\[default: 1e5]")]),
    ("zero_overlap", Annotated[Optional[bool], typer.Option(
        "--zero-overlap/--no-zero-overlap", help="ZeRO's overlap_comm: stages 1/2 double the bucket (and stage 1 "
                                                 "then reduces in the backward).  \\[default: DeepSpeed's, off below "
                                                 "stage 3]")]),
    ("zero_efficient_linear", Annotated[Optional[bool], typer.Option(
        "--zero-efficient-linear/--no-zero-efficient-linear", help="ZeRO-3's memory_efficient_linear: its linear keeps "
                                                                   "every projection's input, a frozen one's too.  "
                                                                   "\\[default: DeepSpeed's, on]")]),
    ("deepspeed", Annotated[Optional[Path], typer.Option(
        "--deepspeed", help="A DeepSpeed config JSON (HF Trainer's --deepspeed): its ZeRO stage, bucket sizes (\"auto\" "
                            "as HF fills them), overlap_comm, memory_efficient_linear, offload, bf16/fp16 or "
                            "torch_autocast and micro-batch size, under the flags.")]),
    ("cuda_context_mib", Annotated[Optional[float], typer.Option(
        "--cuda-context-mib", help="CUDA context size assumed, MiB.  \\[default: 500]")]),
    ("reserve_frac", Annotated[Optional[float], typer.Option(
        "--reserve-frac", help="Allocator reserve as a fraction of the allocated peak.  \\[default: 0.05]")]),
    ("config", Annotated[Optional[Path], typer.Option(
        "--config", help="TOML file of run options (flags override it).")]),
]


# --help groups the shared options into panels (typer's rich_help_panel), in this order
PANELS: dict[str, tuple[str, ...]] = {
    "Run shape": ("method", "batch_size", "seq_len", "task", "num_labels", "image_size"),
    "Precision and kernels": ("dtype", "regime", "optimizer", "attn", "device", "grad_checkpointing", "dropout"),
    "The loop": ("loop", "optimizer_impl", "zero_grad", "grad_accum", "padded", "keep_outputs", "use_cache"),
    "LoRA and LoRA-like (QLoRA, AdaLoRA, VeRA, LoHa, LoKr)": ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_bias", "lora_dora", "modules_to_save",
                     "quant_type", "double_quant"),
    "Bottleneck adapters": ("adapter_variant", "adapter_size", "adapter_reduction", "adapter_act",
                            "adapter_train_norms"),
    "IA3, prefix, prompt and P-tuning, trainable tokens": ("ia3_targets", "ia3_feedforward", "virtual_tokens",
                                                           "prefix_projection", "prompt_encoder_hidden",
                                                           "tokens_trained"),
    "Beyond one device (per-rank memory)": ("world_size", "strategy", "offload", "nodes", "shard_size",
                                            *ZERO_FIELDS, "deepspeed"),
    "Overheads and config file": ("cuda_context_mib", "reserve_frac", "config"),
}
for _name, _annotation in RUN_OPTIONS:
    _panel = next(panel for panel, names in PANELS.items() if _name in names)
    _annotation.__metadata__[0].rich_help_panel = _panel


def with_run_options(fn: Callable) -> Callable:
    """Give a command every RUN_OPTIONS flag; they arrive as one dict in its ``run`` argument."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "run"]
    own = {p.name for p in params}  # a flag the command declares itself (measure's data-parallel ones) stays its own
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann)
             for name, ann in RUN_OPTIONS if name not in own]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        run = {name: kwargs.pop(name, None) for name, _ in RUN_OPTIONS if name not in own}
        return fn(*args, run=run, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params + extra)  # type: ignore[attr-defined]
    return wrapper


# measure's data-parallel flags (runtime/ranks.py): --nproc ranks on this machine, torchrun-launched
PARALLEL_OPTIONS: list[tuple[str, Any]] = [
    ("nproc", Annotated[Optional[int], typer.Option(
        "--nproc", min=1, help="Ranks to launch on this machine (torchrun; gloo on CPU, NCCL with a GPU each): a row "
                               "per rank and the job's max.  \\[default: 1, the single-device run]")]),
    ("strategy", Annotated[Optional[str], typer.Option(
        "--strategy", help="With --nproc: ddp | fsdp | fsdp-grad-op | hsdp | zero1 | zero2 | zero3 (ZeRO: "
                           "memprof[deepspeed]; gloo on a CPU)  \\[default: ddp]")]),
    ("world_size", Annotated[Optional[int], typer.Option(
        "--world-size", min=1, help="With --nproc: the ranks of the job; must equal --nproc.  \\[default: --nproc]")]),
    ("offload", Annotated[Optional[str], typer.Option("--offload", help="ZeRO: none | optimizer | params.")]),
    ("shard_size", Annotated[Optional[int], typer.Option("--shard-size", min=1, help="HSDP: ranks per shard group.")]),
]
for _name, _annotation in PARALLEL_OPTIONS:
    _annotation.__metadata__[0].rich_help_panel = "Data parallelism (measure)"


def with_parallel_options(fn: Callable) -> Callable:
    """Give a command the PARALLEL_OPTIONS flags; they arrive as one dict in its ``par`` argument."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "par"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann)
             for name, ann in PARALLEL_OPTIONS]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        par = {name: kwargs.pop(name, None) for name, _ in PARALLEL_OPTIONS}
        return fn(*args, par=par, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params + extra)  # type: ignore[attr-defined]
    return wrapper


def setup_overrides(run: dict[str, Any]) -> dict[str, Any]:
    """Flags -> resolve_setup overrides (None = not given; option groups only when one of theirs is given)."""
    groups = {
        "lora": {"r": run["lora_r"], "alpha": run["lora_alpha"], "dropout": run["lora_dropout"],
                 "targets": run["lora_targets"], "bias": run["lora_bias"], "modules_to_save": run["modules_to_save"],
                 "dora": run["lora_dora"]},
        "quant": {"quant_type": run["quant_type"], "double_quant": run["double_quant"]},
        "adapter": {"variant": run["adapter_variant"], "bottleneck": run["adapter_size"],
                    "reduction_factor": run["adapter_reduction"], "activation": run["adapter_act"],
                    "train_norms": run["adapter_train_norms"]},
        "ia3": {"targets": run["ia3_targets"], "feedforward": run["ia3_feedforward"]},
        "prompt": {"num_virtual_tokens": run["virtual_tokens"], "projection": run["prefix_projection"],
                   "projection_hidden": run["prompt_encoder_hidden"]},
        "trainable_tokens": {"count": run["tokens_trained"]},
        "overheads": {"allocator_reserve_frac": run["reserve_frac"]},
        "parallel": {k: run.get(k) for k in ("world_size", "strategy", "offload", "nodes", "shard_size",
                                             *ZERO_FIELDS)},
    }
    out: dict[str, Any] = {
        "method": run["method"], "batch_size": run["batch_size"], "seq_len": run["seq_len"], "dtype": run["dtype"],
        "regime": run["regime"], "optimizer": run["optimizer"], "attn_impl": run["attn"], "device": run["device"],
        "grad_checkpointing": run["grad_checkpointing"], "dropout": run["dropout"],
        "loop": run["loop"], "optimizer_impl": run["optimizer_impl"], "zero_grad": run["zero_grad"],
        "grad_accum": run["grad_accum"], "padded": run["padded"], "keep_outputs": run["keep_outputs"],
        "use_cache": run["use_cache"],
        "cuda_context_mib": run["cuda_context_mib"],  # checked and scaled to bytes by memprof.resolve
    }
    for name, values in groups.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            out[name] = given
    return out


def flag_overrides(run: dict[str, Any], peft_config: Path | None = None, modelled: bool = True) -> dict[str, Any]:
    """The flags as resolve_setup overrides, with a peft config's method and options under them (the flags
    win). ``modelled``: refuse a config the analytic model does not cover; else (trace, measure: the real peft
    code runs it) keep the flags' method for it."""
    overrides = setup_overrides(run)
    if peft_config is None:
        return overrides
    from .peft_input import UnmodelledPeftConfig, merge

    try:
        return merge(overrides, peft_config)
    except UnmodelledPeftConfig:
        if modelled:
            raise
        return overrides


def resolve_run(run: dict[str, Any], extra: dict[str, Any] | None = None, peft_config: Path | None = None,
                modelled: bool = True, spec: ModelSpec | None = None) -> RunSetup:
    """The run's setup; with ``spec``, sized for its task (``task_overrides``: image-cls runs by image size)."""
    overrides = flag_overrides(run, peft_config, modelled)
    overrides.update(extra or {})
    setup = resolve_setup(run["config"], {**overrides, **(task_overrides(spec, run) if spec else {})})
    return image_run(spec, setup) if spec is not None else setup


def task_overrides(spec: ModelSpec, run: dict[str, Any]) -> dict[str, Any]:
    """The size flags of the model's task: for image-cls the image size (``--image-size``, default the config's) and
    the sequence length it makes, the tokens of one image (memprof.images); ``--image-size`` is refused with any other
    task, as ``--seq-len`` is with image-cls.

    Raises:
        ConfigError: --seq-len with image-cls, --image-size with a text task.
    """
    if spec.task is Task.image_cls:
        if run["seq_len"] is not None:
            raise ConfigError("--seq-len does not apply to --task image-cls: its sequence is the patches of an image; "
                              "give --image-size (the run's seq_len is then the tokens of one image)")
        sized = image_run(spec, RunSetup(image_size=run["image_size"]))
        return {"image_size": sized.image_size, "seq_len": sized.seq_len}
    if run["image_size"] is not None:
        raise ConfigError(f"--image-size applies to --task image-cls only, not to {spec.task.value}; "
                          "give --seq-len")
    return {}


def apply_deepspeed(run: dict[str, Any], spec: ModelSpec, par: dict[str, Any] | None = None) -> None:
    """``--deepspeed FILE``: the flags not given take the DeepSpeed config's values (ds_input.deepspeed_flags; "auto"
    bucket sizes from the model's width); measure's own data-parallel flags are in ``par``."""
    if run.get("deepspeed") is None:
        return
    from .ds_input import deepspeed_flags, load_deepspeed_config

    if par is not None and (par.get("nproc") or 1) < 2:
        raise ConfigError("--deepspeed needs --nproc N with N > 1 ranks for memprof measure (a DeepSpeed config runs "
                          "ZeRO over the ranks the launcher starts)")
    for name, value in deepspeed_flags(load_deepspeed_config(run["deepspeed"]), spec.hidden_size).items():
        target = par if par is not None and name in par else run
        if target.get(name) is None:
            target[name] = value


def resolve_model(model: str | None, params: float | None, run: dict[str, Any], any_family: bool = False
                  ) -> tuple[ModelSpec, str | None]:
    from .resolve import parse_enum
    from .hub import load_spec_any, resolve_spec

    task = parse_enum(Task, run["task"], "task") if run["task"] else None
    if any_family and model is not None and params is None:
        return load_spec_any(model, task=task, num_labels=run["num_labels"]), None
    return resolve_spec(model, params, task=task, num_labels=run["num_labels"])


def resolve_measure_run(run: dict[str, Any], peft_config: Path | None = None, spec: ModelSpec | None = None,
                        par: dict[str, Any] | None = None) -> tuple[RunSetup, str | None]:
    """The measured run (resolve.resolve_measured: device auto, CPU defaults below the file and the flags); with
    ``spec``, sized for its task (``task_overrides``: image-cls sets the sequence length, not the CPU default);
    ``par``: measure's data-parallel flags (``ranks.parallel_overrides``)."""
    from .runtime.probes import cuda_available
    from .runtime.ranks import parallel_overrides

    sized = task_overrides(spec, run) if spec is not None else {}
    flags = {**flag_overrides(run, peft_config, modelled=False), **sized, **parallel_overrides(**(par or {}))}
    setup, note = resolve_measured(run["config"], flags, cuda_available())
    return (image_run(spec, setup) if spec is not None else setup), note


def sweep_device(run: dict[str, Any], axes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Measured sweeps: (overrides: the device; defaults: the CPU defaults, below the file, flags and swept axes;
    a note naming the CPU defaults that apply)."""
    from .runtime.probes import cuda_available

    device, defaults, used = measured_device(run["config"], setup_overrides(run), cuda_available())
    if device.value != "cpu":
        return {"device": device.value}, {}, f"measured on {device.value}"
    swept = {"batch_size": axes["batch_sizes"], "seq_len": axes["seq_lens"], "dtype": axes["precisions"]}
    names = [f"{k}={getattr(defaults[k], 'value', defaults[k])}" for k in used if not swept[k]]
    return {"device": device.value}, defaults, "measured on CPU" + (
        f"; CPU defaults used: {', '.join(names)}" if names else "")


def sweep_axes(run: dict[str, Any], batch_sizes: str | None, seq_lens: str | None, precisions: str | None,
                checkpointing: str | None) -> dict[str, Any]:
    """The swept lists; each replaces its single-value flag (giving both is an error)."""
    from .sweep import parse_ints, parse_precisions, parse_switches

    for listed, given, flags in ((batch_sizes, run["batch_size"], "--batch-sizes and --batch-size"),
                                 (seq_lens, run["seq_len"], "--seq-lens and --seq-len"),
                                 (precisions, run["dtype"] or run["regime"], "--precisions and --dtype/--regime"),
                                 (checkpointing, run["grad_checkpointing"],
                                  "--checkpointing and --grad-checkpointing")):
        if listed is not None and given is not None:
            raise ConfigError(f"give {flags.replace(' and ', ' or ')}, not both")
    return {"batch_sizes": parse_ints(batch_sizes, "--batch-sizes"), "seq_lens": parse_ints(seq_lens, "--seq-lens"),
            "precisions": parse_precisions(precisions),
            "checkpointing": parse_switches(checkpointing, "--checkpointing")}


def run_console(app: typer.Typer, err_console: Any) -> int:
    """Run the CLI and return its exit code. click's own usage errors (an unknown option, a missing or malformed
    value, an unknown command) become the same one ``error:`` line and exit code 2 as memprof's errors, instead of
    a boxed usage panel. With ``standalone_mode=False`` click returns the exit code of ``typer.Exit`` (memprof's
    errors exit 2 that way) rather than raising it."""
    import warnings

    from rich.text import Text

    from .outputs import printable

    def one_line(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ARG001
        """A Python warning (memprof's or a library's) as one ``warning:`` line, not the file:line + source pair."""
        err_console.print(Text.assemble(("warning: ", "yellow"), printable(" ".join(str(message).split()))))

    warnings.showwarning = one_line
    # typer vendors click (typer._click) in recent releases: find its UsageError through a public class
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:
        if not exc.format_message().strip():  # no arguments: the help was shown, nothing went wrong to report
            return exc.exit_code
        words = exc.ctx.command_path.split() if exc.ctx else []
        command = next((w for w in words[1:] if not w.startswith("-") and w != "memprof"), None)
        hint = f" (see: memprof {command} --help)" if command else " (see: memprof --help)"
        err_console.print(Text.assemble(("error: ", "bold red"), exc.format_message().replace("\n", " ") + hint))
        return 2
    except typer.Abort:
        err_console.print(Text("aborted", style="bold red"))
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    return code if isinstance(code, int) else 0
