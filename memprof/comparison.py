"""Join estimates, traces and measurements of the same run into comparison rows (pure: no torch, no pandas).

Input rows are the flat ``to_row()`` dicts of ``Estimate`` and ``Measurement`` (plus rows saying why a method
does not apply), each with a ``kind``: ``analytic`` (a plain run), ``analytic-tracked`` (a run observed by a
TorchDispatchMode), ``traced`` or ``measured``. Rows join on the ``records.setup_row`` columns; savings and
speed-ups are taken against the ``full`` row with the same model, size and precision.

What is compared with what (like for like):
- a CPU measurement's peak is the tracker's live-tensor peak of a *tracked* step, and a trace runs under a
  dispatch mode too; under any TorchDispatchMode autograd accumulates gradients out of place, so both are
  compared with the tracked analytic estimate (basis ``tracked``);
- a CUDA measurement's peak is ``torch.cuda.max_memory_allocated`` of plain steps, compared with the plain
  estimate's allocated bytes (tensor peak + cuBLAS workspace; basis ``allocated``).
Errors are signed fractions, (prediction - reference) / reference: positive means the prediction is high.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

from .records import CATEGORIES, Category

# records.setup_row's columns: the join key (tests check they match)
KEY_COLUMNS = ("model", "task", "method", "batch_size", "seq_len", "dtype", "regime", "optimizer", "attn_impl",
               "device", "grad_checkpointing", "dropout", "method_options", "loop_options")
# a method's baseline is the full fine-tune of the same model at the same size and precision
GROUP_COLUMNS = tuple(c for c in KEY_COLUMNS if c not in ("method", "method_options"))
KINDS = ("analytic", "analytic-tracked", "traced", "measured")
BREAKDOWN_KEYS = tuple(c.value for c in CATEGORIES if c is not Category.overhead)


@dataclass(frozen=True)
class ComparisonRow:
    """One run seen three ways. Bytes are tensor bytes; ``*_frac`` are fractions (0.25 = 25%)."""

    setup: Mapping[str, Any]                 # the setup_row columns (join key)
    status: str                              # ok | n/a (method does not apply) | oom | error | timeout (measured)
    note: str | None = None                  # why: n/a reason, OOM message, failed trace
    total_params: int | None = None
    trainable_params: int | None = None
    est_peak_bytes: int | None = None        # analytic, plain run: what a training script needs
    est_peak_phase: str | None = None
    est_allocated_bytes: int | None = None   # + cuBLAS workspace (CUDA max_memory_allocated)
    est_device_total_bytes: int | None = None  # + allocator reserve + CUDA context (nvidia-smi)
    est_breakdown: Mapping[str, int] = field(default_factory=dict)
    est_tracked_peak_bytes: int | None = None  # analytic, a step under a TorchDispatchMode
    est_tracked_breakdown: Mapping[str, int] = field(default_factory=dict)
    flops_per_step: float | None = None      # analytic model FLOPs of one step
    traced_peak_bytes: int | None = None
    traced_s: float | None = None            # wall time of the trace
    measured_status: str | None = None       # ok | oom | error | timeout | n/a; None = not measured
    measured_device: str | None = None
    measured_peak_bytes: int | None = None   # CUDA: max_memory_allocated; CPU: tracker's live-tensor peak
    measured_reserved_bytes: int | None = None
    measured_rss_peak_bytes: int | None = None  # CPU: the worker's peak RSS (context: libraries, caches)
    measured_unobserved_peak_bytes: int | None = None  # CPU: allocator-level peak of an unobserved step
    measured_breakdown: Mapping[str, int] = field(default_factory=dict)
    est_basis: str | None = None             # tracked | allocated: the estimate the measurement is compared with
    est_compared_bytes: int | None = None    # that estimate's bytes
    est_vs_measured_frac: float | None = None
    traced_vs_measured_frac: float | None = None
    est_vs_traced_frac: float | None = None  # tracked estimate vs trace (both under a dispatch mode)
    est_vs_unobserved_frac: float | None = None  # CPU: plain estimate vs the unobserved step's allocator peak
    est_saved_vs_full_frac: float | None = None       # 1 - est peak / full's est peak
    measured_saved_vs_full_frac: float | None = None  # 1 - measured peak / full's measured peak
    flops_vs_full_frac: float | None = None  # FLOPs per step / full's
    step_time_s: float | None = None         # measured median
    step_time_low_s: float | None = None     # its spread: the median's 95% CI (p10 for older records)
    step_time_high_s: float | None = None
    tokens_per_s: float | None = None
    speedup_vs_full: float | None = None     # full's step time / this step time
    energy_per_step_j: float | None = None   # NVML, GPU only
    provenance: str | None = None            # where the measurement ran (device, threads, library versions)
    measured_at: str | None = None           # when (ISO date of the worker's start)

    @property
    def trainable_frac(self) -> float | None:
        if self.trainable_params is None or not self.total_params:
            return None
        return self.trainable_params / self.total_params

    def to_row(self) -> dict[str, Any]:
        """Flat dict (setup columns first, then numbers; breakdowns as ``est_<category>_bytes`` ...)."""
        row: dict[str, Any] = dict(self.setup)
        row.update(status=self.status, total_params=self.total_params, trainable_params=self.trainable_params,
                   trainable_frac=self.trainable_frac)
        for name in _SCALAR_FIELDS:
            row[name] = getattr(self, name)
        row.update({f"est_{k}_bytes": self.est_breakdown.get(k) for k in BREAKDOWN_KEYS})
        row.update({f"measured_{k}_bytes": self.measured_breakdown.get(k) for k in BREAKDOWN_KEYS})
        row.update(note=self.note, provenance=self.provenance, measured_at=self.measured_at)
        return row


# ComparisonRow's scalar columns, in table order
_SCALAR_FIELDS = (
    "est_peak_bytes", "est_peak_phase", "est_allocated_bytes", "est_device_total_bytes", "est_tracked_peak_bytes",
    "traced_peak_bytes", "traced_s", "measured_status", "measured_device", "measured_peak_bytes",
    "measured_reserved_bytes", "measured_rss_peak_bytes", "measured_unobserved_peak_bytes", "est_basis",
    "est_compared_bytes", "est_vs_measured_frac", "traced_vs_measured_frac", "est_vs_traced_frac",
    "est_vs_unobserved_frac", "est_saved_vs_full_frac", "measured_saved_vs_full_frac",
    "flops_per_step", "flops_vs_full_frac", "step_time_s", "step_time_low_s", "step_time_high_s", "tokens_per_s",
    "speedup_vs_full", "energy_per_step_j",
)


def key_of(row: Mapping[str, Any]) -> tuple:
    """The join key of a row (its setup_row columns)."""
    return tuple(row.get(c) for c in KEY_COLUMNS)


def group_of(row: Mapping[str, Any]) -> tuple:
    """The key of a row's full fine-tuning baseline."""
    return tuple(row.get(c) for c in GROUP_COLUMNS)


def rel_error(predicted: float | None, reference: float | None) -> float | None:
    """(predicted - reference) / reference, None when either is missing or the reference is 0."""
    if predicted is None or not reference:
        return None
    return (predicted - reference) / reference


def saved_frac(value: float | None, full: float | None) -> float | None:
    """1 - value / full: the share of full fine-tuning's memory a method saves."""
    if value is None or not full:
        return None
    return 1 - value / full


def join(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Mapping[str, Any]]]:
    """Group rows by join key, in order of first appearance: one ``{kind: row}`` per run.

    Of several rows of one kind the last wins, except that a measurement with status ok beats a failed one
    (a sweep re-run with retries appends the new attempt). A multi-rank job is compared by its job row (the rank
    with the highest peak; failed when any rank failed): the per-rank rows beside it do not join (runtime/ranks.py).
    """
    runs: dict[tuple, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        kind = row.get("kind")
        if kind not in KINDS:
            raise ValueError(f"row kind {kind!r} is not one of {KINDS}")
        if kind == "measured" and row.get("rank") is not None:
            continue
        run = runs.setdefault(key_of(row), {})
        previous = run.get(kind)
        if kind == "measured" and previous is not None and previous.get("status") == "ok" \
                and row.get("status") != "ok":
            continue
        run[kind] = row
    return list(runs.values())


def _ok(row: Mapping[str, Any] | None) -> bool:
    return row is not None and row.get("status", "ok") == "ok"


def _breakdown(row: Mapping[str, Any] | None) -> dict[str, int]:
    if row is None:
        return {}
    return {k: row[f"{k}_bytes"] for k in BREAKDOWN_KEYS if row.get(f"{k}_bytes") is not None}


def _provenance(m: Mapping[str, Any]) -> str | None:
    if m.get("env_python_version") is None:
        return None
    device = m.get("env_device_name") or m.get("device")
    threads = f", {m['env_cpu_threads']} CPU threads" if m.get("env_cpu_threads") else ""
    return (f"{device}{threads}; torch {m.get('env_torch_version')}, transformers {m.get('env_transformers_version')}, "
            f"peft {m.get('env_peft_version')}, memprof {m.get('env_memprof_version')}, "
            f"Python {m.get('env_python_version')}")


def _measured_fields(m: Mapping[str, Any] | None, est: Mapping[str, Any] | None,
                     tracked: Mapping[str, Any] | None, traced: Mapping[str, Any] | None) -> dict[str, Any]:
    if m is None:
        return {}
    out: dict[str, Any] = {"measured_status": m.get("status"), "measured_device": m.get("device"),
                           "provenance": _provenance(m), "measured_at": m.get("env_date")}
    if m.get("status") != "ok":
        return out
    peak = m.get("peak_bytes")
    cuda = m.get("device") == "cuda"
    if cuda:
        basis, compared = "allocated", est.get("allocated_bytes") if _ok(est) else None
        traced_value = traced.get("allocated_bytes") if _ok(traced) else None
    else:
        basis, compared = "tracked", (tracked or {}).get("peak_bytes") if _ok(tracked) else None
        traced_value = traced.get("peak_bytes") if _ok(traced) else None
    out.update(measured_peak_bytes=peak, measured_reserved_bytes=m.get("reserved_bytes"),
               measured_rss_peak_bytes=m.get("rss_peak_bytes"),
               measured_unobserved_peak_bytes=m.get("unobserved_peak_bytes"),
               est_vs_unobserved_frac=rel_error(est.get("peak_bytes") if _ok(est) else None,
                                                m.get("unobserved_peak_bytes")),
               measured_breakdown=_breakdown(m), est_basis=basis if compared is not None else None,
               est_compared_bytes=compared, est_vs_measured_frac=rel_error(compared, peak),
               traced_vs_measured_frac=rel_error(traced_value, peak), step_time_s=m.get("step_time_median_s"),
               step_time_low_s=m.get("step_time_ci_low_s", m.get("step_time_p10_s")),
               step_time_high_s=m.get("step_time_ci_high_s", m.get("step_time_p90_s")),
               tokens_per_s=m.get("tokens_per_s"), energy_per_step_j=m.get("energy_per_step_j"))
    return out


def _notes(run: Mapping[str, Mapping[str, Any]]) -> str | None:
    notes = []
    for kind, what in (("analytic", "no estimate"), ("traced", "trace"), ("measured", "measurement")):
        row = run.get(kind)
        if row is not None and row.get("message") and (not _ok(row) or kind == "analytic"):
            first = str(row["message"]).strip().splitlines()[0]
            notes.append(first if kind == "analytic" else f"{what} {row.get('status')}: {first}")
    return "; ".join(notes) or None


def compare_run(run: Mapping[str, Mapping[str, Any]]) -> ComparisonRow:
    """One run's ComparisonRow, without the columns relative to full fine-tuning (see ``compare``)."""
    est, tracked = run.get("analytic"), run.get("analytic-tracked")
    traced, measured = run.get("traced"), run.get("measured")
    first = next(iter(run.values()))
    setup = {c: first.get(c) for c in KEY_COLUMNS}
    if measured is not None:
        status = measured.get("status") or "error"
    else:
        status = "ok" if _ok(est) or _ok(traced) else "n/a"
    source = next((r for r in (est, traced, measured) if _ok(r) and r.get("total_params") is not None), None)
    fields: dict[str, Any] = {
        "total_params": source.get("total_params") if source else None,
        "trainable_params": source.get("trainable_params") if source else None,
    }
    if _ok(est):
        fields.update(est_peak_bytes=est.get("peak_bytes"), est_peak_phase=est.get("peak_phase"),
                      est_allocated_bytes=est.get("allocated_bytes"),
                      est_device_total_bytes=est.get("device_total_bytes"), est_breakdown=_breakdown(est),
                      flops_per_step=est.get("flops_per_step"))
    if _ok(tracked):
        fields.update(est_tracked_peak_bytes=tracked.get("peak_bytes"), est_tracked_breakdown=_breakdown(tracked))
    if _ok(traced):
        reference = tracked if _ok(tracked) else est
        fields.update(traced_peak_bytes=traced.get("peak_bytes"), traced_s=traced.get("elapsed_s"),
                      est_vs_traced_frac=rel_error((reference or {}).get("peak_bytes") if _ok(reference) else None,
                                                   traced.get("peak_bytes")))
    fields.update(_measured_fields(measured, est, tracked, traced))
    return ComparisonRow(setup=setup, status=status, note=_notes(run), **fields)


def with_full_baseline(rows: Sequence[ComparisonRow]) -> list[ComparisonRow]:
    """Fill savings, FLOPs ratio and speed-up against the full row of each group (same model/size/precision)."""
    full = {group_of(r.setup): r for r in rows if r.setup.get("method") == "full"}
    out = []
    for r in rows:
        base = full.get(group_of(r.setup))
        if base is None:
            out.append(r)
            continue
        speedup = base.step_time_s / r.step_time_s if base.step_time_s and r.step_time_s else None
        flops = r.flops_per_step / base.flops_per_step if r.flops_per_step and base.flops_per_step else None
        out.append(replace(r, est_saved_vs_full_frac=saved_frac(r.est_peak_bytes, base.est_peak_bytes),
                           measured_saved_vs_full_frac=saved_frac(r.measured_peak_bytes, base.measured_peak_bytes),
                           flops_vs_full_frac=flops, speedup_vs_full=speedup))
    return out


def compare(rows: Iterable[Mapping[str, Any]]) -> list[ComparisonRow]:
    """Join estimate / trace / measurement rows by setup and compare them (see the module docstring).

    Args:
        rows: ``to_row()`` dicts with a ``kind`` of ``analytic``, ``analytic-tracked``, ``traced`` or
            ``measured``; failed ones carry ``status`` (n/a, oom, error, timeout) and ``message``.

    Returns:
        One ComparisonRow per run, grouped so that runs of one model/size/precision stay together, in order
        of first appearance.
    """
    runs = [compare_run(run) for run in join(rows)]
    order: dict[tuple, int] = {}
    for r in runs:
        order.setdefault(group_of(r.setup), len(order))
    runs = sorted(runs, key=lambda r: order[group_of(r.setup)])  # stable: methods keep their order
    return with_full_baseline(runs)
