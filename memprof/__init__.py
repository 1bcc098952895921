"""memprof: memory and throughput profiling for fine-tuning transformers.

Three ways to know a number, one record:

    import memprof
    est = memprof.estimate("roberta-base", method="lora", batch_size=8, seq_len=128)   # analytic, pure Python
    tr = memprof.trace("roberta-base", method="lora", batch_size=8, seq_len=128)       # fake tensors (torch stack)
    m = memprof.measure("roberta-base", method="lora", device="cpu", out_dir=None)      # real steps (torch stack)

``model`` is a preset name, a hub id, a config.json path, or a ``ModelSpec``; keyword options are RunSetup
fields (``batch_size``, ``seq_len``, ``dtype``, ``method``, ``lora={"r": 16}``, ...). Nothing heavy is
imported until a function that needs it is called.
"""

from __future__ import annotations

from typing import Any

from .config import RunSetup, resolve_setup
from .records import Category, Estimate, Measurement, MemoryBreakdown, Phase
from .spec import ModelSpec, Task

__version__ = "0.1.0"
__all__ = ["estimate", "trace", "measure", "spec", "setup", "ModelSpec", "RunSetup", "Estimate", "Measurement",
           "MemoryBreakdown", "Category", "Phase", "Task", "__version__"]


def spec(model: str | ModelSpec | None = None, params: float | None = None, task: str | Task | None = None,
         num_labels: int | None = None, any_family: bool = False) -> ModelSpec:
    """The ModelSpec of a preset / hub id / config.json, or of a LLaMA-like model with ``params`` parameters."""
    if isinstance(model, ModelSpec):
        return model
    from .config import parse_enum
    from .hub import load_spec_any, resolve_spec

    task_enum = parse_enum(Task, task, "task") if task is not None else None
    if any_family and model is not None:
        return load_spec_any(model, task=task_enum, num_labels=num_labels)
    return resolve_spec(model, params, task=task_enum, num_labels=num_labels)[0]


def setup(**options: Any) -> RunSetup:
    """A RunSetup from keyword options (the same names and values as the CLI flags' RunSetup fields)."""
    return resolve_setup(None, options)


def estimate(model: str | ModelSpec | None = None, *, params: float | None = None, explain: bool = False,
             **options: Any) -> Estimate:
    """Analytic estimate of one training step (no torch import). See ``memprof.analytic.estimate``."""
    from .analytic import estimate as _estimate

    return _estimate(spec(model, params), setup(**options), explain=explain)


def trace(model: str | ModelSpec, *, layers: str | int = "auto", **options: Any) -> Estimate:
    """Traced estimate: the real model and method on fake tensors (needs the torch stack)."""
    from .runtime.trace import trace as _trace

    return _trace(spec(model, any_family=True), setup(**options), layers=layers)


def measure(model: str | ModelSpec, *, out_dir: str | None = "measurements", isolate: bool = True,
            warmup_steps: int = 2, timed_steps: int = 5, breakdown: bool = True, timeout_s: float | None = None,
            **options: Any) -> Measurement:
    """Measure real training steps in a fresh subprocess and append the result to ``out_dir``'s JSONL."""
    from .runtime.runner import measure as _measure

    return _measure(spec(model, any_family=True), setup(**options), out_dir=out_dir, isolate=isolate,
                    warmup_steps=warmup_steps, timed_steps=timed_steps, breakdown=breakdown, timeout_s=timeout_s)
