"""peft's whole method catalogue, traced: every config class the installed peft registers, applied with its
defaults to a model, traced on fake tensors and counted by peft itself.

Used by ``tests/runtime/test_catalogue.py`` (each method traces, with peft's trainable count, or fails in one
known way) and ``benchmarks/peft_catalogue.py`` (the table in estimates/validation.md, with a real CPU step
beside each trace). The list is peft's own (``PEFT_TYPE_TO_CONFIG_MAPPING``), so a method a new peft release
adds is walked without a change here.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from ..config import RunSetup
from ..errors import MemprofError
from ..spec import Family, ModelSpec, Task

# Options a method cannot default on any model (peft raises without them); each is the smallest value peft's
# own tests use.
REQUIRED_OPTIONS: dict[str, dict[str, Any]] = {
    "ADALORA": {"total_step": 100},                      # the rank budget schedule needs the run's length
    "ADAPTION_PROMPT": {"adapter_len": 4, "adapter_layers": 2},
    "TRAINABLE_TOKENS": {"token_indices": [0, 1, 2]},    # which embedding rows to train
}

# Module names each family's LoRA-like methods target when a config leaves target_modules unset and peft has no
# default mapping for the model type (queries and values, as peft's defaults for BERT and LLaMA).
TARGETS = {Family.llama: ["q_proj", "v_proj"], Family.bert: ["query", "value"], Family.gpt2: ["c_attn"]}


@dataclass(frozen=True)
class CatalogueRow:
    """One peft method on one model: traced (peak, trainable count and peft's own count) or why not."""

    peft_type: str
    status: str                          # ok | error
    peak_bytes: int | None = None
    trainable_params: int | None = None  # the trace's count (extrapolated when the trace was cut)
    peft_trainable_params: int | None = None  # peft's get_nb_trainable_parameters() on the full-depth model
    message: str | None = None
    notes: tuple[str, ...] = ()


def peft_types() -> list[str]:
    """The installed peft's method names (PEFT_TYPE_TO_CONFIG_MAPPING's keys), sorted."""
    import peft

    return sorted(str(getattr(k, "value", k)) for k in peft.PEFT_TYPE_TO_CONFIG_MAPPING)


def default_config(peft_type: str, spec: ModelSpec) -> Any:
    """The peft config of ``peft_type`` with its defaults, for ``spec``'s task, plus REQUIRED_OPTIONS and the
    family's query/value targets where the config names none."""
    import peft

    mapping = {str(getattr(k, "value", k)): v for k, v in peft.PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    cls = mapping[peft_type]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    options: dict[str, Any] = {"task_type": "CAUSAL_LM" if spec.task is Task.causal_lm else "SEQ_CLS"}
    target = fields.get("target_modules")
    # a list of module names to choose (AdaptionPrompt's is one attention module name, filled in by peft)
    if target is not None and target.default is None and "list" in str(target.type):
        options["target_modules"] = TARGETS[spec.family]
    if "num_virtual_tokens" in fields:
        options["num_virtual_tokens"] = 4
    options.update(REQUIRED_OPTIONS.get(peft_type, {}))
    return cls(**options)


def peft_trainable(spec: ModelSpec, setup: RunSetup, config: Any) -> int:
    """peft's own count of trainable parameters of ``config`` on ``spec`` at full depth (meta device)."""
    from .trace import apply_as_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_as_run(spec, setup, config)
    return int(model.get_nb_trainable_parameters()[0])


def trace_method(spec: ModelSpec, setup: RunSetup, peft_type: str, layers: str | int = "auto") -> CatalogueRow:
    """Trace ``peft_type`` with its defaults on ``spec``; a MemprofError (a one-line refusal) becomes an error row,
    anything else propagates (a traceback is a defect to fix, not a result)."""
    from .trace import trace

    try:
        config = default_config(peft_type, spec)
        counted = peft_trainable(spec, setup, config)
        est = trace(spec, setup, layers=layers, peft_config=config)
    except MemprofError as exc:
        return CatalogueRow(peft_type, "error", message=str(exc))
    except (ImportError, ValueError, TypeError) as exc:  # the config class refuses its own defaults here
        from .refusals import refusal_from

        error = refusal_from(exc, f"a {peft_type} config with its defaults")
        if error is None and not isinstance(exc, (ValueError, TypeError)):
            raise
        return CatalogueRow(peft_type, "error", message=str(error or exc))
    return CatalogueRow(peft_type, "ok", peak_bytes=est.peak_bytes, trainable_params=est.trainable_params,
                        peft_trainable_params=counted, notes=est.notes)
