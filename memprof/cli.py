"""The memprof command line: parse, resolve the config, call one library function, render (the options the
commands share, and their resolution, are in cli_options.py).

Every user error (a MemprofError from the core) becomes one red line on stderr and exit code 2, as typer does
for its own usage errors; nothing here computes memory. Longer than 500 lines because each command's options and
their one-line help live beside the command (typer); the logic they call lives in the library.
"""

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.text import Text

from .cli_options import (ColumnsOpt, FormatOpt, GpuOpt, ModelArg, ParamsOpt, PeftConfigOpt, StrategiesOpt, WorldSizesOpt,
                          apply_deepspeed, resolve_measure_run, resolve_model, resolve_run,
                          run_console, setup_overrides, sweep_axes, sweep_device, task_overrides, with_parallel_options,
                          with_run_options)
from .config import Device, RunSetup
from .compat import require_torch_stack
from .errors import ConfigError, LibraryRefusalError, MemprofError
from .documents import estimate_document, estimate_renderables
from .report import Format, render_rows
from .spec import ModelSpec, check_sequence_length

EXIT_USER_ERROR = 2

app = typer.Typer(
    name="memprof", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Memory and throughput of fine-tuning transformers: estimate, trace, measure, compare full vs PEFT.",
)
console = Console(soft_wrap=True)  # long lines are left to the terminal, so they stay greppable
err_console = Console(stderr=True, soft_wrap=True)  # one line per error, however long


def _version(value: bool) -> None:
    if value:
        from . import __version__
        from .compat import TESTED_VERSIONS, installed_versions

        installed = ", ".join(f"{k} {v}" for k, v in installed_versions().items() if v)
        console.out(f"memprof {__version__} (tested with {', '.join(f'{k} {v}' for k, v in TESTED_VERSIONS.items())}; "
                    f"installed: {installed or 'the base install, no torch stack'})", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print memprof's version and the library versions.")] = None,
          ) -> None:
    """Memory and throughput of fine-tuning transformers: estimate, trace, measure, compare full vs PEFT."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """MemprofError -> one line on stderr, exit 2. Anything else keeps its traceback (a memprof bug)."""
    try:
        yield
    except MemprofError as exc:
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)))
        raise typer.Exit(code=EXIT_USER_ERROR) from None


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
    peft_config: PeftConfigOpt = None,
    seq_lens: Annotated[Optional[Path], typer.Option(
        "--seq-lens", help="A file of sequence lengths (one per line, 'length count' pairs, JSON, CSV/JSONL length "
                           "column): the distribution of per-step peaks over one epoch; -s is then the maximum "
                           "length \\[default: the longest].")] = None,
    batching: Annotated[str, typer.Option(
        "--batching", help="With --seq-lens: longest | bucketed | packed | max-length.")] = "longest",
    mfu_assumed: Annotated[float, typer.Option(
        "--mfu", min=0.01, max=1.0, help="With --seq-lens and --gpu: the MFU step times assume.")] = 0.4,
    fmt: FormatOpt = Format.table,
    run: dict | None = None,
) -> None:
    """Estimate the memory of one training step, without loading weights (or trace it with --trace)."""
    with user_errors():
        assert run is not None
        run = _with_peft_task(run, peft_config)
        spec, note = resolve_model(model, params, run, any_family=trace)
        apply_deepspeed(run, spec)
        if seq_lens is not None:
            if trace:
                raise ConfigError("--seq-lens works with the analytic estimate, not --trace")
            _estimate_lengths(spec, run, seq_lens, batching, gpu, mfu_assumed, fmt, note)
            return
        setup = resolve_run(run, peft_config=peft_config, modelled=not trace, spec=spec)
        if trace:
            est = _trace(spec, setup, trace_layers, peft_config, "memprof estimate --trace")
        else:
            from .analytic import estimate as run_estimate

            est = run_estimate(spec, setup, explain=explain)
        fit = _fit(est, gpu)
        _render_estimate(est, fmt, fit=fit, explain=explain, note=note)


def _estimate_lengths(spec: ModelSpec, run: dict[str, Any], path: Path, batching: str, gpu: str | None,
                      mfu_assumed: float, fmt: Format, note: str | None) -> None:
    from .analytic import estimate as run_estimate
    from .analytic.lengths import Batching, distribution, load_lengths
    from .resolve import parse_enum
    from .run_documents import render_distribution

    lengths = load_lengths(path)
    if run["seq_len"] is None:
        run = {**run, "seq_len": max(lengths)}
    setup = resolve_run(run)
    dist = distribution(spec, setup, lengths, parse_enum(Batching, batching, "batching"))
    worst = max(dist.worst.micro_batches, key=lambda b: b.batch_size * b.seq_len)
    est = run_estimate(spec, dataclasses.replace(setup, batch_size=worst.batch_size, seq_len=worst.seq_len,
                                                 padded=setup.padded or worst.masked))
    render_distribution(dist, est, fmt, console, fit=_fit(est, gpu), gpu=_gpu(gpu), mfu_assumed=mfu_assumed,
                        note=note)


def _gpu(gpu: str | None) -> Any:
    if gpu is None:
        return None
    from .analytic.fit import resolve_gpu

    return resolve_gpu(gpu)


def _trace(spec: ModelSpec, setup: RunSetup, layers: str, peft_config: Path | None,
           what: str = "memprof trace"):  # noqa: ANN202
    require_torch_stack(what)
    from .runtime.trace import trace as run_trace
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
    verify: Annotated[bool, typer.Option(
        "--verify", help="Then run real steps at the predicted batch size and sequence length on this machine's device "
                         "(each in its own process), backing off after an OOM (needs memprof\\[measure]).")] = False,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="--verify: seconds per attempt.")] = None,
    fmt: FormatOpt = Format.table,
    run: dict | None = None,
) -> None:
    """Find the largest batch size (at --seq-len) and sequence length (at --batch-size) that fit a GPU; with
    --strategy and no --world-size, first the fewest GPUs (1, 2, 4, ..., 1024) on which one rank fits."""
    with user_errors():
        assert run is not None
        from .analytic import estimate as run_estimate
        from .analytic.fit import PARALLEL_FIELDS, check_fit, fit_world, max_batch_size, max_seq_len, resolve_gpu

        spec, note = resolve_model(model, params, run, any_family=False)
        apply_deepspeed(run, spec)
        searching = run["strategy"] is not None and run["world_size"] is None  # analytic.fit.fit_world
        setup = resolve_run({**run, **dict.fromkeys(PARALLEL_FIELDS)} if searching else run)
        if verify and (searching or setup.parallel is not None):
            raise ConfigError("--verify runs one device; measure data-parallel ranks with memprof measure --nproc N")
        target = resolve_gpu(gpu)
        if searching:
            from .run_documents import render_world_fit

            return render_world_fit(fit_world(spec, setup, target, {k: run[k] for k in PARALLEL_FIELDS}), fmt,
                                    console, note=note)
        best_b = max_batch_size(spec, setup, target)
        best_s = max_seq_len(spec, setup, target)
        est = run_estimate(spec, setup)
        _render_estimate(est, fmt, fit=check_fit(est, target), note=note, max_batch=best_b, max_seq=best_s)
        if verify:
            require_torch_stack("memprof fit --verify")
            from .resolve import measured_device
            from .runtime.probes import cuda_available
            from .run_documents import render_fit_checks
            from .runtime.runner import check_measurable
            from .verify import DIMENSIONS, verify_fit

            device = measured_device(None, {}, cuda_available())[0].value
            check_measurable(dataclasses.replace(setup, device=Device(device)), spec)
            from .report import progress_bar

            checks = []
            with progress_bar(err_console, enabled=err_console.is_terminal) as progress:
                for d in DIMENSIONS:
                    checks.append(verify_fit(spec, setup, target, device, dimension=d, timeout_s=timeout,
                                             progress=(lambda label, i, n: progress(f"verifying {label} on {device}",
                                                                                    i, n)) if progress else None))
            render_fit_checks(checks, fmt, console)


@app.command()
@with_run_options
def trace(
    model: ModelArg = None,
    gpu: GpuOpt = None,
    layers: Annotated[str, typer.Option("--layers", help="auto | full | a block count")] = "auto",
    peft_config: PeftConfigOpt = None,
    fmt: FormatOpt = Format.table,
    run: dict | None = None,
) -> None:
    """Trace one training step of the real model and method on fake tensors (same record as estimate)."""
    with user_errors():
        assert run is not None
        if model is None:
            raise ConfigError("trace needs a model (preset, hub id or config.json)")
        run = _with_peft_task(run, peft_config)
        spec, _ = resolve_model(model, None, run, any_family=True)
        apply_deepspeed(run, spec)
        setup = resolve_run(run, peft_config=peft_config, modelled=False, spec=spec)
        est = _trace(spec, setup, layers, peft_config)
        _render_estimate(est, fmt, fit=_fit(est, gpu))


@app.command()
@with_run_options
@with_parallel_options
def measure(
    model: ModelArg = None,
    warmup: Annotated[int, typer.Option("--warmup", min=1, help="Warm-up steps (the first allocates optimizer state).")] = 1,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", min=1, help="Timed steps.  \\[default: until the median is known to +-5% (95% CI), 5-30 steps]")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder of the JSONL results.")] = Path("measurements"),
    name: Annotated[Optional[str], typer.Option("--name", help="Results file stem \\[default: the model name].")] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Kill the run after this many seconds.")] = None,
    breakdown: Annotated[bool, typer.Option(
        "--breakdown/--no-breakdown", help="One extra tracked step for the categorised peak (needed on CPU).")] = True,
    pretrained: Annotated[Optional[str], typer.Option(
        "--pretrained", help="Load real weights (local path or hub cache) instead of random init.")] = None,
    peft_config: PeftConfigOpt = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.")] = None,
    fmt: FormatOpt = Format.table,
    run: dict | None = None,
    par: dict | None = None,
) -> None:
    """Measure real training steps (GPU when available, else CPU): peak memory, step time, throughput; with
    --nproc N, N data-parallel ranks on this machine (a row per rank and the job's max)."""
    with user_errors():
        assert run is not None
        if model is None:
            raise ConfigError("measure needs a model (preset, hub id or config.json)")
        require_torch_stack("memprof measure")

        run = _with_peft_task(run, peft_config)
        spec, _ = resolve_model(model, None, run, any_family=True)
        apply_deepspeed(run, spec, par)
        setup, defaults_note = resolve_measure_run(run, peft_config, spec, par)
        from .runtime.ranks import measure_job, rank_note, ranked_setup
        from .runtime.runner import check_measurable

        setup = ranked_setup(setup)  # one rank is the single-device run; several are checked here, in one line
        check_measurable(setup, spec, peft_config)  # before the progress bar: a refusal is one line
        from .documents import render_measurement
        from .report import progress_bar

        with progress_bar(console, enabled=fmt is Format.table and console.is_terminal) as progress:
            m, ranked = measure_job(spec, setup, out_dir=out, name=name, timeout_s=timeout, warmup_steps=warmup,
                                    timed_steps=steps, breakdown=breakdown, pretrained=pretrained,
                                    peft_config=peft_config, cpu_threads=threads, progress=progress)
        if m.status == "n/a":  # refused by the installed libraries inside the worker: one line, as up front
            raise LibraryRefusalError(m.message or "the installed libraries refuse this run")
        from .runtime.runner import concurrency_note, default_name

        path = (out / f"{name or default_name(spec)}.jsonl") if out is not None else None
        note = "; ".join(n for n in (defaults_note, concurrency_note(m), rank_note(ranked)) if n) or None
        if ranked is not None and fmt is not Format.table:  # every rank's row, then the job's (the max over ranks)
            render_rows([r.to_row() for r in ranked.rows], fmt, console)
        else:
            render_measurement(m, fmt, console, note=note, est=_estimate_of(spec, setup, m.device, peft_config),
                               path=path, plain=_estimate_of(spec, setup, "cuda", peft_config) if m.device == "cpu" else None)
        if m.status != "ok":
            raise typer.Exit(code=1)


def _with_peft_task(run: dict[str, Any], peft_config: Path | None) -> dict[str, Any]:
    """--task from the peft config's task_type when the flag is not given."""
    if peft_config is None or run["task"] is not None:
        return run
    from .peft_input import task_of

    return {**run, "task": task_of(peft_config)}


def _estimate_of(spec: ModelSpec, setup: RunSetup, device: str, peft_config: Path | None = None) -> Any:
    """The analytic estimate of the run just measured (tracked on CPU; plain for "cuda" and a CPU's unobserved
    step), or None where it does not apply (an architecture or a peft config outside the analytic model)."""
    from .analytic import estimate as run_estimate
    from .peft_input import run_options

    try:
        if peft_config is not None:
            run_options(peft_config)  # raises for a config the analytic model does not cover
        return run_estimate(spec, setup, tracked=device == "cpu")
    except MemprofError:
        return None


@app.command()
@with_run_options
def compare(
    model: ModelArg = None,
    params: ParamsOpt = None,
    methods: Annotated[Optional[str], typer.Option(
        "--methods", help="Comma-separated methods (any --method value; -m/--method gives one).  "
                          "\\[default: full,lora,adapter,bitfit; with --arm: full]")] = None,
    arms: Annotated[Optional[list[str]], typer.Option(
        "--arm", help="NAME=PATH: a peft config (adapter_config.json or its directory) as one more run, labelled "
                      "NAME; repeat it for more (LoRA r=8, DoRA r=16 and a saved IA3 config side by side).")] = None,
    batch_sizes: Annotated[Optional[str], typer.Option(
        "--batch-sizes", help="Comma-separated batch sizes to sweep (instead of --batch-size).")] = None,
    seq_lens: Annotated[Optional[str], typer.Option(
        "--seq-lens", help="Comma-separated sequence lengths to sweep (instead of --seq-len).")] = None,
    precisions: Annotated[Optional[str], typer.Option(
        "--precisions", help="Comma-separated DTYPE[:REGIME] to sweep, e.g. fp32,bf16,fp16:amp,bf16:mixed "
                             "(instead of --dtype/--regime).")] = None,
    checkpointing: Annotated[Optional[str], typer.Option(
        "--checkpointing", help="Sweep gradient checkpointing: off,on (instead of --grad-checkpointing).")] = None,
    world_sizes: WorldSizesOpt = None,
    strategies: StrategiesOpt = None,
    gpu: GpuOpt = None,
    do_measure: Annotated[bool, typer.Option(
        "--measure", help="Also measure each run in its own process (GPU when available, else CPU).")] = False,
    do_trace: Annotated[bool, typer.Option(
        "--trace", help="Also trace each run on fake tensors (needs memprof\\[measure]).")] = False,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="JSONL results file; runs already in it are reused.  "
                      "\\[default: compare/<model>.jsonl with --measure or --trace, else none]")] = None,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Measure again runs recorded as error or timeout (an OOM stays a result).")] = False,
    warmup: Annotated[int, typer.Option("--warmup", min=1, help="Warm-up steps per measured run.")] = 1,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", min=1, help="Timed steps per measured run.  \\[default: until the median is known to +-5%]")] = None,
    timeout: Annotated[Optional[float], typer.Option(
        "--timeout", help="Kill a measured run after this many seconds.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch in measured runs.")] = None,
    by_category: Annotated[bool, typer.Option(
        "--by-category", help="Tables: also the estimated (and measured) bytes of each category.")] = False,
    columns: ColumnsOpt = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Write a PNG of memory by category and step times (needs memprof\\[plot]).")] = None,
    fmt: FormatOpt = Format.table,
    run: dict | None = None,
) -> None:
    """Compare methods (full vs PEFT) across sizes and precisions: estimate, and trace / measure when asked;
    with --world-sizes / --strategies, one rank's estimate on each number of GPUs."""
    with user_errors():
        assert run is not None
        from .comparison import compare as compare_runs
        from .documents import render_comparison
        from .report import progress_bar
        from .run_documents import render_rank_rows
        from .runtime.runner import default_name
        from .arms import arm_names, labelled, parse_arms
        from .scaling import check_ranked_flags, plan_worlds, rank_rows
        from .sweep import MeasureOptions, parse_list, plan_setups, run_sweep

        ranked = world_sizes is not None or strategies is not None  # per-rank rows beyond one GPU (scaling.py)
        check_ranked_flags(ranked, {"--gpu": gpu, "--measure": do_measure, "--trace": do_trace, "--out": out,
                                    "--plot": plot, "--by-category": by_category, "--retry-failed": retry_failed})
        if plot is not None:
            from .plot import check_plot_path

            check_plot_path(plot)  # before the sweep, not after it
        if do_measure or do_trace:
            require_torch_stack("memprof compare " + ("--measure" if do_measure else "--trace"))
        spec, note = resolve_model(model, params, run, any_family=do_measure or do_trace)
        apply_deepspeed(run, spec)
        if methods is not None and run["method"] is not None:
            raise ConfigError("give --methods or -m/--method, not both")
        if methods is None:
            methods = run["method"] or ("full" if arms else "full,lora,adapter,bitfit")
        arm_options = parse_arms(arms or [])
        axes = sweep_axes(run, batch_sizes, seq_lens, precisions, checkpointing)
        extra, defaults, device_note = sweep_device(run, axes) if do_measure else ({}, {}, None)
        note = "; ".join(n for n in (note, device_note) if n)
        overrides = {**setup_overrides(run), **task_overrides(spec, run), **extra}
        parallel_flags = overrides.pop("parallel", {}) if ranked else {}  # swept below, not planned per setup
        setups = plan_setups(parse_list(methods, "--methods"), overrides, file=run["config"], defaults=defaults,
                             arms=arm_options, **axes)
        names = arm_names(spec, arm_options, lambda arm: plan_setups([], overrides, file=run["config"],
                                                                     defaults=defaults, arms=[arm], **axes))
        check_sequence_length(spec, max(s.seq_len for s in setups))  # a length no method can run: refused, as estimate
        if ranked:  # one rank's estimate per world size and strategy, analytic only
            ranks = rank_rows(spec, setups, plan_worlds(world_sizes, strategies, parallel_flags), _gpu(gpu))
            return render_rank_rows([labelled(r, names) for r in ranks], fmt, console, note=note or None,
                                    columns_wanted=columns)
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
        rows = [labelled(r, names) for r in compare_runs(result.rows)]
        render_comparison([r.to_row() for r in rows], fmt, console, by_category=by_category, columns_wanted=columns,
                          png=_png(rows, fmt))
        _plot(rows, plot)


def _plot(rows: list, path: Path | None) -> None:
    if path is None:
        return
    from .documents import comparison_view
    from .plot import write_plot

    heading = comparison_view([r.to_row() for r in rows])[0] if rows else None
    err_console.print(Text(f"plot written to {write_plot(rows, path, heading)}", style="dim"))


def _png(rows: list, fmt: Format) -> bytes | None:
    """The comparison figure for an HTML report (embedded as data, no external file)."""
    if fmt is not Format.html or not rows:
        return None
    from .documents import comparison_view
    from .plot import png_bytes

    return png_bytes(rows, comparison_view([r.to_row() for r in rows])[0])


@app.command()
def report(
    files: Annotated[list[Path], typer.Argument(
        help="JSONL results of memprof compare or memprof measure (several files are joined).", show_default=False)],
    by_category: Annotated[bool, typer.Option(
        "--by-category", help="Tables: also the estimated (and measured) bytes of each category.")] = False,
    columns: ColumnsOpt = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Write a PNG of memory by category and step times (needs memprof\\[plot]).")] = None,
    steps: Annotated[bool, typer.Option(
        "--steps", help="Per-step records of a profiled run (memprof.integrations): one row per step and rank; "
                        "--plot draws memory per step against the estimate.")] = False,
    fmt: FormatOpt = Format.table,
) -> None:
    """Rebuild the comparison table from saved records, without running anything (estimates are recomputed)."""
    with user_errors():
        from .comparison import compare as compare_runs
        from .documents import render_comparison
        from .sweep import read_records, rows_from_records

        if steps:
            from .sweep import step_rows

            if plot is not None:
                from .plot import check_plot_path

                check_plot_path(plot)
            from .run_documents import render_steps

            rows_ = step_rows(read_records(files))
            render_steps(rows_, fmt, console)
            if plot is not None:
                from .plot import write_steps_plot

                err_console.print(Text(f"plot written to {write_steps_plot(rows_, plot)}", style="dim"))
            return
        rows = compare_runs(rows_from_records(read_records(files)))
        render_comparison([r.to_row() for r in rows], fmt, console, by_category=by_category, columns_wanted=columns,
                          png=_png(rows, fmt))
        _plot(rows, plot)


@app.command()
def presets(fmt: FormatOpt = Format.table) -> None:
    """List the bundled model presets and the GPU catalog."""
    with user_errors():
        from .analytic.params import count_params
        from .hub import load_spec_any
        from .presets import gpu_catalog, preset_names

        rows = []
        for name in preset_names():
            spec = load_spec_any(name)  # the analytic families' spec; ViT's as the trace reads it
            rows.append({"model": name, "model_type": spec.model_type, "family": spec.family.value, "task": spec.task.value,
                         "params": count_params(spec) if spec.family.value != "other" else None,  # ViT: traced only
                         "layers": spec.num_layers, "hidden": spec.hidden_size})
        render_rows(rows, fmt, console, title="model presets")
        gpus = {r["name"]: r for r in gpu_catalog().values()}.values()
        rows = [{"gpu": g["name"], "memory_bytes": g["memory_mib"] * 2**20, "bf16_tflops": g["peak_bf16_tflops"],
                 "fp16_tflops": g["peak_fp16_tflops"], "tf32_tflops": g["peak_tf32_tflops"],
                 "fp32_tflops": g["peak_fp32_tflops"], "source": g["source"]} for g in gpus]
        if fmt is not Format.table:
            render_rows(rows, fmt, console, title="GPU catalog (dense peaks, datasheets)")
            return
        # a terminal table: the sources as numbered notes under it, so the numbers keep to the width
        sources = list(dict.fromkeys(r["source"] for r in rows))
        rows = [{**r, "source": f"[{sources.index(r['source']) + 1}]"} for r in rows]
        render_rows(rows, fmt, console, title="GPU catalog (dense peak TFLOPS, from the sources below)",
                    labels={"memory_bytes": "memory", "bf16_tflops": "bf16", "fp16_tflops": "fp16",
                            "tf32_tflops": "tf32", "fp32_tflops": "fp32"})
        for i, source in enumerate(sources, 1):
            console.print(f"[{i}] {source}", markup=False, highlight=False)


def main() -> None:
    """The console script (``memprof``, ``python -m memprof``)."""
    sys.exit(run_console(app, err_console))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
