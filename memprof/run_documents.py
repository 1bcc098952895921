"""The views of a user's own data and run: the per-step peaks of a length distribution (estimate --seq-lens), the
per-step records of a profiled training run (report --steps), a predicted batch size verified with real steps
(fit --verify), and the answers beyond one GPU: per-rank rows across world sizes and strategies (compare
--world-sizes) and the smallest world that fits (fit --strategy). Built on report.py's renderers, like documents.py.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from rich.console import Console, Group
from rich.text import Text

from .documents import estimate_document, estimate_renderables
from .records import Estimate
from .report import Format, md_escape, print_unwrapped, render_rows, rows_html, rows_markdown, rows_table
from .units import fmt_bytes, fmt_bytes_auto, fmt_pct


# ---- length distributions (memprof estimate --seq-lens) ---------------------------------------------------------
def render_distribution(dist: Any, est: Estimate, fmt: Format, console: Console, fit: Any = None, gpu: Any = None,
                        mfu_assumed: float = 0.4, note: str | None = None) -> None:
    """One epoch's per-step peaks (p50 / p99 / max) and FLOPs, and the estimate of the step that sets the max."""
    row = dist.to_row()
    peak_flops = None
    if gpu is not None:
        tflops = gpu.peak_tflops.get(est.setup.dtype.value) or gpu.peak_tflops.get("bf16")
        peak_flops = tflops * 1e12 if tflops else None
    times = {f"step_time_{k}_s": row[f"flops_{k}"] / (peak_flops * mfu_assumed)
             for k in ("p50", "p99", "max")} if peak_flops else {}
    row.update(times)
    if fmt is Format.json:
        console.out(json.dumps({"distribution": row, "mfu_assumed": mfu_assumed if times else None,
                                "worst_step_estimate": estimate_document(est, fit=fit, note=note)}, indent=2,
                               default=str), highlight=False)
        return
    if fmt is not Format.table:
        render_rows([row], fmt, console)
        return
    console.print(estimate_renderables(est, fit=fit, note=note))
    p50, p99, top = dist.peak_stats
    f50, f99, ftop = dist.flops_stats
    worst = dist.worst
    shapes = ", ".join(f"b={b.batch_size} s={b.seq_len}" for b in worst.micro_batches)
    lines = [Text(""), Text(f"over one epoch: {dist.sequences:,} sequences, {len(dist.steps):,} optimizer steps "
                            f"({dist.batching.value} batching, b={dist.batch_size}, at most {dist.max_len} tokens, "
                            f"{fmt_pct(dist.padding_frac)} of the tokens are padding)", style="bold"),
             Text(f"peak per step: p50 {fmt_bytes(p50)}  p99 {fmt_bytes(p99)}  max {fmt_bytes(top)} "
                  f"(step {worst.step}: {shapes}; the estimate above)"),
             Text(f"model FLOPs per step: p50 {f50:.3e}  p99 {f99:.3e}  max {ftop:.3e}")]
    if times:
        lines.append(Text(f"step time on {gpu.name} at {fmt_pct(mfu_assumed)} MFU (assumed): p50 "
                          f"{times['step_time_p50_s']:.3g} s  p99 {times['step_time_p99_s']:.3g} s  max "
                          f"{times['step_time_max_s']:.3g} s"))
    console.print(Group(*lines))


STEP_LABELS = {"rank": "rank", "step": "step", "batch_size": "b", "seq_len": "s", "micro_batches": "micro",
               "real_tokens": "tokens", "peak_bytes": "peak", "estimate_peak_bytes": "estimate",
               "drift_frac": "drift", "forward_peak_bytes": "fwd", "backward_peak_bytes": "bwd",
               "optimizer_peak_bytes": "optim", "reserved_bytes": "reserved", "step_time_s": "time (s)",
               "tokens_per_s": "tokens/s"}


def _step_cell(key: str, value: Any) -> Any:
    if value is None:
        return value
    if key.endswith("_bytes") and isinstance(value, int):
        return fmt_bytes_auto(value)
    if key == "drift_frac":
        return f"{100 * value:+.3f}%"
    if key == "step_time_s":
        return f"{value:.3f}"
    if key == "tokens_per_s":
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return value


def render_steps(rows: Sequence[dict[str, Any]], fmt: Format, console: Console) -> None:
    """Per-step records of a profiled run: every field in json/csv; a compact table (the run named once) else."""
    if fmt in (Format.json, Format.csv):
        render_rows(rows, fmt, console)
        return
    first = rows[0]
    heading = f"{first['model']} | {first['method']} | {first['device']}: memory per optimizer step"
    columns = [c for c in STEP_LABELS if any(r.get(c) is not None for r in rows)
               and not (c == "rank" and len({r["rank"] for r in rows}) == 1)]
    notes = ["drift: (measured - estimate) / estimate; the estimate is memprof's for each step's own shape "
             "(b, padded s, padding; CPU: the tracked estimate, CUDA: + cuBLAS workspace)"]
    # a run's steps span a small range: bytes in the unit that shows it (tiny models: KiB / MiB)
    rows = [{k: _step_cell(k, v) for k, v in r.items()} for r in rows]
    if fmt is Format.table:
        print_unwrapped(console, rows_table(rows, columns, heading, STEP_LABELS))
        for n in notes:
            console.print(Text(f"note: {n}", style="dim"))
    elif fmt is Format.html:
        console.out(rows_html(rows, columns, heading, STEP_LABELS, notes), highlight=False, end="")
    else:
        console.out(f"{heading}\n\n" + rows_markdown(rows, columns, STEP_LABELS) + f"\n- {md_escape(notes[0])}\n",
                    highlight=False, end="")


def render_fit_checks(checks: list[Any], fmt: Format, console: Console) -> None:
    """``fit --verify``: per dimension, predicted against confirmed size, every attempt, the phase that limits it."""
    if fmt is Format.json:
        console.out(json.dumps({"verified": [c.to_dict() for c in checks]}, indent=2), highlight=False)
        return
    if fmt is not Format.table:
        render_rows([{"dimension": c.dimension, "predicted": c.predicted, "confirmed": c.confirmed, "size": a.size,
                      "status": a.status, "device_total_bytes": a.device_total_bytes, "peak_phase": a.peak_phase,
                      "message": a.message} for c in checks for a in c.attempts], fmt, console)
        return
    lines = [Text("")]
    for c in checks:
        x = c.symbol
        lines.append(Text(f"verified on {c.device}: predicted {x}={c.predicted}, confirmed "
                          + (f"{x}={c.confirmed}" if c.confirmed is not None else "none") +
                          (f" (the {c.limiting_phase} phase sets its peak)" if c.limiting_phase else ""),
                          style="bold green" if c.confirmed == c.predicted else "bold yellow"))
        for a in c.attempts:
            total = fmt_bytes(a.device_total_bytes) if a.device_total_bytes is not None else "-"
            lines.append(Text(f"  {x}={a.size}: {a.status}, device total {total} of {fmt_bytes(c.budget_bytes)}"
                              + (f" ({a.message.splitlines()[0][:120]})" if a.message else "")))
    for n in dict.fromkeys([c.note for c in checks] + [c.basis for c in checks]):
        lines.append(Text(f"note: {n}", style="dim"))
    console.print(Group(*lines))


# ---- beyond one GPU (compare --world-sizes / --strategies, fit --strategy) ------------------------------------
RANK_LABELS = {"world_size": "GPUs", "strategy": "strategy", "offload": "offload", "status": "status",
               "trainable_params": "trainable", "peak_bytes": "peak / rank", "allocated_bytes": "allocated / rank",
               "device_total_bytes": "device total / rank", "host_bytes": "host / rank", "fits": "fits"}


def rank_notes(rows: Sequence[Any]) -> list[str]:
    """Footnotes of a per-rank table (``scaling.RankRow``): what each number is, the answers, the model's notes."""
    from .scaling import smallest_fitting

    notes = ["per rank: the analytic estimate of one rank's training step (each rank runs its own micro-batch of b); "
             "GPUs 1: the plain one-device run (no data-parallel engine); peak: tensor memory; allocated: + cuBLAS "
             "workspace; device total: + allocator reserve + CUDA context, what nvidia-smi shows on each GPU"]
    if any(r.host_bytes for r in rows):
        notes.append("host / rank: states offloaded to host (CPU) memory, per rank")
    gpu = next((r for r in rows if r.gpu), None)
    if gpu is not None:
        notes.append(f"fits: device total / rank <= {gpu.gpu} ({fmt_bytes(gpu.gpu_memory_bytes)})")
    notes += smallest_fitting(rows)
    notes.append("analytic only: no trace or measurement here (memprof measure --nproc N measures a data-parallel "
                 "run on one machine)")
    notes += list(dict.fromkeys(n for r in rows for n in r.estimate_notes))
    return notes


def render_rank_rows(rows: Sequence[Any], fmt: Format, console: Console, note: str | None = None,
                     columns_wanted: str | None = None) -> None:
    """``compare --world-sizes``: one row per (run, strategy, world size), raw in json/csv; a table otherwise
    (setup shared by every row in the heading, n/a reasons and footnotes under it)."""
    from .comparison import KEY_COLUMNS
    from .documents import comparison_view, pick_columns

    data = [r.to_row() for r in rows]
    if fmt in (Format.json, Format.csv):
        render_rows(data, fmt, console)
        return
    heading, compared, labels, _ = comparison_view(data)
    columns = [c for c in compared if c in KEY_COLUMNS] + ["world_size", "strategy"]
    columns += [c for c in ("offload", "status") if any(r.get(c) not in (None, "ok") for r in data)]
    columns += ["trainable_params", "peak_bytes", "allocated_bytes", "device_total_bytes"]
    columns += [c for c in ("host_bytes", "fits") if any(r.get(c) is not None for r in data)]
    labels = {**labels, **RANK_LABELS}
    columns = pick_columns(columns, columns_wanted, labels)
    shown = [{**r, "strategy": r["strategy"] or "one device"} for r in data]
    notes = ([note] if note else []) + rank_notes(rows)
    heading = f"{heading}: memory per rank" if heading else "memory per rank"
    if fmt is Format.table:
        print_unwrapped(console, rows_table(shown, columns, heading, labels))
        for r in shown:
            if r.get("note"):
                console.print(Text(f"{r['method']} {r['strategy']} x {r['world_size']}: {r['note']}", style="yellow"))
        for n in notes:
            console.print(Text(f"note: {n}", style="dim"))
    elif fmt is Format.html:
        notes = [f"{r['method']} {r['strategy']} x {r['world_size']}: {r['note']}" for r in shown if r.get("note")] + notes
        console.out(rows_html(shown, columns, heading, labels, notes), highlight=False, end="")
    else:
        notes = [f"{r['method']} {r['strategy']} x {r['world_size']}: {r['note']}" for r in shown if r.get("note")] + notes
        console.out(f"{heading}\n\n" + rows_markdown(shown, columns, labels)
                    + "".join(f"\n- {md_escape(n)}" for n in notes) + "\n", highlight=False, end="")


def render_world_fit(found: Any, fmt: Format, console: Console, note: str | None = None) -> None:
    """``fit --strategy``: each world size tried (one rank's device total against the GPU), the smallest that fits,
    and the estimate of one rank there with the largest batch size and sequence length (``analytic.fit.WorldFit``)."""
    from .analytic.fit import check_fit

    est, gpu, w = found.estimate, found.gpu, found.world_size
    tried = [{"world_size": n, "strategy": found.strategy.value if n > 1 else None, "device_total_bytes": total,
              "fits": total <= gpu.memory_bytes} for n, total in found.tried]
    answer = (f"smallest world size that fits {gpu.name} ({fmt_bytes(gpu.memory_bytes)}) under "
              f"{found.strategy.value}: " + ("none of " + ", ".join(str(n) for n, _ in found.tried) if w is None
                                             else "1 (one device)" if w == 1 else f"{w} GPUs"))
    if fmt is Format.json:
        doc = estimate_document(est, fit=check_fit(est, gpu), note=note, max_batch=found.max_batch_size,
                                max_seq=found.max_seq_len)
        doc["world"] = {"strategy": found.strategy.value, "gpu": gpu.name, "gpu_memory_bytes": gpu.memory_bytes,
                        "min_world_size": w, "tried": tried}
        console.out(json.dumps(doc, indent=2, default=str), highlight=False)
        return
    if fmt is not Format.table:
        for row in tried:
            row.update(gpu=gpu.name, min_world_size=w, max_batch_size=found.max_batch_size if row["world_size"] == w
                       else None, max_seq_len=found.max_seq_len if row["world_size"] == w else None)
        render_rows(tried, fmt, console)
        return
    lines = [Text(answer, style="bold green" if w is not None else "bold red")]
    for row in tried:
        where = "one device" if row["world_size"] == 1 else f"{found.strategy.value} x {row['world_size']}"
        lines.append(Text(f"  {where}: device total per rank {fmt_bytes(row['device_total_bytes'])} "
                          + ("fits" if row["fits"] else "does not fit")))
    console.print(Group(*lines, Text("")))
    if w is None:
        lines = [Text(f"the estimate of one rank at {found.tried[-1][0]} (the largest tried):", style="dim")]
        console.print(Group(*lines))
    console.print(estimate_renderables(est, fit=check_fit(est, gpu), note=note,
                                       max_batch=found.max_batch_size if w is not None else None,
                                       max_seq=found.max_seq_len if w is not None else None))
