"""The views of memprof's records: one estimate (rich lines, a JSON document, --explain terms), one
measurement, and a comparison table with its footnotes; each in every output format, built on report.py's
row renderers.
"""

from __future__ import annotations

from typing import Any, Sequence

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .records import CATEGORIES, Category, Estimate, MemoryBreakdown, loop_description
from .report import (Format, fmt_cell, md_escape, print_unwrapped, render_rows, rows_csv, rows_json,
                     rows_markdown, rows_table, table_width)
from .units import fmt_bytes, fmt_bytes_auto, fmt_count, fmt_pct


CATEGORY_LABELS = {
    Category.params_trainable: "trainable weights",
    Category.params_frozen: "frozen weights",
    Category.gradients: "gradients",
    Category.optimizer_states: "optimizer states",
    Category.master_weights: "fp32 master weights",
    Category.weight_copies: "weight copies (autocast / dequantized / gathered)",
    Category.activations: "activations (kept for backward)",
    Category.temporaries: "temporaries",
    Category.inputs: "batch",
    Category.overhead: "overhead",
}


def describe_setup(est: Estimate) -> str:
    """One line naming everything that defines the run (regime always stated)."""
    s = est.setup
    method = s.method.value
    if s.lora is not None:
        method += f" r={s.lora.r}" + (" DoRA" if s.lora.dora else "")
    if s.adapter is not None:
        method += f" {s.adapter.variant.value} r={s.adapter.bottleneck_size(est.spec.hidden_size)}"
    if s.prompt is not None:
        method += f" {s.prompt.num_virtual_tokens} tokens"
    parts = [
        f"{est.spec.name} ({est.spec.source}, {est.spec.task.value})", method, f"b={s.batch_size} s={s.seq_len}",
        s.dtype.value if s.dtype.value == s.effective_regime.value else f"{s.dtype.value} {s.effective_regime.value}",
        f"{s.optimizer.value} {s.effective_optimizer_impl.value}", s.attn_impl.value, s.device.value,
        loop_description(s),
    ]
    if s.grad_checkpointing:
        parts.append("grad checkpointing")
    if not s.dropout:
        parts.append("no dropout")
    return " | ".join(parts)


def breakdown_rows(bd: MemoryBreakdown) -> list[tuple[str, int]]:
    return [(CATEGORY_LABELS[c], bd.get(c)) for c in CATEGORIES if c is not Category.overhead and bd.get(c)]


def estimate_renderables(est: Estimate, fit: Any = None, explain: bool = False, note: str | None = None,
                         max_batch: int | None = None, max_seq: int | None = None) -> Group:
    """The rich view of one estimate: breakdown at the peak, phases, device totals, fit, notes."""
    title = Text(f"memprof {est.kind} estimate", style="bold")
    head = Text(describe_setup(est))
    share = est.trainable_params / est.total_params if est.total_params else 0
    params = Text(f"parameters: {fmt_count(est.total_params)} total, {fmt_count(est.trainable_params)} trainable "
                  f"({fmt_pct(share, 2)})")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column(f"at the peak ({est.peak_phase.value}, steady state)")
    table.add_column("memory", justify="right")
    table.add_column("share", justify="right")
    total = est.peak_bytes or 1
    for label, value in breakdown_rows(est.peak):
        table.add_row(label, fmt_bytes(value), fmt_pct(value / total))
    table.add_row(Text("peak tensor memory", style="bold"), Text(fmt_bytes(est.peak_bytes), style="bold"), "")
    dev = est.device
    if est.setup.device.value == "cuda":
        table.add_row("+ cuBLAS workspace = allocated", fmt_bytes(dev.allocated_bytes), "")
        table.add_row("+ allocator reserve = reserved", fmt_bytes(dev.reserved_bytes), "")
        table.add_row(Text("+ CUDA context = device total", style="bold"),
                      Text(fmt_bytes(dev.device_total_bytes), style="bold"), "")
    phases = "  ".join(f"{p.value} {fmt_bytes(bd.total_bytes)}" for p, bd in est.phase_peaks)
    lines = [title, head, params, Text(""), table, Text(""),
             Text(f"phase peaks: {phases}"),
             Text(f"first step: {fmt_bytes(est.first_step_peak_bytes)}   "
                  + (f"after optimizer.step(): {fmt_bytes(est.after_step_bytes)}   "
                     if est.after_step_bytes is not None else "")
                  + f"after zero_grad (between steps): {fmt_bytes(est.steady_bytes)}")]
    if est.host_bytes is not None:
        lines.append(Text(f"host (CPU) memory per rank, offloaded states: {fmt_bytes(est.host_bytes)}"))
    if est.elapsed_s is not None:
        lines.append(Text(f"traced in {est.elapsed_s:.1f} s"))
    if fit is not None:
        verdict = "fits" if fit.fits else "does NOT fit"
        style = "green" if fit.fits else "red"
        how = (f"{fmt_bytes(fit.margin_bytes)} free" if fit.fits else f"short by {fmt_bytes(-fit.margin_bytes)}")
        lines.append(Text(f"{fit.gpu.name} ({fmt_bytes(fit.gpu.memory_bytes)}): {verdict}, {how} "
                          f"({fmt_pct(fit.used_fraction)} used)", style=style))
    if max_batch is not None:
        from .analytic.fit import BATCH_SEARCH_LIMIT

        more = " or more (the search stops there)" if max_batch >= BATCH_SEARCH_LIMIT else ""
        lines.append(Text(f"largest batch size that fits at s={est.setup.seq_len}: {max_batch}{more}"))
    if max_seq is not None:
        from .analytic.fit import SEQ_SEARCH_LIMIT
        from .spec import position_limit

        table = position_limit(est.spec)
        more = (f" (the model's {table} learned positions; longer sequences do not run)" if table == max_seq else
                " or more (the search stops there)" if max_seq >= SEQ_SEARCH_LIMIT else "")
        lines.append(Text(f"largest sequence length that fits at b={est.setup.batch_size}: {max_seq}{more}"))
    for n in ([note] if note else []) + list(est.notes):
        lines.append(Text(f"note: {n}", style="dim"))
    if explain:
        lines.append(Text(""))
        lines.append(terms_table(est))
    return Group(*lines)


def terms_table(est: Estimate) -> Group:
    """--explain: every term as 'name: formula = numbers = bytes', grouped by category and scope."""
    lines: list[Text] = [Text("terms: formula = numbers substituted = bytes", style="bold")]
    category, scope = None, None
    for t in est.terms:
        if t.category is not category:
            category, scope = t.category, None
            lines.append(Text(CATEGORY_LABELS[t.category], style="bold"))
        name = t.name
        if ": " in t.name:
            head, name = t.name.split(": ", 1)
            if head != scope:
                scope = head
                lines.append(Text(f"  {head}", style="italic"))
        indent = "    " if scope else "  "
        source = f"  [{t.source}]" if t.source and t.category is not Category.activations else ""
        line = Text(f"{indent}{name}: ")
        line.append(f"{t.formula} = {t.substituted} = ", style="dim")
        line.append(fmt_bytes_auto(t.bytes))
        line.append(source, style="dim")
        lines.append(line)
    acts = [t for t in est.terms if t.category is Category.activations]
    if acts:
        lines.append(Text(f"  kept for backward at the end of the forward: {fmt_bytes_auto(sum(t.bytes for t in acts))}",
                          style="bold"))
        lines.append(Text(f"  [{acts[0].source}]", style="dim"))
    return Group(*lines)


def estimate_document(est: Estimate, fit: Any = None, note: str | None = None, max_batch: int | None = None,
                      max_seq: int | None = None) -> dict[str, Any]:
    """A JSON-ready dict of one estimate (raw bytes)."""
    doc: dict[str, Any] = {"estimate": est.to_row(),
                           "breakdown_bytes": est.peak.as_dict(),
                           "phase_peaks_bytes": {p.value: bd.as_dict() for p, bd in est.phase_peaks},
                           "notes": ([note] if note else []) + list(est.notes)}
    if est.terms:
        doc["terms"] = [{"category": t.category.value, "name": t.name, "formula": t.formula,
                         "substituted": t.substituted, "bytes": t.bytes, "source": t.source} for t in est.terms]
    if fit is not None:
        doc["fit"] = {"gpu": fit.gpu.name, "gpu_memory_bytes": fit.gpu.memory_bytes, "needed_bytes": fit.needed_bytes,
                      "fits": fit.fits, "margin_bytes": fit.margin_bytes}
    if max_batch is not None:
        doc["max_batch_size"] = max_batch
    if max_seq is not None:
        doc["max_seq_len"] = max_seq
    return doc


# ---- measurements -------------------------------------------------------------------------------------------
MEASUREMENT_COLUMNS = ("model", "method", "batch_size", "seq_len", "regime", "device", "status", "trainable_params",
                       "peak_bytes", "reserved_bytes", "device_used_bytes", "step_time_median_s", "tokens_per_s",
                       "mfu", "energy_per_step_j")


def render_measurement(m: Any, fmt: Format, console: Console, note: str | None = None, est: Any = None,
                       path: Any = None, plain: Any = None) -> None:
    """One measurement: its summary row, beside it the analytic estimate of exactly the run measured (``est``)
    and the error, the breakdown at the peak (table mode), and where the record was written. On CPU ``plain``
    (the estimate of an unobserved run) is set beside the unobserved step's allocator-level peak."""
    row = m.to_row()
    predicted = None
    if est is not None and m.status == "ok" and m.peak_bytes:
        # CPU: the tracked estimate (the tracker observed the step); CUDA: plain + cuBLAS workspace
        predicted = est.peak_bytes if m.device == "cpu" else est.device.allocated_bytes
        row.update(est_peak_bytes=predicted, est_vs_measured_frac=(predicted - m.peak_bytes) / m.peak_bytes)
    unobserved = getattr(m, "unobserved_peak_bytes", None)
    if plain is not None and m.status == "ok" and unobserved:
        row.update(est_plain_peak_bytes=plain.peak_bytes,
                   est_plain_vs_unobserved_frac=(plain.peak_bytes - unobserved) / unobserved)
    if fmt is not Format.table:
        render_rows([row], fmt, console)
        return
    s = row
    options = s.get("method_options") or ""
    method = s["method"] + (f" [{options}]" if options else "")
    loop = s.get("loop_options") or ""
    precision = s["dtype"] if s["dtype"] == s["regime"] else f"{s['dtype']} {s['regime']}"
    lines = [Text(f"memprof measurement ({m.device.upper()}{', ' + m.env.device_name if m.env and m.env.device_name else ''})",
                  style="bold"),
             Text(f"{m.spec_name} | {method} | b={s['batch_size']} s={s['seq_len']} | {precision} | {s['optimizer']} | "
                  f"{s['attn_impl']} | {loop or 'torch loop'}")]
    if m.status != "ok":
        lines.append(Text(f"status: {m.status}: {m.message}", style="bold red"))
        console.print(Group(*lines))
        return
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column()
    table.add_column(justify="right")
    share = (m.trainable_params or 0) / (m.total_params or 1)
    table.add_row("parameters (trainable)", f"{fmt_count(m.total_params)} ({fmt_count(m.trainable_params)}, "
                                            f"{fmt_pct(share, 2)})")
    peak_label = ("peak allocated (max_memory_allocated)" if m.device == "cuda" else "peak live tensors (tracker)"
                  if m.tracker_peak_bytes is not None or not unobserved else "peak allocated (allocator level)")
    table.add_row(peak_label, fmt_bytes(m.peak_bytes))
    if predicted is not None:
        table.add_row("memprof's estimate of this run" + (" (+ cuBLAS workspace)" if m.device == "cuda" else
                                                           " (tracked)"),
                      f"{fmt_bytes(predicted)} ({100 * row['est_vs_measured_frac']:+.2f}%)")
    if unobserved:
        table.add_row(f"peak allocated, unobserved step ({m.unobserved_phase})",
                      fmt_bytes(unobserved))
        if "est_plain_vs_unobserved_frac" in row:
            table.add_row("memprof's estimate of a plain run",
                          f"{fmt_bytes(plain.peak_bytes)} ({100 * row['est_plain_vs_unobserved_frac']:+.2f}%)")
    if m.reserved_bytes is not None:
        table.add_row("peak reserved (max_memory_reserved)", fmt_bytes(m.reserved_bytes))
    if m.device_used_bytes is not None:
        table.add_row("device memory used by the process (NVML)", fmt_bytes(m.device_used_bytes))
    if m.rss_peak_bytes is not None:
        table.add_row("process peak RSS (context)", fmt_bytes(m.rss_peak_bytes))
    if m.step_time_ci95_s is not None:
        lo, hi = m.step_time_ci95_s
        table.add_row(f"step time median (95% CI), {m.timed_steps} timed steps",
                      f"{m.step_time_median_s:.3f} s ({lo:.3f}-{hi:.3f})")
    else:
        table.add_row("step time median (p10-p90)",
                      f"{m.step_time_median_s:.3f} s ({m.step_time_p10_s:.3f}-{m.step_time_p90_s:.3f})")
    table.add_row("throughput", f"{m.samples_per_s:.2f} samples/s, {m.tokens_per_s:,.0f} tokens/s")
    if m.flops_per_step:
        table.add_row("training FLOPs per step", f"{m.flops_per_step:.3e}")
    if m.mfu is not None:
        table.add_row("MFU", fmt_pct(m.mfu))
    if m.energy_per_step_j is not None:
        table.add_row("energy per step (NVML)", f"{m.energy_per_step_j:.1f} J")
    lines += [Text(""), table]
    if m.breakdown is not None:
        bd = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        bd.add_column(f"tracked peak ({m.peak_phase or '-'})")
        bd.add_column("memory", justify="right")
        for label, value in breakdown_rows(m.breakdown):
            bd.add_row(label, fmt_bytes(value))
        bd.add_row("total (tracker)", fmt_bytes(m.breakdown.total_bytes))
        lines += [Text(""), bd]
    notes = ([note] if note else []) + list((m.extra or {}).get("notes", []))
    lines += [Text(f"note: {n}", style="dim") for n in notes]
    if m.env is not None:
        e = m.env
        lines.append(Text(f"torch {e.torch_version}, transformers {e.transformers_version}, peft {e.peft_version}, "
                          f"{e.cpu_threads} CPU threads, {e.date}", style="dim"))
    if path is not None:
        lines.append(Text(f"record appended to {path}", style="dim"))
    console.print(Group(*lines))


# ---- comparisons (memprof compare / report) -------------------------------------------------------------------
COMPARISON_LABELS = {
    "model": "model", "task": "task", "method": "method", "method_options": "options", "loop_options": "loop",
    "batch_size": "b",
    "seq_len": "s", "dtype": "dtype", "regime": "regime", "optimizer": "optimizer", "attn_impl": "attention",
    "device": "device", "grad_checkpointing": "grad ckpt", "dropout": "dropout", "status": "status",
    "trainable_params": "trainable", "trainable_frac": "trainable %", "est_peak_bytes": "est. peak",
    "est_device_total_bytes": "est. device total",
    "traced_peak_bytes": "traced peak", "measured_peak_bytes": "measured peak",
    "measured_rss_peak_bytes": "process RSS peak",
    "est_compared_bytes": "est. as measured", "est_vs_measured_frac": "est. error",
    "traced_vs_measured_frac": "trace error", "est_vs_traced_frac": "est. vs trace",
    "est_saved_vs_full_frac": "saved vs full (est.)", "measured_saved_vs_full_frac": "saved vs full (measured)",
    "flops_vs_full_frac": "FLOPs vs full", "step_time_s": "step (s)", "tokens_per_s": "tokens/s",
    "speedup_vs_full": "speed-up vs full", "energy_per_step_j": "J/step", "note": "note",
}
_SETUP_COLUMNS = ("model", "task", "method", "method_options", "batch_size", "seq_len", "dtype", "regime", "optimizer",
                  "attn_impl", "device", "grad_checkpointing", "dropout", "loop_options")
_METRIC_COLUMNS = ("status", "trainable_params", "trainable_frac", "est_peak_bytes", "est_device_total_bytes",
                   "traced_peak_bytes", "measured_peak_bytes", "measured_rss_peak_bytes", "est_compared_bytes",
                   "est_vs_measured_frac", "traced_vs_measured_frac", "est_vs_traced_frac", "est_saved_vs_full_frac",
                   "measured_saved_vs_full_frac", "flops_vs_full_frac", "step_time_s", "tokens_per_s",
                   "speedup_vs_full", "energy_per_step_j", "note")


def comparison_view(rows: Sequence[dict[str, Any]], by_category: bool = False
                    ) -> tuple[str, list[str], dict[str, str], list[str]]:
    """For human formats: (heading naming the setup shared by every row, columns, labels, footnotes).

    Setup columns that vary become columns; metric columns that are empty in every row are left out.
    """
    def constant(c: str) -> bool:
        return len({repr(r.get(c)) for r in rows}) <= 1

    def present(c: str) -> bool:
        return any(r.get(c) is not None for r in rows)

    shared = [c for c in _SETUP_COLUMNS if constant(c) and rows and rows[0].get(c) not in (None, "")]
    heading = " | ".join(f"{COMPARISON_LABELS[c]} {fmt_cell(rows[0][c], c)}" for c in shared)
    columns = [c for c in _SETUP_COLUMNS if not constant(c) or c == "method"]
    for c in _METRIC_COLUMNS:
        if c == "status" and all(r.get(c) == "ok" for r in rows):
            continue
        if c == "est_device_total_bytes" and all(r.get("device") != "cuda" for r in rows):
            continue  # the CUDA context and allocator reserve exist on a GPU only
        if c == "est_compared_bytes" and all(r.get(c) in (None, r.get("est_peak_bytes")) for r in rows):
            continue  # the compared estimate is the plain one: no extra column
        if present(c):
            columns.append(c)
        if c == "est_peak_bytes" and by_category:
            columns += [f"est_{k.value}_bytes" for k in CATEGORIES if k is not Category.overhead
                        and any(r.get(f"est_{k.value}_bytes") for r in rows)]
        if c == "measured_peak_bytes" and by_category:
            columns += [f"measured_{k.value}_bytes" for k in CATEGORIES if k is not Category.overhead
                        and any(r.get(f"measured_{k.value}_bytes") for r in rows)]
    labels = dict(COMPARISON_LABELS)
    for k in CATEGORIES:
        labels[f"est_{k.value}_bytes"] = f"est. {CATEGORY_LABELS[k]}"
        labels[f"measured_{k.value}_bytes"] = f"measured {CATEGORY_LABELS[k]}"
    return heading, columns, labels, comparison_notes(rows)


def comparison_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Footnotes: what each number is, and where the measurements ran."""
    notes = ["est. peak: analytic estimate of a plain training step's peak tensor memory (no CUDA context or "
             "allocator reserve); saved vs full: 1 - peak / full fine-tuning's peak at the same model, size and "
             "precision"]
    if any(r.get("device") == "cuda" and r.get("est_device_total_bytes") is not None for r in rows):
        notes.append("est. device total: peak + cuBLAS workspace + allocator reserve + CUDA context, what nvidia-smi "
                     "would show for the process (typical overheads; set them with --cuda-context-mib, --reserve-frac)")
    devices = {r.get("measured_device") for r in rows if r.get("measured_peak_bytes") is not None}
    if devices:
        notes.append("error: (prediction - measured) / measured, positive = over-estimate")
    if "cpu" in devices:
        notes.append("CPU measured peak: the tracker's live-tensor peak of one tracked step (exact storage bytes), "
                     "compared with the tracked estimate (gradients accumulate out of place under a dispatch mode); "
                     "process RSS peak: the worker's peak resident memory (Python, torch libraries, allocator caches; "
                     "context only)")
    if "cuda" in devices:
        notes.append("CUDA measured peak: torch.cuda.max_memory_allocated, compared with the plain estimate + "
                     "cuBLAS workspace")
    if any(r.get("est_vs_traced_frac") is not None for r in rows):
        notes.append("traced peak: the real model and method run on fake tensors under memprof's tracker (deep models: "
                     "two depths traced and extrapolated); est. vs trace: (tracked estimate - traced) / traced")
    if any(r.get("flops_vs_full_frac") is not None for r in rows):
        notes.append("FLOPs vs full: analytic model FLOPs per step relative to full fine-tuning "
                     "(frozen weights skip their weight gradients)")
    if any(r.get("speedup_vs_full") is not None for r in rows):
        notes.append("speed-up vs full: full fine-tuning's median step time / this method's")
    for p in dict.fromkeys(r["provenance"] for r in rows if r.get("provenance")):
        dates = sorted(r["measured_at"] for r in rows if r.get("provenance") == p and r.get("measured_at"))
        when = f" ({dates[0][:16]} to {dates[-1][:16]})" if dates else ""
        notes.append(f"measured on: {p}{when}")
    return notes


# the columns a table gives up first when it is wider than the terminal (compare / report, table format)
_DROP_ORDER = ("measured_rss_peak_bytes", "energy_per_step_j", "est_compared_bytes", "flops_vs_full_frac",
               "trainable_frac", "est_device_total_bytes", "tokens_per_s", "measured_saved_vs_full_frac",
               "traced_vs_measured_frac", "est_vs_traced_frac", "step_time_s")


def pick_columns(columns: list[str], wanted: str | None, labels: dict[str, str]) -> list[str]:
    """``--columns``: a comma-separated list of column keys or labels ('all': every column)."""
    if wanted is None or wanted.strip() == "all":
        return columns
    from .errors import ConfigError

    by_label = {labels.get(c, c): c for c in columns}
    out = []
    for item in (w.strip() for w in wanted.split(",") if w.strip()):
        key = item if item in columns else by_label.get(item)
        if key is None:
            raise ConfigError(f"unknown column '{item}'; these rows have: {', '.join(columns)}")
        out.append(key)
    return out


def render_comparison(rows: Sequence[dict[str, Any]], fmt: Format, console: Console, by_category: bool = False,
                      columns_wanted: str | None = None, png: bytes | None = None) -> None:
    """Comparison rows (``ComparisonRow.to_row()``): every column raw in json/csv; a readable view otherwise.

    In a terminal the table keeps to its width: the least essential columns (_DROP_ORDER) go first and a note
    says which (``--columns`` picks them, ``--columns all`` keeps every one, -f csv has them all)."""
    if fmt is Format.json:
        console.out(rows_json(rows), highlight=False)
        return
    if fmt is Format.csv:
        console.out(rows_csv(rows), highlight=False, end="")
        return
    heading, columns, labels, notes = comparison_view(rows, by_category)
    columns = pick_columns(columns, columns_wanted, labels)
    if fmt is Format.table:  # one line per row; row notes below the table
        columns = [c for c in columns if c != "note"]
        hidden: list[str] = []
        if columns_wanted is None and console.is_terminal:
            for drop in _DROP_ORDER:
                if table_width(console, rows_table(rows, columns, heading, labels)) <= console.width:
                    break
                if drop in columns:
                    columns.remove(drop)
                    hidden.append(labels.get(drop, drop))
        table = rows_table(rows, columns, heading, labels)
        print_unwrapped(console, table)
        if hidden:
            notes = [f"hidden to fit the terminal: {', '.join(hidden)} (--columns to choose, --columns all, "
                     "or -f csv)", *notes]
        for r in rows:
            if r.get("note"):
                where = [f"{labels.get(c, c)}={fmt_cell(r.get(c), c)}" for c in columns
                         if c in _SETUP_COLUMNS and c != "method"]
                console.print(Text(" ".join([str(r["method"]), *where]) + f": {r['note']}", style="yellow"))
        for n in notes:
            console.print(Text(f"note: {n}", style="dim"))
    elif fmt is Format.html:
        from .html_report import comparison_page

        console.out(comparison_page(rows, columns, heading, labels, notes, png), highlight=False, end="")
    else:
        text = (f"{heading}\n\n" if heading else "") + rows_markdown(rows, columns, labels)
        text += "".join(f"\n- {md_escape(n)}" for n in notes) + ("\n" if notes else "")
        console.out(text, highlight=False, end="")
