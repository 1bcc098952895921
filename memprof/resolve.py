"""Resolving run options into a RunSetup: one function, one precedence (RunSetup defaults < a command's
defaults < TOML file < explicit overrides), flag names accepted at every level, every problem reported at once.
Used by the CLI, the TOML file and the Python API alike (config.py holds the dataclasses).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from .config import (CPU_MEASURE_DEFAULTS, ZERO_FIELDS, AdapterSpec, AdapterVariant, AttnImpl, Device, Dtype,
                     IA3Spec, Loop,
                     LoraSpec, Method, Optimizer, OptimizerImpl, Overheads, ParallelSpec, PromptLearningSpec, QuantSpec, Regime,
                     RunSetup, TokensSpec, ZeroGrad, method_option_defaults, with_method_defaults)
from .errors import ConfigError

_ENUM_FIELDS: dict[str, type[Enum]] = {
    "method": Method, "dtype": Dtype, "regime": Regime, "optimizer": Optimizer,
    "attn_impl": AttnImpl, "device": Device, "loop": Loop, "optimizer_impl": OptimizerImpl, "zero_grad": ZeroGrad,
}
_GROUP_FIELDS: dict[str, type] = {
    "lora": LoraSpec, "quant": QuantSpec, "adapter": AdapterSpec, "ia3": IA3Spec, "prompt": PromptLearningSpec,
    "trainable_tokens": TokensSpec, "overheads": Overheads, "parallel": ParallelSpec,
}


def parse_enum(enum: type[Enum], value: Any, what: str) -> Any:
    """Turn a string into an enum member or raise ConfigError listing the allowed values."""
    if isinstance(value, enum):
        return value
    try:
        return enum(str(value).lower().replace("_", "-") if enum in (Optimizer, OptimizerImpl) else str(value).lower())
    except ValueError:
        allowed = ", ".join(m.value for m in enum)  # type: ignore[attr-defined]
        raise ConfigError(f"{what} '{value}' is not supported; choose one of: {allowed}") from None


def _build_group(cls: type, name: str, values: Mapping[str, Any], problems: list[str]) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, val in values.items():
        if key not in known:
            problems.append(f"unknown option '{name}.{key}'; known: {', '.join(known)}")
            continue
        if key == "variant":
            val = parse_enum(AdapterVariant, val, "adapter variant")
        elif key in ("targets", "feedforward", "modules_to_save") and isinstance(val, (list, tuple, str)):
            items = val.split(",") if isinstance(val, str) else list(val)
            if not all(isinstance(v, str) for v in items):
                problems.append(f"{name}.{key} must be a list of module names, got {val!r}")
                continue
            val = tuple(v.strip() for v in items if v.strip())
        kwargs[key] = val
    try:
        return cls(**kwargs)
    except (ConfigError, TypeError) as exc:
        problems.append(str(exc))
        return None


# The CLI's flat flag names are accepted everywhere a RunSetup is given (TOML files, the Python API):
# lora_r = 16 is [lora] r = 16. (group, field, scale) per flag; scale converts MiB flags to bytes.
FLAG_ALIASES: dict[str, tuple[str, str, float]] = {
    "lora_r": ("lora", "r", 1), "lora_alpha": ("lora", "alpha", 1), "lora_dropout": ("lora", "dropout", 1),
    "lora_targets": ("lora", "targets", 1), "lora_bias": ("lora", "bias", 1),
    "modules_to_save": ("lora", "modules_to_save", 1), "quant_type": ("quant", "quant_type", 1),
    "double_quant": ("quant", "double_quant", 1), "adapter_variant": ("adapter", "variant", 1),
    "adapter_size": ("adapter", "bottleneck", 1), "adapter_reduction": ("adapter", "reduction_factor", 1),
    "adapter_act": ("adapter", "activation", 1), "adapter_train_norms": ("adapter", "train_norms", 1),
    "ia3_targets": ("ia3", "targets", 1), "ia3_feedforward": ("ia3", "feedforward", 1),
    "virtual_tokens": ("prompt", "num_virtual_tokens", 1), "prefix_projection": ("prompt", "projection", 1),
    "prompt_encoder_hidden": ("prompt", "projection_hidden", 1), "tokens_trained": ("trainable_tokens", "count", 1),
    "cuda_context_mib": ("overheads", "cuda_context_bytes", 2**20),
    "reserve_frac": ("overheads", "allocator_reserve_frac", 1),
    "world_size": ("parallel", "world_size", 1), "strategy": ("parallel", "strategy", 1),
    "offload": ("parallel", "offload", 1), "nodes": ("parallel", "nodes", 1), "shard_size": ("parallel", "shard_size", 1),
    **{name: ("parallel", name, 1) for name in ZERO_FIELDS},
}
FIELD_ALIASES = {"attn": "attn_impl"}  # flag name -> RunSetup field


def read_config_file(file: Path | str) -> dict[str, Any]:
    """The table of a TOML run-options file (flag names or RunSetup fields, groups as tables).

    Raises:
        ConfigError: the file is missing, a directory, unreadable, or not TOML.
    """
    path = Path(file)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a .toml file")
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read as text: {type(exc).__name__}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def read_json_file(path: Path, what: str) -> Any:
    """The JSON in a user's config file (``what``: "peft config", "DeepSpeed config", named in the errors).

    Raises:
        ConfigError: the file is missing, unreadable, or not JSON.
    """
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{what} {path} is not a JSON file: {type(exc).__name__}") from None


def _unflatten(values: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """Flag names (lora_r, attn, cuda_context_mib, ...) -> RunSetup fields and option-group tables."""
    out: dict[str, Any] = {}
    for key, val in values.items():
        if key in FLAG_ALIASES:
            group, name, scale = FLAG_ALIASES[key]
            if val is None:
                continue
            if scale != 1:
                if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val < 0:
                    problems.append(f"{key} must be a finite number >= 0, got {val!r}")
                    continue
                val = int(val * scale)
            table = out.setdefault(group, {})
            if not isinstance(table, dict):
                problems.append(f"{group} must be a table of options, got {table!r}")
                continue
            table[name] = val
        else:
            name = FIELD_ALIASES.get(key, key)
            if isinstance(val, Mapping) and isinstance(out.get(name), dict):  # [lora] next to lora_r
                out[name] = {**out[name], **val}
            else:
                out[name] = val
    return out


def resolve_setup(file: Path | None = None, overrides: Mapping[str, Any] | None = None,
                  defaults: Mapping[str, Any] | None = None) -> RunSetup:
    """Build a RunSetup from RunSetup defaults < a command's ``defaults`` < TOML file < overrides, then fill in
    the method's option defaults. Flag names (``lora_r``, ``attn``, ...) are accepted at every level.

    Args:
        file: optional TOML file with top-level keys and tables ``[lora]``, ``[adapter]``, ...
        overrides: keys of RunSetup (CLI flags); ``None`` values mean "not given" and are skipped.
            Option groups may be given as mappings (``{"lora": {"r": 16}}``).
        defaults: a command's own defaults (``memprof measure`` on a CPU), below the file and the flags.

    Returns:
        A validated RunSetup.

    Raises:
        ConfigError: listing every unknown key, wrong type or invalid value found.
    """
    problems: list[str] = []
    merged: dict[str, Any] = {}
    layers = [_unflatten(dict(defaults or {}), problems)]
    if file is not None:
        layers.append(_unflatten(read_config_file(file), problems))
    layers.append(_unflatten({k: v for k, v in (overrides or {}).items() if v is not None}, problems))
    for layer in layers:
        for key, val in layer.items():
            if val is None:
                continue
            if key in _GROUP_FIELDS and isinstance(val, Mapping):
                group = dict(merged.get(key) or {}) if isinstance(merged.get(key), Mapping) else {}
                group.update({k: v for k, v in val.items() if v is not None})
                if group:
                    merged[key] = group
            else:
                merged[key] = val
    kwargs: dict[str, Any] = {}
    try:  # a method's own defaults inside its option groups (VeRA's rank 256 unless r is given)
        method = parse_enum(Method, merged.get("method", Method.full), "method")
    except ConfigError:
        method = Method.full  # reported below
    for group, values in merged.items():
        if isinstance(values, Mapping) and method_option_defaults(method, group):
            merged[group] = {**method_option_defaults(method, group), **values}
    known = {f.name for f in dataclasses.fields(RunSetup)}
    for key, val in merged.items():
        if key not in known:
            problems.append(f"unknown option '{key}'; known: {', '.join(sorted(known | set(FLAG_ALIASES) | set(FIELD_ALIASES)))}")
        elif key in _ENUM_FIELDS:
            try:
                kwargs[key] = parse_enum(_ENUM_FIELDS[key], val, key.replace("_", " "))
            except ConfigError as exc:
                problems.append(str(exc))
        elif key in _GROUP_FIELDS:
            if isinstance(val, Mapping):
                kwargs[key] = _build_group(_GROUP_FIELDS[key], key, val, problems)
            elif isinstance(val, _GROUP_FIELDS[key]):
                kwargs[key] = val
            else:
                problems.append(f"{key} must be a table of options ({', '.join(f.name for f in dataclasses.fields(_GROUP_FIELDS[key]))}), got {val!r}")
        else:
            kwargs[key] = val
    if problems:
        raise ConfigError("; ".join(problems))
    try:
        setup = RunSetup(**kwargs)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    return with_method_defaults(setup)


def measured_device(file: Path | None, overrides: Mapping[str, Any], cuda_available: bool
                    ) -> tuple[Device, dict[str, Any], list[str]]:
    """Where a measured run runs and the command defaults that go with it: ``device`` from the overrides, else
    the file, else ``auto`` (CUDA when there is one); on a CPU the CPU defaults (CPU_MEASURE_DEFAULTS) and which
    of them neither the file nor the overrides set (they are the ones a note must name).

    Raises:
        ConfigError: an unknown device; DeviceUnavailableError: cuda asked for without CUDA.
    """
    from .errors import DeviceUnavailableError

    raw = _unflatten(read_config_file(file), []) if file is not None else {}
    given = _unflatten({k: v for k, v in overrides.items() if v is not None}, [])
    requested = str(given.get("device") or raw.get("device") or "auto").lower()
    if requested not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"device '{requested}' is not supported; choose one of: auto, cuda, cpu")
    if requested == "cuda" and not cuda_available:
        raise DeviceUnavailableError("device cuda: no CUDA device is available here; use device cpu or auto")
    device = Device.cuda if requested == "cuda" or (requested == "auto" and cuda_available) else Device.cpu
    defaults = dict(CPU_MEASURE_DEFAULTS) if device is Device.cpu else {}
    used = [k for k in defaults if k not in given and k not in raw]
    return device, defaults, used


def resolve_measured(file: Path | None, overrides: Mapping[str, Any], cuda_available: bool
                     ) -> tuple[RunSetup, str | None]:
    """The setup of a measured run, for the CLI, the TOML file and the Python API alike (``measured_device``):
    precedence RunSetup defaults < CPU defaults < file < overrides.

    Returns:
        (setup, note): on a CPU, a note naming the CPU defaults used; else None.
    """
    device, defaults, used = measured_device(file, overrides, cuda_available)
    setup = resolve_setup(file, {**overrides, "device": device.value}, defaults=defaults)
    if device is not Device.cpu:
        return setup, None
    names = [f"{k}={getattr(defaults[k], 'value', defaults[k])}" for k in used]
    return setup, "CPU run" + (f"; CPU defaults used: {', '.join(names)}" if names else "")
