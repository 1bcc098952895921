"""A DeepSpeed config as a user has it (the JSON given to HF Trainer's ``--deepspeed`` or to
``deepspeed.initialize``) mapped onto memprof's run flags (pure: reads JSON, never imports DeepSpeed).

Read: ``zero_optimization.stage`` (1-3), ``reduce_bucket_size``, ``stage3_prefetch_bucket_size``,
``stage3_param_persistence_threshold`` (numbers, or HF Trainer's ``"auto"``: hidden², 0.9 hidden² and 10 hidden,
transformers/integrations/deepspeed.py ``trainer_config_finalize``), ``offload_optimizer`` / ``offload_param``
(device ``cpu``), ``bf16`` / ``fp16`` (``enabled``: DeepSpeed's mixed precision, fp32 masters), ``torch_autocast``
(fp32 weights under torch.autocast: memprof's amp regime), ``overlap_comm``, ``memory_efficient_linear`` (stage 3),
``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps``. ``"auto"`` elsewhere is left to the flags
(HF Trainer fills it from its own arguments). The world size is the launcher's, not the file's: ``--world-size``.

What would change memory in ways the ZeRO model does not follow is refused in one line naming the key: stage 0,
NVMe offload, ``torch_autocast`` with its own module list, ZeRO++ (hpZ, quantized weights or gradients),
non-contiguous gradients, optimizers other than Adam / AdamW, and non-default ``stage3_max_live_parameters``,
``stage3_max_reuse_distance`` and ``sub_group_size``. Keys that leave memory alone (the scheduler, gradient clipping,
logging, optimizer hyper-parameters) are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError
from .resolve import read_json_file

AUTO = "auto"
# DeepSpeed 0.19 defaults the ZeRO model assumes (deepspeed/runtime/zero/config.py); a config naming another
# value is refused
FIXED = {"stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9, "sub_group_size": 1e9}
OPTIMIZERS = ("adam", "adamw", "fusedadam")


def load_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """The JSON object of a DeepSpeed config file.

    Raises:
        ConfigError: missing, unreadable, not JSON, or not an object.
    """
    path = Path(path)
    data = read_json_file(path, "DeepSpeed config")
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path} is not a JSON object")
    return data


def _number(value: Any, key: str, auto: float | None) -> int | None:
    if value == AUTO:
        return None if auto is None else int(auto)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise ConfigError(f"DeepSpeed config: {key} must be a number or \"auto\", not {value!r}")
    return int(value)


def _enabled(section: Any) -> bool | None:
    """A precision section's ``enabled``: True / False, None for "auto" (the Trainer's --bf16 / --fp16 decide)."""
    if not isinstance(section, dict):
        return False
    value = section.get("enabled", False)
    return None if value == AUTO else bool(value)


def _offload(zero: dict[str, Any], key: str) -> bool:
    section = zero.get(key)
    if not isinstance(section, dict):
        return False
    device = str(section.get("device", "none")).lower()
    if device == "nvme":
        raise ConfigError(f"DeepSpeed config: zero_optimization.{key}.device \"nvme\" is not modelled (ZeRO-Infinity "
                          "pages states through NVMe buffers); use \"cpu\" or \"none\"")
    if device not in ("cpu", "none"):
        raise ConfigError(f"DeepSpeed config: zero_optimization.{key}.device must be cpu, nvme or none, not "
                          f"{section.get('device')!r}")
    return device == "cpu"


# memprof's --dtype -> DeepSpeed's torch_autocast.dtype (runtime/config.py get_torch_autocast_dtype: DtypeEnum
# values), and every name DeepSpeed accepts back to --dtype
AUTOCAST_NAMES = {"bf16": "bfloat16", "fp16": "float16"}
AUTOCAST_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "torch.bfloat16": "bf16", "float16": "fp16", "fp16": "fp16",
                   "half": "fp16", "torch.float16": "fp16"}


def _autocast(section: Any) -> str | None:
    """``torch_autocast`` (DeepSpeed 0.16+; runtime/torch_autocast.py): fp32 weights, the forward under
    torch.autocast in its ``dtype``, the gradients of nn.Linear reduced in that dtype (memprof's amp regime under
    ZeRO). The dtype (bf16 / fp16), None when off. A non-default ``lower_precision_safe_modules`` is refused: the
    model reduces nn.Linear's gradients in the half dtype and the rest in fp32, as the default list does for the
    layers memprof builds. ``"auto"`` when the dtype is not given (torch.autocast's default for the device)."""
    if not isinstance(section, dict) or not section.get("enabled", False):
        return None
    if section.get("lower_precision_safe_modules") not in (None, ["torch.nn.modules.linear.Linear",
                                                                 "torch.nn.modules.conv.Conv1d",
                                                                 "torch.nn.modules.conv.Conv2d",
                                                                 "torch.nn.modules.conv.Conv3d"]):
        raise ConfigError("DeepSpeed config: torch_autocast.lower_precision_safe_modules other than DeepSpeed's "
                          "default is not modelled")
    dtype = section.get("dtype")
    if dtype is None:  # torch.autocast's own default for the device (CUDA fp16, CPU bf16): --dtype says which
        return AUTO
    if str(dtype).lower() not in AUTOCAST_DTYPES:
        raise ConfigError(f"DeepSpeed config: torch_autocast.dtype must be bfloat16 or float16, not {dtype!r}")
    return AUTOCAST_DTYPES[str(dtype).lower()]


def deepspeed_flags(config: dict[str, Any], hidden: int) -> dict[str, Any]:
    """The run flags (RUN_OPTIONS names) a DeepSpeed config sets, for a model of width ``hidden``.

    Raises:
        ConfigError: a key whose memory the ZeRO model does not follow, or a malformed value.
    """
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or "stage" not in zero:
        raise ConfigError("DeepSpeed config: no zero_optimization.stage; memprof models ZeRO stages 1, 2 and 3")
    stage = zero["stage"]
    if stage not in (1, 2, 3) or isinstance(stage, bool):
        raise ConfigError(f"DeepSpeed config: zero_optimization.stage {stage!r} is not modelled; memprof models "
                          "stages 1, 2 and 3 (stage 0 is DeepSpeed's own data parallelism)")
    for key in ("zero_hpz_partition_size",):
        if zero.get(key, 1) not in (1, None):
            raise ConfigError(f"DeepSpeed config: zero_optimization.{key} (ZeRO++ hpZ) is not modelled")
    for key in ("zero_quantized_weights", "zero_quantized_gradients", "zero_quantized_nontrainable_weights"):
        if zero.get(key):
            raise ConfigError(f"DeepSpeed config: zero_optimization.{key} (ZeRO++) is not modelled")
    if zero.get("contiguous_gradients", True) is False:
        raise ConfigError("DeepSpeed config: zero_optimization.contiguous_gradients false is not modelled (memprof "
                          "follows DeepSpeed's default, true)")
    for key, default in FIXED.items():
        value = zero.get(key, default)
        if value != AUTO and _number(value, f"zero_optimization.{key}", None) != default:
            raise ConfigError(f"DeepSpeed config: zero_optimization.{key} {value!r} is not modelled; memprof follows "
                              f"DeepSpeed's default, {default:.0e}")
    autocast = _autocast(config.get("torch_autocast"))
    opt = config.get("optimizer")
    if isinstance(opt, dict) and str(opt.get("type", "adamw")).lower() not in OPTIMIZERS:
        raise ConfigError(f"DeepSpeed config: optimizer {opt.get('type')!r} is not modelled under ZeRO; memprof "
                          "models Adam / AdamW (two fp32 states per element)")
    flags: dict[str, Any] = {"strategy": f"zero{stage}"}
    sizes = (("zero_bucket", "reduce_bucket_size", hidden * hidden),
             ("zero_prefetch", "stage3_prefetch_bucket_size", 0.9 * hidden * hidden),
             ("zero_persistence", "stage3_param_persistence_threshold", 10 * hidden))
    for flag, key, auto in sizes:
        if key in zero and (stage == 3 or flag == "zero_bucket"):
            flags[flag] = _number(zero[key], f"zero_optimization.{key}", auto)
    if "overlap_comm" in zero and zero["overlap_comm"] != AUTO:
        if not isinstance(zero["overlap_comm"], bool):
            raise ConfigError(f"DeepSpeed config: zero_optimization.overlap_comm must be true or false, not "
                              f"{zero['overlap_comm']!r}")
        flags["zero_overlap"] = zero["overlap_comm"]
    if "memory_efficient_linear" in zero and stage == 3:
        if not isinstance(zero["memory_efficient_linear"], bool):
            raise ConfigError(f"DeepSpeed config: zero_optimization.memory_efficient_linear must be true or false, not "
                              f"{zero['memory_efficient_linear']!r}")
        flags["zero_efficient_linear"] = zero["memory_efficient_linear"]
    opt_off, param_off = _offload(zero, "offload_optimizer"), _offload(zero, "offload_param")
    if param_off and stage != 3:
        raise ConfigError("DeepSpeed config: offload_param needs zero_optimization.stage 3")
    if opt_off or param_off:
        flags["offload"] = "params" if param_off else "optimizer"
    bf16, fp16 = _enabled(config.get("bf16", config.get("bfloat16"))), _enabled(config.get("fp16"))
    if bf16 and fp16:
        raise ConfigError("DeepSpeed config: bf16 and fp16 are both enabled; DeepSpeed refuses that too")
    if autocast and (bf16 or fp16):
        raise ConfigError("DeepSpeed config: torch_autocast and bf16/fp16 are both enabled; use one (torch_autocast "
                          "keeps fp32 weights, bf16/fp16 half weights with fp32 masters)")
    if autocast:
        flags["regime"] = "amp"
        if autocast != AUTO:
            flags["dtype"] = autocast
    elif bf16 or fp16:
        flags["dtype"], flags["regime"] = ("bf16" if bf16 else "fp16"), "mixed"
    elif bf16 is False and fp16 is False:
        flags["dtype"] = "fp32"
    for flag, key in (("batch_size", "train_micro_batch_size_per_gpu"), ("grad_accum", "gradient_accumulation_steps")):
        value = config.get(key, AUTO)
        if value != AUTO:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"DeepSpeed config: {key} must be a positive integer or \"auto\", not {value!r}")
            flags[flag] = value
    return flags
