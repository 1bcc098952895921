"""The memprof command line: parse, resolve the config, call one library function, render.

Every user error (a MemprofError from the core) becomes one red line on stderr and exit code 2, as typer does
for its own usage errors; nothing here computes memory.
"""

import contextlib
import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.text import Text

from .config import CPU_MEASURE_DEFAULTS, Device, RunSetup, resolve_setup
from .errors import ConfigError, MemprofError
from .report import Format, estimate_document, estimate_renderables, render_rows
from .spec import ModelSpec, Task

EXIT_USER_ERROR = 2

app = typer.Typer(
    name="memprof", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Memory and throughput of fine-tuning transformers: estimate, trace, measure, compare full vs PEFT.",
)
console = Console(soft_wrap=True)  # long lines are left to the terminal, so they stay greppable
err_console = Console(stderr=True, soft_wrap=True)  # one line per error, however long


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """MemprofError -> one line on stderr, exit 2. Anything else keeps its traceback (a memprof bug)."""
    try:
        yield
    except MemprofError as exc:
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)))
        raise typer.Exit(code=EXIT_USER_ERROR) from None


# ---- options shared by estimate / fit / trace / measure / compare -------------------------------------------
ModelArg = Annotated[Optional[str], typer.Argument(
    help="Preset name or hub id (roberta-base, meta-llama/Llama-3.2-3B), or a local config.json / model directory.",
    show_default=False)]
ParamsOpt = Annotated[Optional[float], typer.Option(
    "--params", help="Instead of a model: a parameter count (3e9); a LLaMA-like shape is assumed and printed.")]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="table | json | csv | markdown | html")]
GpuOpt = Annotated[Optional[str], typer.Option(
    "--gpu", help="Check the fit on a GPU: a catalog name (A100-80GB, H100, 4090, T4, ...) or a size (24GiB, 80GB).")]

RUN_OPTIONS: list[tuple[str, Any]] = [
    ("method", Annotated[Optional[str], typer.Option(
        "--method", "-m", help="full | lora | qlora | adapter | bitfit | ia3 | prefix | prompt  [default: full]")]),
    ("batch_size", Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Sequences per step.  [default: 1]")]),
    ("seq_len", Annotated[Optional[int], typer.Option("--seq-len", "-s", help="Tokens per sequence.  [default: 512]")]),
    ("dtype", Annotated[Optional[str], typer.Option("--dtype", help="fp32 | bf16 | fp16  [default: bf16]")]),
    ("regime", Annotated[Optional[str], typer.Option(
        "--regime", help="fp32 | pure | amp | mixed  [default: fp32 for fp32, pure for bf16, amp for fp16]")]),
    ("optimizer", Annotated[Optional[str], typer.Option(
        "--optimizer", help="adamw | adamw-8bit | sgd | sgd-momentum | adafactor | lion  [default: adamw]")]),
    ("attn", Annotated[Optional[str], typer.Option("--attn", help="sdpa | eager  [default: sdpa]")]),
    ("device", Annotated[Optional[str], typer.Option(
        "--device", help="cuda | cpu (estimate: the device modelled; measure: also auto)  [default: cuda; measure: auto]")]),
    ("grad_checkpointing", Annotated[Optional[bool], typer.Option(
        "--grad-checkpointing/--no-grad-checkpointing", help="Recompute each block in backward.  [default: off]")]),
    ("dropout", Annotated[Optional[bool], typer.Option(
        "--dropout/--no-dropout", help="Keep the model's dropout probabilities.  [default: on]")]),
    ("task", Annotated[Optional[str], typer.Option(
        "--task", help="seq-cls | causal-lm  [default: seq-cls for encoders, causal-lm for decoders]")]),
    ("num_labels", Annotated[Optional[int], typer.Option("--num-labels", help="Classes of a seq-cls head. [default: 2]")]),
    ("lora_r", Annotated[Optional[int], typer.Option("--lora-r", help="LoRA/QLoRA rank.  [default: 8]")]),
    ("lora_alpha", Annotated[Optional[int], typer.Option("--lora-alpha", help="LoRA alpha.  [default: 8]")]),
    ("lora_dropout", Annotated[Optional[float], typer.Option("--lora-dropout", help="LoRA dropout.  [default: 0]")]),
    ("lora_targets", Annotated[Optional[str], typer.Option(
        "--lora-targets", help="Comma-separated module names, or all-linear.  [default: peft's for the model type]")]),
    ("lora_bias", Annotated[Optional[str], typer.Option("--lora-bias", help="none | all | lora_only  [default: none]")]),
    ("modules_to_save", Annotated[Optional[str], typer.Option(
        "--modules-to-save", help="Comma-separated modules trained in full.  [default: the seq-cls head]")]),
    ("quant_type", Annotated[Optional[str], typer.Option("--quant-type", help="QLoRA: nf4 | fp4  [default: nf4]")]),
    ("double_quant", Annotated[Optional[bool], typer.Option(
        "--double-quant/--no-double-quant", help="QLoRA: quantize the quantization constants.  [default: on]")]),
    ("adapter_variant", Annotated[Optional[str], typer.Option(
        "--adapter-variant", help="houlsby (after attention and FFN) | pfeiffer (after FFN)  [default: houlsby]")]),
    ("adapter_size", Annotated[Optional[int], typer.Option("--adapter-size", help="Bottleneck size r. [default: 64]")]),
    ("adapter_reduction", Annotated[Optional[int], typer.Option(
        "--adapter-reduction", help="Bottleneck as hidden_size // factor (instead of --adapter-size).")]),
    ("adapter_act", Annotated[Optional[str], typer.Option("--adapter-act", help="relu | gelu  [default: relu]")]),
    ("adapter_train_norms", Annotated[Optional[bool], typer.Option(
        "--adapter-train-norms/--adapter-freeze-norms", help="Also train the norm layers.  [default: frozen]")]),
    ("ia3_targets", Annotated[Optional[str], typer.Option("--ia3-targets", help="IA3 target modules (comma-separated).")]),
    ("ia3_feedforward", Annotated[Optional[str], typer.Option(
        "--ia3-feedforward", help="IA3 targets whose input is scaled (comma-separated).")]),
    ("virtual_tokens", Annotated[Optional[int], typer.Option(
        "--virtual-tokens", help="Prefix/prompt tuning: virtual tokens.  [default: 20]")]),
    ("prefix_projection", Annotated[Optional[bool], typer.Option(
        "--prefix-projection/--no-prefix-projection", help="Prefix tuning through an MLP.  [default: off]")]),
    ("cuda_context_mib", Annotated[Optional[float], typer.Option(
        "--cuda-context-mib", help="CUDA context size assumed, MiB.  [default: 500]")]),
    ("reserve_frac", Annotated[Optional[float], typer.Option(
        "--reserve-frac", help="Allocator reserve as a fraction of the allocated peak.  [default: 0.05]")]),
    ("config", Annotated[Optional[Path], typer.Option(
        "--config", help="TOML file of run options (flags override it).")]),
]


def with_run_options(fn: Callable) -> Callable:
    """Give a command every RUN_OPTIONS flag; they arrive as one dict in its ``run`` argument."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "run"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann)
             for name, ann in RUN_OPTIONS]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        run = {name: kwargs.pop(name, None) for name, _ in RUN_OPTIONS}
        return fn(*args, run=run, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params + extra)  # type: ignore[attr-defined]
    return wrapper


def setup_overrides(run: dict[str, Any]) -> dict[str, Any]:
    """Flags -> resolve_setup overrides (None = not given; option groups only when one of theirs is given)."""
    groups = {
        "lora": {"r": run["lora_r"], "alpha": run["lora_alpha"], "dropout": run["lora_dropout"],
                 "targets": run["lora_targets"], "bias": run["lora_bias"], "modules_to_save": run["modules_to_save"]},
        "quant": {"quant_type": run["quant_type"], "double_quant": run["double_quant"]},
        "adapter": {"variant": run["adapter_variant"], "bottleneck": run["adapter_size"],
                    "reduction_factor": run["adapter_reduction"], "activation": run["adapter_act"],
                    "train_norms": run["adapter_train_norms"]},
        "ia3": {"targets": run["ia3_targets"], "feedforward": run["ia3_feedforward"]},
        "prompt": {"num_virtual_tokens": run["virtual_tokens"], "projection": run["prefix_projection"]},
        "overheads": {"cuda_context_bytes": None if run["cuda_context_mib"] is None else int(run["cuda_context_mib"] * 2**20),
                      "allocator_reserve_frac": run["reserve_frac"]},
    }
    out: dict[str, Any] = {
        "method": run["method"], "batch_size": run["batch_size"], "seq_len": run["seq_len"], "dtype": run["dtype"],
        "regime": run["regime"], "optimizer": run["optimizer"], "attn_impl": run["attn"], "device": run["device"],
        "grad_checkpointing": run["grad_checkpointing"], "dropout": run["dropout"],
    }
    for name, values in groups.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            out[name] = given
    return out


def resolve_run(run: dict[str, Any], extra: dict[str, Any] | None = None) -> RunSetup:
    overrides = setup_overrides(run)
    overrides.update(extra or {})
    return resolve_setup(run["config"], overrides)


def resolve_model(model: str | None, params: float | None, run: dict[str, Any], any_family: bool = False
                  ) -> tuple[ModelSpec, str | None]:
    from .config import parse_enum
    from .hub import load_spec_any, resolve_spec

    task = parse_enum(Task, run["task"], "task") if run["task"] else None
    if any_family and model is not None and params is None:
        return load_spec_any(model, task=task, num_labels=run["num_labels"]), None
    return resolve_spec(model, params, task=task, num_labels=run["num_labels"])


def print_json(doc: Any) -> None:
    console.out(json.dumps(doc, indent=2, default=str), highlight=False)


# ---- commands ---------------------------------------------------------------------------------------------
@app.command()
@with_run_options
def estimate(
    model: ModelArg = None,
    params: ParamsOpt = None,
    gpu: GpuOpt = None,
    explain: Annotated[bool, typer.Option("--explain", help="Print every term with its formula and numbers.")] = False,
    trace: Annotated[bool, typer.Option(
        "--trace", help="Run the real model and method as fake tensors instead (needs memprof\\[measure]).")] = False,
    trace_layers: Annotated[str, typer.Option(
        "--trace-layers", help="Trace: 'auto' (2 and 3 blocks, extrapolated), 'full', or a block count.")] = "auto",
    peft_config: Annotated[Optional[Path], typer.Option("--peft-config", help="Trace: a peft config JSON to apply.")] = None,
    fmt: FormatOpt = Format.table,
    run: dict | None = None,
) -> None:
    """Estimate the memory of one training step, without loading weights (or trace it with --trace)."""
    with user_errors():
        assert run is not None
        spec, note = resolve_model(model, params, run, any_family=trace)
        setup = resolve_run(run)
        if trace:
            est = _trace(spec, setup, trace_layers, peft_config)
        else:
            if peft_config is not None:
                raise ConfigError("--peft-config needs --trace (the analytic estimator knows memprof's methods only)")
            from .analytic import estimate as run_estimate

            est = run_estimate(spec, setup, explain=explain)
        fit = _fit(est, gpu)
        _render_estimate(est, fmt, fit=fit, explain=explain, note=note)


def _trace(spec: ModelSpec, setup: RunSetup, layers: str, peft_config: Path | None):  # noqa: ANN202
    try:
        from .runtime.trace import trace as run_trace
    except ImportError as exc:
        from .errors import DependencyMissingError

        raise DependencyMissingError(f"--trace needs the torch stack: pip install 'memprof[measure]' ({exc})") from None
    from .runtime.build import load_peft_config

    if layers not in ("auto", "full"):
        try:
            layers = int(layers)  # type: ignore[assignment]
        except ValueError:
            raise ConfigError(f"--trace-layers must be auto, full or a block count, got {layers!r}") from None
    return run_trace(spec, setup, layers=layers, peft_config=load_peft_config(peft_config) if peft_config else None)


def _fit(est: Any, gpu: str | None) -> Any:
    if gpu is None:
        return None
    from .analytic.fit import check_fit, resolve_gpu

    return check_fit(est, resolve_gpu(gpu))


def _render_estimate(est: Any, fmt: Format, fit: Any = None, explain: bool = False, note: str | None = None,
                     max_batch: int | None = None, max_seq: int | None = None) -> None:
    if fmt is Format.table:
        console.print(estimate_renderables(est, fit=fit, explain=explain, note=note, max_batch=max_batch,
                                           max_seq=max_seq))
    elif fmt is Format.json:
        print_json(estimate_document(est, fit=fit, note=note, max_batch=max_batch, max_seq=max_seq))
    else:
        row = est.to_row()
        if fit is not None:
            row.update({"gpu": fit.gpu.name, "fits": fit.fits, "margin_bytes": fit.margin_bytes})
        if max_batch is not None:
            row["max_batch_size"] = max_batch
        if max_seq is not None:
            row["max_seq_len"] = max_seq
        render_rows([row], fmt, console)
        if explain and est.terms:
            render_rows([{"category": t.category.value, "term": t.name, "formula": t.formula,
                          "substituted": t.substituted, "bytes": t.bytes} for t in est.terms], fmt, console)


@app.command()
@with_run_options
def fit(
    model: ModelArg = None,
    params: ParamsOpt = None,
    gpu: Annotated[str, typer.Option("--gpu", help="GPU name from the catalog or a size (24GiB).")] = "A100-80GB",
    fmt: FormatOpt = Format.table,
    run: dict | None = None,
) -> None:
    """Find the largest batch size (at --seq-len) and sequence length (at --batch-size) that fit a GPU."""
    with user_errors():
        assert run is not None
        from .analytic import estimate as run_estimate
        from .analytic.fit import check_fit, max_batch_size, max_seq_len, resolve_gpu

        spec, note = resolve_model(model, params, run)
        setup = resolve_run(run)
        target = resolve_gpu(gpu)
        best_b = max_batch_size(spec, setup, target)
        best_s = max_seq_len(spec, setup, target)
        est = run_estimate(spec, setup)
        _render_estimate(est, fmt, fit=check_fit(est, target), note=note, max_batch=best_b, max_seq=best_s)


@app.command()
@with_run_options
def trace(
    model: ModelArg = None,
    gpu: GpuOpt = None,
    layers: Annotated[str, typer.Option("--layers", help="auto | full | a block count")] = "auto",
    peft_config: Annotated[Optional[Path], typer.Option("--peft-config", help="A peft config JSON to apply.")] = None,
    fmt: FormatOpt = Format.table,
    run: dict | None = None,
) -> None:
    """Trace one training step of the real model and method on fake tensors (same record as estimate)."""
    with user_errors():
        assert run is not None
        if model is None:
            raise ConfigError("trace needs a model (preset, hub id or config.json)")
        spec, _ = resolve_model(model, None, run, any_family=True)
        setup = resolve_run(run)
        est = _trace(spec, setup, layers, peft_config)
        _render_estimate(est, fmt, fit=_fit(est, gpu))


@app.command()
@with_run_options
def measure(
    model: ModelArg = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Warm-up steps (the first allocates optimizer state).")] = 1,
    steps: Annotated[int, typer.Option("--steps", help="Timed steps.")] = 3,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder of the JSONL results.")] = Path("measurements"),
    name: Annotated[Optional[str], typer.Option("--name", help="Results file stem [default: the model name].")] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Kill the run after this many seconds.")] = None,
    breakdown: Annotated[bool, typer.Option(
        "--breakdown/--no-breakdown", help="One extra tracked step for the categorised peak (needed on CPU).")] = True,
    pretrained: Annotated[Optional[str], typer.Option(
        "--pretrained", help="Load real weights (local path or hub cache) instead of random init.")] = None,
    peft_config: Annotated[Optional[Path], typer.Option("--peft-config", help="Apply this peft config JSON.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.")] = None,
    fmt: FormatOpt = Format.table,
    run: dict | None = None,
) -> None:
    """Measure real training steps (GPU when available, else CPU): peak memory, step time, throughput."""
    with user_errors():
        assert run is not None
        if model is None:
            raise ConfigError("measure needs a model (preset, hub id or config.json)")
        from .runtime.runner import measure as run_measure

        spec, _ = resolve_model(model, None, run, any_family=True)
        device, defaults_note = _measure_device(run)
        extra = {"device": device}
        if device == Device.cpu.value:
            extra.update({k: v for k, v in CPU_MEASURE_DEFAULTS.items() if run.get(k) is None})
        setup = resolve_run(run, extra)
        from .runtime.runner import check_measurable

        check_measurable(setup)  # before the progress bar: a refusal is one line
        from .report import progress_bar, render_measurement

        with progress_bar(console, enabled=fmt is Format.table) as progress:
            m = run_measure(spec, setup, out_dir=out, name=name, timeout_s=timeout, warmup_steps=warmup,
                            timed_steps=steps, breakdown=breakdown, pretrained=pretrained, peft_config=peft_config,
                            cpu_threads=threads, progress=progress)
        render_measurement(m, fmt, console, note=defaults_note if device == "cpu" else None)
        if m.status != "ok":
            raise typer.Exit(code=1)


def _measure_device(run: dict[str, Any]) -> tuple[str, str]:
    from .runtime.probes import cuda_available

    requested = (run["device"] or "auto").lower()
    if requested not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"device '{run['device']}' is not supported; choose one of: auto, cuda, cpu")
    if requested == "cuda" and not cuda_available():
        from .errors import DeviceUnavailableError

        raise DeviceUnavailableError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    device = "cuda" if requested == "cuda" or (requested == "auto" and cuda_available()) else "cpu"
    given = [k for k in CPU_MEASURE_DEFAULTS if run.get(k) is not None]
    defaults = ", ".join(f"{k}={v.value if hasattr(v, 'value') else v}" for k, v in CPU_MEASURE_DEFAULTS.items()
                         if k not in given)
    note = f"CPU run; CPU defaults used: {defaults}" if defaults else "CPU run"
    return device, note


@app.command()
@with_run_options
def compare(
    model: ModelArg = None,
    params: ParamsOpt = None,
    methods: Annotated[str, typer.Option(
        "--methods", help="Comma-separated methods: full, lora, qlora, adapter, bitfit, ia3, prefix, prompt.")
    ] = "full,lora,adapter,bitfit",
    batch_sizes: Annotated[Optional[str], typer.Option(
        "--batch-sizes", help="Comma-separated batch sizes to sweep (instead of --batch-size).")] = None,
    seq_lens: Annotated[Optional[str], typer.Option(
        "--seq-lens", help="Comma-separated sequence lengths to sweep (instead of --seq-len).")] = None,
    precisions: Annotated[Optional[str], typer.Option(
        "--precisions", help="Comma-separated DTYPE[:REGIME] to sweep, e.g. fp32,bf16,fp16:amp,bf16:mixed "
                             "(instead of --dtype/--regime).")] = None,
    checkpointing: Annotated[Optional[str], typer.Option(
        "--checkpointing", help="Sweep gradient checkpointing: off,on (instead of --grad-checkpointing).")] = None,
    do_measure: Annotated[bool, typer.Option(
        "--measure", help="Also measure each run in its own process (GPU when available, else CPU).")] = False,
    do_trace: Annotated[bool, typer.Option(
        "--trace", help="Also trace each run on fake tensors (needs memprof\\[measure]).")] = False,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="JSONL results file; runs already in it are reused.  "
                      "[default: compare/<model>.jsonl with --measure or --trace, else none]")] = None,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Measure again runs recorded as error or timeout (an OOM stays a result).")] = False,
    warmup: Annotated[int, typer.Option("--warmup", min=1, help="Warm-up steps per measured run.")] = 1,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps per measured run.")] = 3,
    timeout: Annotated[Optional[float], typer.Option(
        "--timeout", help="Kill a measured run after this many seconds.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch in measured runs.")] = None,
    by_category: Annotated[bool, typer.Option(
        "--by-category", help="Tables: also the estimated (and measured) bytes of each category.")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Write a PNG of memory by category and step times (needs memprof\\[plot]).")] = None,
    fmt: FormatOpt = Format.table,
    run: dict | None = None,
) -> None:
    """Compare methods (full vs PEFT) across sizes and precisions: estimate, and trace / measure when asked."""
    with user_errors():
        assert run is not None
        from .compare import compare as compare_runs
        from .report import progress_bar, render_comparison
        from .runtime.runner import default_name
        from .sweep import MeasureOptions, parse_list, plan_setups, run_sweep

        if plot is not None:
            from .plot import check_plot_path

            check_plot_path(plot)  # before the sweep, not after it
        spec, note = resolve_model(model, params, run, any_family=do_measure or do_trace)
        axes = _sweep_axes(run, batch_sizes, seq_lens, precisions, checkpointing)
        extra, device_note = _sweep_device(run, axes) if do_measure else ({}, None)
        note = "; ".join(n for n in (note, device_note) if n)
        overrides = {**setup_overrides(run), **extra}
        setups = plan_setups(parse_list(methods, "--methods"), overrides, file=run["config"], **axes)
        if out is None and (do_measure or do_trace):
            out = Path("compare") / f"{default_name(spec)}.jsonl"
        options = MeasureOptions(warmup_steps=warmup, timed_steps=steps, timeout_s=timeout, cpu_threads=threads)
        if note:
            err_console.print(Text(f"note: {note}", style="dim"))
        with progress_bar(err_console, enabled=err_console.is_terminal) as progress:
            result = run_sweep(spec, setups, path=out, trace=do_trace, measure=options if do_measure else None,
                               retry_failed=retry_failed, progress=progress)
        if out is not None:
            err_console.print(Text(f"{out}: {result.reused} of {result.planned} runs reused from earlier sweeps, "
                                   f"{result.planned - result.reused} run now", style="dim"))
        rows = compare_runs(result.rows)
        render_comparison([r.to_row() for r in rows], fmt, console, by_category=by_category)
        _plot(rows, plot)


def _sweep_device(run: dict[str, Any], axes: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Measured sweeps: the device (auto -> cuda or cpu) and, on CPU, the CPU defaults no flag or axis overrides."""
    device, _ = _measure_device(run)
    if device != Device.cpu.value:
        return {"device": device}, f"measured on {device}"
    swept = {"batch_size": axes["batch_sizes"], "seq_len": axes["seq_lens"], "dtype": axes["precisions"]}
    defaults = {k: v for k, v in CPU_MEASURE_DEFAULTS.items() if run.get(k) is None and not swept[k]}
    used = ", ".join(f"{k}={getattr(v, 'value', v)}" for k, v in defaults.items())
    return {"device": device, **defaults}, "measured on CPU" + (f"; CPU defaults used: {used}" if used else "")


def _sweep_axes(run: dict[str, Any], batch_sizes: str | None, seq_lens: str | None, precisions: str | None,
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


def _plot(rows: list, path: Path | None) -> None:
    if path is None:
        return
    from .plot import write_plot

    err_console.print(Text(f"plot written to {write_plot(rows, path)}", style="dim"))


@app.command()
def report(
    files: Annotated[list[Path], typer.Argument(
        help="JSONL results of memprof compare or memprof measure (several files are joined).", show_default=False)],
    by_category: Annotated[bool, typer.Option(
        "--by-category", help="Tables: also the estimated (and measured) bytes of each category.")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Write a PNG of memory by category and step times (needs memprof\\[plot]).")] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Rebuild the comparison table from saved records, without running anything (estimates are recomputed)."""
    with user_errors():
        from .compare import compare as compare_runs
        from .report import render_comparison
        from .sweep import read_records, rows_from_records

        rows = compare_runs(rows_from_records(read_records(files)))
        render_comparison([r.to_row() for r in rows], fmt, console, by_category=by_category)
        _plot(rows, plot)


@app.command()
def presets(fmt: FormatOpt = Format.table) -> None:
    """List the bundled model presets and the GPU catalog."""
    with user_errors():
        from .analytic.params import count_params
        from .hub import resolve_spec
        from .presets import gpu_catalog, preset_names

        rows = []
        for name in preset_names():
            spec, _ = resolve_spec(name)
            rows.append({"model": name, "model_type": spec.model_type, "family": spec.family.value,
                         "task": spec.task.value, "params": count_params(spec), "layers": spec.num_layers,
                         "hidden": spec.hidden_size})
        render_rows(rows, fmt, console, title="model presets")
        gpus = {r["name"]: r for r in gpu_catalog().values()}.values()
        render_rows([{"gpu": g["name"], "memory_bytes": g["memory_mib"] * 2**20, "bf16_tflops": g["peak_bf16_tflops"],
                      "fp32_tflops": g["peak_fp32_tflops"]} for g in gpus], fmt, console, title="GPU catalog")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
