"""A peft config as a user has it (a ``LoraConfig`` object, its ``adapter_config.json``, or the directory
``save_pretrained`` wrote) mapped onto memprof's run options, so every command labels and estimates the run it
describes (pure: reads JSON, never imports peft).

Modelled analytically: LoRA (r, lora_alpha, lora_dropout, target_modules as names, "all-linear" or a regular
expression, bias, modules_to_save, use_dora; rsLoRA and the PiSSA / OLoRA / LoftQ / EVA initialisations change
values, not memory), IA3 (target and feed-forward modules), prefix tuning (virtual tokens, projection and its
width), prompt tuning (virtual tokens), AdaLoRA (init_r), VeRA, LoHa and LoKr (rank, alpha, dropout, targets,
modules_to_save), LN tuning at peft's default targets, P-tuning's MLP encoder, trainable tokens (how many). What
would change memory in ways the analytic model does not follow
(per-module ranks, a subset of layers, other peft methods) is refused in one line that says to use ``--trace``,
which runs the real peft code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .config import LORA_FAMILY, Method
from .errors import ConfigError
from .resolve import read_json_file

CONFIG_FILE = "adapter_config.json"  # what PeftConfig.save_pretrained writes into its directory
TASKS = {"SEQ_CLS": "seq-cls", "CAUSAL_LM": "causal-lm"}


class UnmodelledPeftConfig(ConfigError):
    """A valid peft config whose memory the analytic model does not describe (``--trace`` does)."""


def load_peft_config(path: str | Path) -> dict[str, Any]:
    """The JSON of a peft config file, or of ``adapter_config.json`` in a saved adapter directory.

    Raises:
        ConfigError: missing, unreadable, not JSON, or not a peft config (no peft_type).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"{path} is a directory without {CONFIG_FILE}; give a peft config file or the "
                              "directory save_pretrained wrote")
        path = path / CONFIG_FILE
    data = read_json_file(path, "peft config")
    if not isinstance(data, dict) or not isinstance(data.get("peft_type"), str):
        raise ConfigError(f"{path} is not a peft config (a JSON object with a peft_type)")
    return data


def peft_dict(config: Any) -> dict[str, Any]:
    """A peft config object (LoraConfig, ...), a dict, or a path, as the dict its JSON file holds."""
    if isinstance(config, (str, Path)):
        return load_peft_config(config)
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        data = to_dict()
        peft_type = data.get("peft_type")
        data["peft_type"] = getattr(peft_type, "value", peft_type)
        task = data.get("task_type")
        data["task_type"] = getattr(task, "value", task)
        return data
    raise ConfigError(f"not a peft config: {type(config).__name__}")


# peft_type -> (memprof method, the rank's key, options memprof models only at their default); peft's default
# rank of each is config.LORA_FAMILY's
LORA_LIKE: dict[str, tuple[Method, str, dict[str, Any]]] = {
    "ADALORA": (Method.adalora, "init_r", {"rank_pattern": None, "layers_to_transform": None}),
    "VERA": (Method.vera, "r", {"layers_to_transform": None}),
    "LOHA": (Method.loha, "r", {"rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                                "rank_pattern": None, "layers_to_transform": None}),
    "LOKR": (Method.lokr, "r", {"rank_dropout": 0.0, "module_dropout": 0.0, "decompose_both": False,
                                "decompose_factor": -1, "rank_pattern": None, "layers_to_transform": None}),
}


def _names(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return ("all-linear",) if value == "all-linear" else ("re:" + value,)
    return tuple(sorted(str(v) for v in value))


def run_options(config: Any) -> dict[str, Any]:
    """resolve_setup overrides (the method and its option group) of a peft config (its task: ``task_of``).

    Raises:
        UnmodelledPeftConfig: a method or option the analytic model does not follow (use --trace).
        ConfigError: not a peft config.
    """
    data = peft_dict(config)
    kind = str(data.get("peft_type", "")).upper()
    out: dict[str, Any] = {}

    def refuse(what: str) -> UnmodelledPeftConfig:
        return UnmodelledPeftConfig(f"the peft config's {what} is not in memprof's analytic model; use --trace "
                                    "(it runs the real peft code on fake tensors)")

    if kind == "LORA":
        if data.get("rank_pattern") or data.get("alpha_pattern"):
            raise refuse("per-module rank_pattern / alpha_pattern")
        if data.get("layers_to_transform") is not None:
            raise refuse("layers_to_transform (LoRA on a subset of layers)")
        if data.get("target_parameters"):
            raise refuse("target_parameters (LoRA on parameters, not modules)")
        lora: dict[str, Any] = {"r": int(data.get("r", 8)), "alpha": int(data.get("lora_alpha", 8)),
                                "dropout": float(data.get("lora_dropout", 0.0)), "bias": data.get("bias", "none"),
                                "targets": _names(data.get("target_modules"))}
        if data.get("modules_to_save") is not None:
            lora["modules_to_save"] = tuple(data["modules_to_save"])
        if data.get("use_dora"):
            lora["dora"] = True
        out.update(method="lora", lora=lora)
    elif kind == "IA3":
        out.update(method="ia3", ia3={"targets": _names(data.get("target_modules")),
                                      "feedforward": _names(data.get("feedforward_modules"))})
    elif kind == "PREFIX_TUNING":
        out.update(method="prefix", prompt={"num_virtual_tokens": int(data.get("num_virtual_tokens", 20)),
                                            "projection": bool(data.get("prefix_projection", False)),
                                            "projection_hidden": data.get("encoder_hidden_size")})
    elif kind == "PROMPT_TUNING":
        out.update(method="prompt", prompt={"num_virtual_tokens": int(data.get("num_virtual_tokens", 20))})
    elif kind in LORA_LIKE:
        method, rank_key, unmodelled = LORA_LIKE[kind]
        for key, default in unmodelled.items():
            if data.get(key) and data.get(key) != default:  # saved configs carry the defaults ({} rank_pattern)
                raise refuse(f"{key} = {data[key]!r}")
        lora = {"r": int(data.get(rank_key) or LORA_FAMILY[method]), "targets": _names(data.get("target_modules"))}
        if "alpha" in data or "lora_alpha" in data:
            lora["alpha"] = int(data.get("alpha", data.get("lora_alpha")) or 8)
        if data.get("lora_dropout") or data.get("vera_dropout"):
            lora["dropout"] = float(data.get("lora_dropout") or data.get("vera_dropout"))
        if data.get("modules_to_save") is not None:
            lora["modules_to_save"] = tuple(data["modules_to_save"])
        out.update(method=method.value, lora=lora)
    elif kind == "LN_TUNING" and data.get("target_modules") is None:
        out.update(method="ln-tuning")
    elif kind == "P_TUNING":
        if str(data.get("encoder_reparameterization_type", "MLP")).upper().split(".")[-1] != "MLP" \
                or int(data.get("encoder_num_layers", 2)) != 2:
            raise refuse("prompt encoder other than peft's default 2-layer MLP (LSTM, or another depth)")
        out.update(method="p-tuning", prompt={"num_virtual_tokens": int(data.get("num_virtual_tokens", 20)),
                                              "projection_hidden": data.get("encoder_hidden_size")})
    elif kind == "TRAINABLE_TOKENS" and data.get("target_modules") in (None, ["embed_tokens"], "embed_tokens"):
        out.update(method="trainable-tokens",
                   trainable_tokens={"count": max(1, len(data.get("token_indices") or []))})
    else:
        raise refuse(f"method {kind or '?'}")
    return out


def merge(options: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """Flags / API options with a peft config under them: the config sets the method and its options, explicit
    options win (``--method qlora`` keeps the config's LoRA options on a 4-bit base)."""
    from_config = run_options(config)
    out = dict(from_config)
    for key, value in options.items():
        if value is None:
            continue
        if key in out and isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = {**out[key], **{k: v for k, v in value.items() if v is not None}}
        elif key == "method" and value == "qlora" and from_config.get("method") == "lora":
            out["method"] = "qlora"
        else:
            out[key] = value
    return out


def task_of(config: Any) -> str | None:
    """The model task a peft config was made for (its task_type: seq-cls, causal-lm), None when it names none."""
    if config is None:
        return None
    return TASKS.get(str(peft_dict(config).get("task_type")))
