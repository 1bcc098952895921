"""memprof: memory and throughput profiling for fine-tuning transformers.

Three ways to know a number, one record:

    import memprof
    est = memprof.estimate("roberta-base", method="lora", batch_size=8, seq_len=128)   # analytic, pure Python
    tr = memprof.trace("roberta-base", method="lora", batch_size=8, seq_len=128)       # fake tensors (torch stack)
    m = memprof.measure("roberta-base", method="lora")   # real steps: the CLI's record (device auto, CPU defaults)
    rows = memprof.compare("roberta-base", methods=["full", "lora"], batch_size=8, seq_len=128)
    memprof.to_frame(rows)                                # a pandas DataFrame of any records

``model`` is a preset name, a hub id, a config.json path, or a ``ModelSpec``; keyword options are RunSetup
fields (``batch_size``, ``seq_len``, ``dtype``, ``method``, ``lora={"r": 16}``, ...). Nothing heavy is
imported until a function that needs it is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from .compat import require_torch_stack
from .config import RunSetup
from .resolve import resolve_setup
from .records import Category, Estimate, Measurement, MemoryBreakdown, Phase
from .spec import ModelSpec, Task

__version__ = "0.1.0"
__all__ = ["estimate", "trace", "measure", "compare", "to_frame", "spec", "setup", "ModelSpec", "RunSetup", "Estimate",
           "Measurement", "MemoryBreakdown", "Category", "Phase", "Task", "__version__"]


def spec(model: str | ModelSpec | None = None, params: float | None = None, task: str | Task | None = None,
         num_labels: int | None = None, any_family: bool = False) -> ModelSpec:
    """The ModelSpec of a preset / hub id / config.json, or of a LLaMA-like model with ``params`` parameters."""
    from .resolve import parse_enum

    task_enum = parse_enum(Task, task, "task") if task is not None else None
    if isinstance(model, ModelSpec):
        return model.with_task(task_enum, num_labels) if task_enum not in (None, model.task) else model
    from .hub import load_spec_any, resolve_spec

    if any_family and model is not None:
        return load_spec_any(model, task=task_enum, num_labels=num_labels)
    return resolve_spec(model, params, task=task_enum, num_labels=num_labels)[0]


def setup(config: str | Path | None = None, **options: Any) -> RunSetup:
    """A RunSetup from keyword options (RunSetup fields or the CLI's flag names: ``lora_r=16``), over an optional
    TOML ``config`` file, as the CLI resolves them (resolve.resolve_setup)."""
    return resolve_setup(config, options)


def estimate(model: str | ModelSpec | None = None, *, params: float | None = None, explain: bool = False,
             config: str | Path | None = None, peft_config: Any = None, **options: Any) -> Estimate:
    """Analytic estimate of one training step (no torch import). See ``memprof.analytic.estimate``.

    ``peft_config``: a peft config object (LoraConfig, ...), its adapter_config.json or saved directory: sets the
    method and its options (explicit options win); one the analytic model does not cover raises ConfigError
    ("use --trace").
    """
    from .analytic import estimate as _estimate
    from .peft_input import task_of

    the_spec = spec(model, params, task=task_of(peft_config))
    return _estimate(the_spec, setup(config, **_with_peft(options, peft_config)), explain=explain)


def trace(model: str | ModelSpec, *, layers: str | int = "auto", config: str | Path | None = None,
          peft_config: Any = None, **options: Any) -> Estimate:
    """Traced estimate: the real model and method on fake tensors (needs the torch stack); ``peft_config`` (an
    object, a file or a saved directory) is applied as given."""
    require_torch_stack("memprof.trace")
    from .runtime.build import load_peft_config
    from .runtime.trace import trace as _trace

    from .peft_input import task_of

    applied = load_peft_config(peft_config) if isinstance(peft_config, (str, Path)) else peft_config
    the_spec = spec(model, any_family=True, task=task_of(peft_config))
    return _trace(the_spec, setup(config, **_with_peft(options, peft_config, modelled=False)), layers=layers,
                  peft_config=applied)


def _with_peft(options: dict[str, Any], peft_config: Any, modelled: bool = True) -> dict[str, Any]:
    if peft_config is None:
        return options
    from .peft_input import UnmodelledPeftConfig, merge

    try:
        return merge(options, peft_config)
    except UnmodelledPeftConfig:
        if modelled:
            raise
        return options


def measure(model: str | ModelSpec, *, out_dir: str | Path | None = "measurements", isolate: bool = True,
            warmup_steps: int = 1, timed_steps: int | None = None, breakdown: bool = True,
            timeout_s: float | None = None, config: str | Path | None = None, peft_config: str | Path | None = None,
            **options: Any) -> Measurement:
    """Measure real training steps in a fresh subprocess, as ``memprof measure`` does: ``device`` auto (CUDA when
    there is one), on a CPU the CPU defaults for dtype / batch / sequence (resolve.resolve_measured), timing
    until the median is known to +-5%; the record is appended to ``out_dir``'s JSONL (None: not written).
    ``peft_config``: a peft adapter_config.json or saved directory, applied as given."""
    require_torch_stack("memprof.measure")
    from .resolve import resolve_measured
    from .runtime.probes import cuda_available
    from .runtime.runner import measure as _measure

    run, _ = resolve_measured(config, _with_peft(options, peft_config, modelled=False), cuda_available())
    return _measure(spec(model, any_family=True), run, out_dir=out_dir, isolate=isolate, warmup_steps=warmup_steps,
                    timed_steps=timed_steps, breakdown=breakdown, timeout_s=timeout_s, peft_config=peft_config)


def compare(model: str | ModelSpec | None = None, *, methods: Sequence[str] = ("full", "lora", "adapter", "bitfit"),
            params: float | None = None, trace: bool = False, out: str | Path | None = None,
            config: str | Path | None = None, **options: Any) -> list[Any]:
    """``memprof compare`` from Python: estimate every method (and trace it with ``trace=True``) at the options'
    size and precision; returns ComparisonRow records (``to_frame`` makes a DataFrame). Measuring sweeps run from
    the CLI (``memprof compare --measure``), which owns the worker processes and the resumable results file."""
    from .comparison import compare as _compare
    from .sweep import plan_setups, run_sweep

    if trace:
        require_torch_stack("memprof.compare(trace=True)")
    the_spec = spec(model, params, any_family=trace)
    setups = plan_setups(list(methods), options, file=Path(config) if config else None)
    result = run_sweep(the_spec, setups, path=Path(out) if out else None, trace=trace)
    return _compare(result.rows)


def to_frame(records: Iterable[Any]):  # noqa: ANN201 (pandas.DataFrame)
    """One pandas DataFrame of Estimates, Measurements, ComparisonRows or plain row dicts (``to_row()`` each)."""
    from .report import to_frame as _to_frame

    return _to_frame(r.to_row() if hasattr(r, "to_row") else dict(r) for r in records)
