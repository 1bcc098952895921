"""The GPU check: one call on a lent GPU runs the GPU test tier and a fixed plan of real measurements, and writes
estimate vs ``max_memory_allocated`` / ``max_memory_reserved`` / NVML per row (issue: "a GPU check that runs the
day a GPU appears").

    python benchmarks/gpu_check.py                  # on a CUDA machine: tier + plan -> measurements/gpu_check.*
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc   # the same plan on CPU, tiny stand-ins (< 1 min)

One run:
1. the GPU test tier, ``python -m pytest -m gpu -q tests``, as a subprocess (rc, summary line and the log kept);
2. the plan: bert-base-uncased (b=8, s=256), gpt2 and Llama-3.2-1B (b=4, s=512) x full, LoRA, QLoRA x fp32,
   bf16 (pure), fp16 AMP; each row measured by ``memprof.runtime.runner.measure`` in a fresh worker process (as
   ``memprof measure`` does: 2 warm-up steps, 3 timed, one tracked step), next to the analytic estimate
   (``memprof.analytic.estimate``) and the trace of the same spec and setup (traced in this process while the
   worker runs).
Rows that cannot run (QLoRA without bitsandbytes, on a CPU, what the libraries refuse) are n/a with the reason;
an OOM, a crash or a timeout is a recorded row. No new row starts after ``--budget-s`` (default 540 s from the
start, tier included): the rest are recorded as skipped (time).

Outputs in ``--out`` (default measurements/): ``gpu_check.jsonl`` (a run header, the tier, one line per row,
appended and fsync'd as each finishes), ``gpu_check.csv`` and ``gpu_check.md`` (re-rendered atomically after every
row, every planned row present: one not reached yet reads ``not-run``), ``gpu_check.records.jsonl`` (memprof's
own measurement records; ``memprof report`` reads them) and ``gpu_check.tier.log``. The dry run writes
``gpu_check_cpu_dry_run.*`` instead, so it never overwrites a GPU table. Without CUDA the GPU plan is refused
(exit 2): no GPU number is ever made up. Exit 1 when a row failed (error / timeout) or the tier failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SCHEMA = "memprof.gpu_check/1"
METHODS = ("full", "lora", "qlora")
PRECISIONS: dict[str, dict[str, str]] = {
    "fp32": {"dtype": "fp32"},
    "bf16": {"dtype": "bf16"},                       # pure bf16: weights, grads and Adam states in bf16
    "fp16-amp": {"dtype": "fp16", "regime": "amp"},  # fp32 params, autocast fp16, GradScaler
}
GIB = 2**30


@dataclass(frozen=True)
class ModelPlan:
    """One model of the plan: its preset, the GPU size and the narrow stand-in the dry run builds from it."""

    preset: str
    batch_size: int
    seq_len: int
    tiny: Mapping[str, int]     # hf_config overrides of the dry run's stand-in (2 blocks, small widths)


MODELS = (
    ModelPlan("bert-base-uncased", 8, 256, {"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
                                             "vocab_size": 512}),
    ModelPlan("gpt2", 4, 512, {"n_embd": 64, "n_head": 2, "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 0}),
    ModelPlan("Llama-3.2-1B", 4, 512, {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1,
                                        "head_dim": 16, "intermediate_size": 128, "vocab_size": 512,
                                        "bos_token_id": 0, "eos_token_id": 0}),
)
DRY_RUN_SIZE = (2, 32)      # batch, sequence of the CPU dry run
DRY_RUN_LAYERS = 2

STATUSES = ("ok", "n/a", "oom", "error", "timeout", "skipped", "not-run")
COLUMNS = (
    "model", "method", "precision", "batch_size", "seq_len", "device", "status", "reason",
    "total_params", "trainable_params",
    "est_peak_bytes", "est_tracked_peak_bytes", "est_allocated_bytes", "est_reserved_bytes", "est_device_total_bytes",
    "traced_peak_bytes", "traced_allocated_bytes",
    "tracker_peak_bytes", "max_allocated_bytes", "max_reserved_bytes", "nvml_used_bytes",
    "err_tracker_frac", "err_allocated_frac", "err_reserved_frac", "err_device_frac", "err_traced_frac",
    "step_time_s", "tokens_per_s", "timed_steps", "row_s",
)
# estimate vs measurement: (error column, prediction column, measured column, what it compares)
ERRORS = (
    ("err_allocated_frac", "est_allocated_bytes", "max_allocated_bytes", "allocated"),
    ("err_reserved_frac", "est_reserved_bytes", "max_reserved_bytes", "reserved"),
    ("err_device_frac", "est_device_total_bytes", "nvml_used_bytes", "device (NVML)"),
    ("err_tracker_frac", "est_tracked_peak_bytes", "tracker_peak_bytes", "tracker"),
)


@dataclass(frozen=True)
class PlannedRow:
    model: str          # preset name
    method: str
    precision: str      # key of PRECISIONS
    batch_size: int
    seq_len: int
    device: str         # cuda | cpu (the dry run)

    @property
    def key(self) -> tuple[str, str, str, int, int, str]:
        return (self.model, self.method, self.precision, self.batch_size, self.seq_len, self.device)

    @property
    def label(self) -> str:
        return f"{self.model} {self.method} {self.precision} b={self.batch_size} s={self.seq_len}"


@dataclass(frozen=True)
class Options:
    device: str                 # cuda | cpu (dry run)
    out_dir: Path
    stem: str                   # file stem of every output
    budget_s: float             # no row starts after this many seconds from the start
    row_timeout_s: float        # one worker's limit
    tier: bool
    tier_timeout_s: float
    trace: str                  # all | first (each model's first row) | none
    isolate: bool               # each row in a fresh worker process (runner.measure's isolation)
    warmup_steps: int
    timed_steps: int
    resume: bool
    models: tuple[str, ...]
    command: str

    @property
    def dry_run(self) -> bool:
        return self.device == "cpu"

    @property
    def unit(self) -> tuple[str, int]:
        """How bytes are shown: GiB on a GPU, MiB for the dry run's tiny stand-ins."""
        return unit_of(self.device)


@dataclass(frozen=True)
class TierResult:
    command: str
    rc: int | None              # None: killed at --tier-timeout-s
    summary: str                # pytest's last line ("16 passed in 81.20s"), or why there is none
    elapsed_s: float


# ---- the plan ------------------------------------------------------------------------------------------------------
def plan(device: str, models: Sequence[str] = tuple(m.preset for m in MODELS)) -> list[PlannedRow]:
    """Method-major, then precision, then model: a run cut short by the budget loses the last methods and
    precisions of every model rather than a whole model. QLoRA (often n/a) comes last."""
    rows = []
    for method in METHODS:
        for precision in PRECISIONS:
            for m in MODELS:
                if m.preset not in models:
                    continue
                b, s = (m.batch_size, m.seq_len) if device == "cuda" else DRY_RUN_SIZE
                rows.append(PlannedRow(m.preset, method, precision, b, s, device))
    return rows


def model_spec(preset: str, device: str):  # noqa: ANN201 (ModelSpec; memprof imported lazily)
    """The preset's spec on CUDA; on the dry run its narrow stand-in: the same architecture and head, two blocks,
    the widths and vocabulary of ``ModelPlan.tiny``."""
    from memprof.hub import resolve_spec
    from memprof.spec import from_hf_config

    spec, _ = resolve_spec(preset)
    if device == "cuda":
        return spec
    tiny = next(m.tiny for m in MODELS if m.preset == preset)
    narrow = from_hf_config({**spec.hf_config, **tiny}, f"{preset} (tiny)", source="file", task=spec.task)
    return narrow.with_layers(DRY_RUN_LAYERS)


def row_setup(row: PlannedRow):  # noqa: ANN201 (RunSetup)
    from memprof.resolve import resolve_setup

    return resolve_setup(None, {"method": row.method, "batch_size": row.batch_size, "seq_len": row.seq_len,
                                "device": row.device, **PRECISIONS[row.precision]})


# ---- one row -------------------------------------------------------------------------------------------------------
def rel_error(predicted: float | None, measured: float | None) -> float | None:
    """(prediction - measured) / measured; positive: the estimate is high. None when either is missing."""
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured


def analytic_columns(spec, setup) -> dict[str, Any]:  # noqa: ANN001
    """The analytic estimate of a plain run (what the allocator sees) and of a tracked one (what the tracker sees)."""
    from memprof.analytic import estimate

    plain = estimate(spec, setup)
    tracked = estimate(spec, setup, tracked=True)
    return {"est_peak_bytes": plain.peak_bytes, "est_tracked_peak_bytes": tracked.peak_bytes,
            "est_allocated_bytes": plain.device.allocated_bytes, "est_reserved_bytes": plain.device.reserved_bytes,
            "est_device_total_bytes": plain.device.device_total_bytes,
            "total_params": plain.total_params, "trainable_params": plain.trainable_params}


def trace_columns(spec, setup) -> dict[str, Any]:  # noqa: ANN001
    """The traced estimate (fake tensors; CUDA kernels emulated for a CUDA setup), or the reason it failed."""
    from memprof.errors import MemprofError
    from memprof.runtime.trace import trace

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = trace(spec, setup)
    except MemprofError as exc:
        return {"trace_note": f"trace: {exc}"}
    return {"traced_peak_bytes": traced.peak_bytes, "traced_allocated_bytes": traced.device.allocated_bytes}


def refusal(spec, setup) -> str | None:  # noqa: ANN001
    """Why the row cannot be measured here, decided before any process starts (None: it can)."""
    from memprof.config import Device, Method
    from memprof.errors import MemprofError
    from memprof.runtime.runner import check_measurable

    try:
        check_measurable(setup, spec)
    except MemprofError as exc:
        return str(exc)
    if setup.method is Method.qlora and setup.device is Device.cuda and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (QLoRA's 4-bit CUDA kernels): pip install bitsandbytes"
    return None


def measure_row(spec, setup, options: Options, timeout_s: float):  # noqa: ANN001, ANN201 (Measurement)
    """One measurement through memprof's own API: a fresh worker process (``isolate``) or this process."""
    from memprof.errors import LibraryRefusalError, MemprofError
    from memprof.records import Measurement, setup_row
    from memprof.runtime.runner import measure

    kwargs = dict(out_dir=options.out_dir, name=f"{options.stem}.records", warmup_steps=options.warmup_steps,
                  timed_steps=options.timed_steps, breakdown=True)
    try:
        if options.isolate:
            return measure(spec, setup, isolate=True, timeout_s=timeout_s, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return measure(spec, setup, isolate=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 (in-process: a crash is a recorded row)
        status = "n/a" if isinstance(exc, LibraryRefusalError) else "error"
        message = str(exc) if isinstance(exc, MemprofError) else f"{type(exc).__name__}: {exc}"
        return Measurement(spec_name=spec.name, setup_row=setup_row(spec, setup), status=status,
                           device=setup.device.value, message=message[:2000])


def measured_columns(m) -> dict[str, Any]:  # noqa: ANN001 (Measurement)
    cuda = m.device == "cuda"
    out = {"tracker_peak_bytes": m.tracker_peak_bytes, "step_time_s": m.step_time_median_s,
           "tokens_per_s": m.tokens_per_s, "timed_steps": m.timed_steps or None,
           "max_allocated_bytes": m.peak_bytes if cuda else None,
           "max_reserved_bytes": m.reserved_bytes if cuda else None,
           "nvml_used_bytes": m.device_used_bytes if cuda else None}
    if m.total_params is not None:  # what was built (the analytic counts otherwise)
        out.update(total_params=m.total_params, trainable_params=m.trainable_params)
    return out


def error_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {name: rel_error(row.get(pred), row.get(meas)) for name, pred, meas, _ in ERRORS}
    # the trace against what it models: the allocator's peak on CUDA, the tracker's on CPU (both under a dispatch mode)
    if row.get("max_allocated_bytes") is not None:
        out["err_traced_frac"] = rel_error(row.get("traced_allocated_bytes"), row.get("max_allocated_bytes"))
    else:
        out["err_traced_frac"] = rel_error(row.get("traced_peak_bytes"), row.get("tracker_peak_bytes"))
    return out


def first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0][:300] if (text or "").strip() else ""


def run_row(planned: PlannedRow, options: Options, timeout_s: float, trace: bool = True) -> dict[str, Any]:
    """Estimate, trace (``trace``) and measure one planned row; every outcome is a row."""
    from memprof.errors import MemprofError

    start = time.monotonic()
    row: dict[str, Any] = {"kind": "row", **row_identity(planned)}
    spec = model_spec(planned.model, planned.device)
    setup = row_setup(planned)
    notes: list[str] = []
    try:
        row.update(analytic_columns(spec, setup))
    except MemprofError as exc:
        notes.append(f"analytic: {exc}")
    why_not = refusal(spec, setup)
    tracing = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        if trace and options.isolate:  # the worker is another process: trace meanwhile
            tracing = pool.submit(trace_columns, spec, setup)
        if why_not is None:
            m = measure_row(spec, setup, options, timeout_s)
            row.update(status=m.status, env=m.env.as_dict() if m.env else None, **measured_columns(m))
            if m.status != "ok":
                notes.insert(0, first_line(m.message) or m.status)
        else:
            row["status"] = "n/a"
            notes.insert(0, why_not)
        traced = tracing.result() if tracing else (trace_columns(spec, setup) if trace else {})
    if "trace_note" in traced:
        notes.append(traced.pop("trace_note"))
    row.update(traced)
    row.update(error_columns(row))
    row.update(reason=" | ".join(notes) or None, row_s=round(time.monotonic() - start, 2))
    return row


def row_identity(planned: PlannedRow) -> dict[str, Any]:
    return {"model": planned.model, "method": planned.method, "precision": planned.precision,
            "batch_size": planned.batch_size, "seq_len": planned.seq_len, "device": planned.device}


def placeholder_row(planned: PlannedRow, status: str, reason: str) -> dict[str, Any]:
    return {"kind": "row", **row_identity(planned), "status": status, "reason": reason}


def row_key(row: Mapping[str, Any]) -> tuple:
    return (row["model"], row["method"], row["precision"], int(row["batch_size"]), int(row["seq_len"]), row["device"])


# ---- the GPU test tier ---------------------------------------------------------------------------------------------
def tier_command() -> list[str]:
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]


def run_tier(argv: Sequence[str], log_path: Path, timeout_s: float, cwd: Path = ROOT) -> TierResult:
    """Run the tier; its output goes to ``log_path``; the summary is pytest's last line."""
    start = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(argv), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else "no output"
    if rc is None:
        summary = f"killed after --tier-timeout-s {timeout_s:g} s (last line: {summary})"
    return TierResult(shlex.join(argv), rc, summary[:300], round(time.monotonic() - start, 1))


def tier_ok(tier: TierResult | None) -> bool:
    return tier is None or tier.rc in (0, 5)  # 5: no test selected


# ---- files ---------------------------------------------------------------------------------------------------------
def append_record(path: Path, record: Mapping[str, Any]) -> None:
    from memprof.runtime.runner import append_jsonl

    append_jsonl(path, record)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSONL's records; a truncated last line (a run killed mid-write) is skipped."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def atomic_write(path: Path, text: str) -> None:
    """Write a temporary file beside ``path``, then rename it over ``path``: readers see the old or the new."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def table_rows(planned: Sequence[PlannedRow], records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every planned row, in plan order: the last record of each, ``not-run`` for those not reached."""
    last = {row_key(r): r for r in records if r.get("kind") == "row"}
    return [dict(last.get(p.key) or placeholder_row(p, "not-run", "the run stopped before this row"))
            for p in planned]


def render_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in COLUMNS})
    return buf.getvalue()


def size(value: Any, unit: tuple[str, int]) -> str:
    return "" if value is None else f"{value / unit[1]:.3f}"


def unit_of(device: str) -> tuple[str, int]:
    return ("MiB", 2**20) if device == "cpu" else ("GiB", GIB)


def pct(value: Any) -> str:
    return "" if value is None else f"{100 * value:+.1f}%"


def num(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def md_cells(row: Mapping[str, Any], unit: tuple[str, int]) -> list[str]:
    def sz(name: str) -> str:
        return size(row.get(name), unit)

    return [row["model"], row["method"], row["precision"], f"{row['batch_size']}x{row['seq_len']}", row["status"],
            sz("est_allocated_bytes"), sz("max_allocated_bytes"), pct(row.get("err_allocated_frac")),
            sz("est_reserved_bytes"), sz("max_reserved_bytes"), pct(row.get("err_reserved_frac")),
            sz("est_device_total_bytes"), sz("nvml_used_bytes"), pct(row.get("err_device_frac")),
            sz("tracker_peak_bytes"), pct(row.get("err_tracker_frac")), pct(row.get("err_traced_frac")),
            num(row.get("step_time_s"), ".3f"), num(row.get("tokens_per_s"), ",.0f")]


def md_header(unit: tuple[str, int]) -> tuple[str, ...]:
    u = unit[0]
    return ("model", "method", "precision", "b x s", "status", f"est alloc {u}", f"max alloc {u}", "err",
            f"est reserved {u}", f"max reserved {u}", "err", f"est device {u}", f"NVML {u}", "err",
            f"tracker peak {u}", "err (tracked est)", "err (trace)", "step s", "tokens/s")


def worst_errors(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, float, Mapping[str, Any]]]:
    """For each estimate-vs-measurement column, the ok row furthest off: (what, error, row)."""
    out = []
    for name, _, _, what in ERRORS:
        values = [(r[name], r) for r in rows if r.get("status") == "ok" and r.get(name) is not None]
        if values:
            err, row = max(values, key=lambda v: abs(v[0]))
            out.append((what, err, row))
    return out


def render_md(rows: Sequence[Mapping[str, Any]], header: Mapping[str, Any], tier: Mapping[str, Any] | None,
              end: Mapping[str, Any] | None = None) -> str:
    env = next((r["env"] for r in rows if r.get("env")), None) or {}
    dry = header["device"] == "cpu"
    title = "GPU check: CPU dry run (tiny stand-ins; not GPU numbers)" if dry else "GPU check: estimate vs measurement"
    lines = [f"# {title}", "", "Generated by `python benchmarks/gpu_check.py` with:", "", "```", header["command"], "```", ""]
    device = env.get("device_name") or header.get("device_name") or header["device"]
    memory = env.get("device_total_memory_bytes")
    lines.append(f"Device: {device}" + (f" ({memory / GIB:.1f} GiB)" if memory else "")
                 + (f", CUDA {env['cuda_version']}" if env.get("cuda_version") else "")
                 + (f", driver {env['driver_version']}" if env.get("driver_version") else "") + ".  ")
    versions = header["versions"]
    lines.append(f"memprof {versions.get('memprof')}, torch {versions.get('torch')}, transformers "
                 f"{versions.get('transformers')}, peft {versions.get('peft')}, bitsandbytes "
                 f"{versions.get('bitsandbytes') or 'not installed'}, Python {versions.get('python')}; "
                 f"run started {header['started_at']}.  ")
    lines.append(f"Each row: {header['warmup_steps']} warm-up steps, {header['timed_steps']} timed steps, one tracked "
                 f"step; {'a fresh worker process per row' if header['isolate'] else 'in this process'}; "
                 f"no row starts after {header['budget_s']:g} s.")
    if dry:
        lines[-1] += (f"  \nStand-ins: each preset cut to {DRY_RUN_LAYERS} blocks with the widths and vocabulary of "
                      "`ModelPlan.tiny` (hidden 64, vocabulary 512), b x s = "
                      f"{DRY_RUN_SIZE[0]} x {DRY_RUN_SIZE[1]}, CPU kernels; the GPU columns stay empty.")
    if end is not None:
        lines[-1] += (f"  \nThe run took {end['elapsed_s']:.0f} s; the parent process "
                      f"{'held' if end['parent_cuda_initialized'] else 'held no'} CUDA context of its own.")
    lines.append("")
    if tier is not None:
        lines.append(f"GPU test tier: `{tier['command']}` -> rc {tier['rc']}, {tier['summary']} "
                     f"({tier['elapsed_s']:g} s).")
    else:
        lines.append("GPU test tier: not run (--no-tier).")
    unit = unit_of(header["device"])
    heads = md_header(unit)
    lines += ["", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(md_cells(r, unit)) + " |" for r in rows]
    lines.append("")
    worst = worst_errors(rows)
    if worst:
        lines.append("Worst estimate error per column: " + "; ".join(
            f"{what} {pct(err)} ({r['model']} {r['method']} {r['precision']})" for what, err, r in worst) + ".")
        lines.append("")
    reasons = [r for r in rows if r.get("status") != "ok" and r.get("reason")]
    if reasons:
        lines.append("Rows that did not run or failed:")
        lines.append("")
        lines += [f"- {r['model']} {r['method']} {r['precision']}: **{r['status']}**, {r['reason']}" for r in reasons]
        lines.append("")
    lines += [
        "Columns: `est alloc` is the analytic tensor peak of a plain step plus the cuBLAS workspace, compared with "
        "`torch.cuda.max_memory_allocated` over the timed steps; `est reserved` adds the modelled allocator reserve "
        "(compared with `max_memory_reserved`), `est device` the modelled CUDA context (compared with NVML's memory "
        "of the worker process, or of the whole device where NVML cannot see the process). `tracker peak` is "
        "memprof's live-tensor peak of one tracked step (the measured peak on CPU), compared with the analytic "
        "estimate of a tracked step; `err (trace)` is the trace's allocated prediction against `max alloc` (CPU: its "
        "peak against the tracker's). Errors are (estimate - measured) / measured. Every number in bytes is in "
        f"`{header['stem']}.csv`; the raw records in `{header['stem']}.jsonl` and `{header['stem']}.records.jsonl`.",
        ""]
    return "\n".join(lines)


def render(options: Options, planned: Sequence[PlannedRow]) -> list[dict[str, Any]]:
    """Rebuild the csv and md from the JSONL (atomically); returns the table's rows."""
    records = read_records(options.out_dir / f"{options.stem}.jsonl")
    last_run = max(i for i, r in enumerate(records) if r.get("kind") == "run")
    records = records[last_run:]  # this run's (--resume re-appends the rows it keeps after its own header)
    headers = records[:1]
    tiers = [r for r in records if r.get("kind") == "tier"]
    ends = [r for r in records if r.get("kind") == "end"]
    rows = table_rows(planned, records)
    atomic_write(options.out_dir / f"{options.stem}.csv", render_csv(rows))
    atomic_write(options.out_dir / f"{options.stem}.md", render_md(rows, headers[-1], tiers[-1] if tiers else None,
                                                                  ends[-1] if ends else None))
    return rows


def versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    import memprof

    return {"memprof": memprof.__version__, "python": platform.python_version(), "torch": version("torch"),
            "transformers": version("transformers"), "peft": version("peft"), "bitsandbytes": version("bitsandbytes")}


def run_header(options: Options, planned: Sequence[PlannedRow]) -> dict[str, Any]:
    return {"schema": SCHEMA, "kind": "run", "command": options.command, "device": options.device,
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), "plan_rows": len(planned), "budget_s": options.budget_s,
            "warmup_steps": options.warmup_steps, "timed_steps": options.timed_steps, "isolate": options.isolate,
            "stem": options.stem}


def start_jsonl(options: Options) -> list[dict[str, Any]]:
    """Rows an earlier run left to keep (``--resume``: its ok / n/a / oom rows); otherwise the earlier JSONL
    becomes ``<stem>.prev.jsonl`` and this run starts a new one."""
    path = options.out_dir / f"{options.stem}.jsonl"
    if not path.exists():
        return []
    if options.resume:
        return [r for r in read_records(path) if r.get("kind") == "row" and r.get("status") in ("ok", "n/a", "oom")]
    os.replace(path, options.out_dir / f"{options.stem}.prev.jsonl")
    return []


# ---- progress and summary ------------------------------------------------------------------------------------------
def progress_line(i: int, total: int, row: Mapping[str, Any]) -> str:
    measured = row.get("max_allocated_bytes") or row.get("tracker_peak_bytes")
    parts = [f"[{i}/{total}] {row['model']} {row['method']} {row['precision']} b={row['batch_size']} "
             f"s={row['seq_len']}: {row['status']}"]
    if measured is not None:
        err = row.get("err_allocated_frac") if row.get("max_allocated_bytes") else row.get("err_tracker_frac")
        unit = unit_of(row["device"])
        parts.append(f"measured {size(measured, unit)} {unit[0]} (estimate {pct(err)})")
    if row.get("step_time_s"):
        parts.append(f"{row['step_time_s']:.3f} s/step, {row['tokens_per_s']:,.0f} tok/s")
    if row.get("status") != "ok" and row.get("reason"):
        parts.append(str(row["reason"])[:160])
    if row.get("row_s") is not None:
        parts.append(f"({row['row_s']:.1f} s)")
    return "  ".join(parts)


def print_summary(rows: Sequence[Mapping[str, Any]], tier: TierResult | None, options: Options, elapsed_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    cuda = not options.dry_run
    table = Table(title=f"GPU check ({'CUDA' if cuda else 'CPU dry run'}), {elapsed_s:.0f} s")
    unit = options.unit
    heads = ["model", "method", "precision", "status", f"est {unit[0]}", f"measured {unit[0]}", "err"]
    heads += ["err reserved", "err NVML"] if cuda else []
    heads += ["step s", "tok/s"]
    for head in heads:
        table.add_column(head, justify="left" if head in ("model", "method", "precision", "status") else "right")
    for r in rows:
        est = r.get("est_allocated_bytes") if cuda else r.get("est_tracked_peak_bytes")
        meas = r.get("max_allocated_bytes") if cuda else r.get("tracker_peak_bytes")
        err = r.get("err_allocated_frac") if cuda else r.get("err_tracker_frac")
        cells = [r["model"], r["method"], r["precision"], r["status"], size(est, unit), size(meas, unit), pct(err)]
        cells += [pct(r.get("err_reserved_frac")), pct(r.get("err_device_frac"))] if cuda else []
        cells += [num(r.get("step_time_s"), ".3f"), num(r.get("tokens_per_s"), ",.0f")]
        table.add_row(*cells)
    console.print(table)
    counts = {s: sum(r.get("status") == s for r in rows) for s in STATUSES}
    console.print("rows: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    if tier is not None:
        console.print(f"GPU test tier: rc {tier.rc}, {tier.summary} ({tier.elapsed_s:g} s)")
    worst = worst_errors(rows)
    for what, err, r in worst:
        console.print(f"worst estimate error, {what}: {pct(err)} ({r['model']} {r['method']} {r['precision']})")
    if not worst:
        console.print("worst estimate error: none (no row measured)")
    console.print(f"wrote {options.out_dir / options.stem}.{{csv,md,jsonl}}")


# ---- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the plan on CPU with tiny stand-ins (same as --device cpu)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", type=Path, default=ROOT / "measurements", help="output folder [measurements/]")
    p.add_argument("--budget-s", type=float, default=540.0, help="no row starts after this many seconds [540]")
    p.add_argument("--row-timeout-s", type=float, default=120.0, help="a worker's limit [120]")
    p.add_argument("--tier-timeout-s", type=float, default=180.0, help="the GPU test tier's limit [180]")
    p.add_argument("--no-tier", action="store_true", help="skip the GPU test tier")
    p.add_argument("--trace", choices=("all", "first", "none"), default=None,
                   help="traced estimates: every row, each model's first row, none [all on CUDA (traced while the "
                        "worker runs), first on the dry run]")
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                   help="each row in a fresh worker process [default on CUDA]")
    p.add_argument("--in-process", dest="isolate", action="store_false",
                   help="every row in this process [default on the dry run]")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per row [2]")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row [3]")
    p.add_argument("--models", default=",".join(m.preset for m in MODELS), help="a subset of the plan's models")
    p.add_argument("--resume", action="store_true", help="keep the ok / n/a / oom rows of the last run's JSONL")
    return p.parse_args(argv)


def options_from(args: argparse.Namespace, argv: Sequence[str]) -> Options:
    device = "cpu" if args.dry_run else args.device
    models = tuple(m for m in args.models.split(",") if m)
    known = {m.preset for m in MODELS}
    if not models or set(models) - known:
        raise SystemExit(f"gpu_check: --models must name some of {', '.join(sorted(known))}")
    if args.warmup < 1 or args.steps < 1 or args.budget_s <= 0 or args.row_timeout_s <= 0:
        raise SystemExit("gpu_check: --warmup, --steps, --budget-s and --row-timeout-s must be > 0")
    return Options(device=device, out_dir=args.out, stem="gpu_check" if device == "cuda" else "gpu_check_cpu_dry_run",
                   budget_s=args.budget_s, row_timeout_s=args.row_timeout_s, tier=not args.no_tier,
                   tier_timeout_s=args.tier_timeout_s, trace=args.trace or ("all" if device == "cuda" else "first"),
                   isolate=(device == "cuda") if args.isolate is None else args.isolate,
                   warmup_steps=args.warmup, timed_steps=args.steps, resume=args.resume, models=models,
                   command=shlex.join(["python", "benchmarks/gpu_check.py", *argv]))


def parent_cuda_initialized() -> bool:
    """Whether this process (not the workers) made a CUDA context: it would count in NVML's whole-device reading."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def cuda_missing() -> str | None:
    """Why the GPU plan cannot run here (None: CUDA is there)."""
    import torch

    if torch.cuda.is_available():
        return None
    return f"no CUDA device (torch {torch.__version__} sees no GPU)"


def row_timeout(options: Options, elapsed_s: float) -> float:
    """The worker's limit: --row-timeout-s, shortened near the end so a late row ends by the budget + 45 s."""
    return max(15.0, min(options.row_timeout_s, options.budget_s + 45.0 - elapsed_s))


def traced(options: Options, row: PlannedRow, planned: Sequence[PlannedRow]) -> bool:
    """Whether ``row`` is traced: every row (all), the first planned row of its model (first) or none."""
    if options.trace == "first":
        return next(p for p in planned if p.model == row.model) == row
    return options.trace == "all"


def execute(options: Options) -> int:
    """Run the tier and the plan; returns the exit status (0: every row ok / n/a / skipped and the tier passed)."""
    start = time.monotonic()
    planned = plan(options.device, options.models)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    kept = start_jsonl(options)
    jsonl = options.out_dir / f"{options.stem}.jsonl"
    append_record(jsonl, run_header(options, planned))
    for row in kept:
        append_record(jsonl, row)
    print(f"gpu_check: {len(planned)} rows on {options.device} -> {jsonl.parent}/{options.stem}.*"
          + (f" ({len(kept)} kept from the last run)" if kept else ""), flush=True)
    tier = None
    if options.tier:
        print(f"gpu_check: GPU test tier: {shlex.join(tier_command())}", flush=True)
        tier = run_tier(tier_command(), options.out_dir / f"{options.stem}.tier.log", options.tier_timeout_s)
        append_record(jsonl, {"kind": "tier", "command": tier.command, "rc": tier.rc, "summary": tier.summary,
                              "elapsed_s": tier.elapsed_s})
        print(f"gpu_check: tier rc {tier.rc}: {tier.summary} ({tier.elapsed_s:g} s)", flush=True)
    if options.dry_run and not options.isolate:
        import torch

        torch.set_num_threads(1)  # tiny ops: thread fork/join would dominate
    done = {row_key(r) for r in kept}
    render(options, planned)
    for i, p in enumerate(planned, 1):
        if p.key in done:
            continue
        elapsed = time.monotonic() - start
        if elapsed >= options.budget_s:
            row = placeholder_row(p, "skipped", f"skipped (time): the {options.budget_s:g} s budget had passed "
                                                f"({elapsed:.0f} s elapsed)")
        else:
            row = run_row(p, options, row_timeout(options, elapsed), traced(options, p, planned))
        append_record(jsonl, row)
        print(progress_line(i, len(planned), row), flush=True)
        render(options, planned)
    append_record(jsonl, {"kind": "end", "elapsed_s": round(time.monotonic() - start, 1),
                          "parent_cuda_initialized": parent_cuda_initialized()})
    rows = render(options, planned)
    print_summary(rows, tier, options, time.monotonic() - start)
    failed = any(r["status"] in ("error", "timeout") for r in rows)
    return 1 if failed or not tier_ok(tier) else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # config warnings of the stand-ins, once per row
    options = options_from(parse_args(argv), argv)
    if not options.dry_run:
        missing = cuda_missing()
        if missing:
            print(f"gpu_check: {missing}; refusing the GPU plan (no GPU number is ever made up); "
                  "run `python benchmarks/gpu_check.py --dry-run --out DIR` for the CPU dry run", file=sys.stderr)
            return 2
    return execute(options)


if __name__ == "__main__":
    sys.exit(main())
