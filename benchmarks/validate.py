"""Validate memprof's three numbers against each other (issue 4): analytic, traced and (on CPU) measured.

    python benchmarks/validate.py                    # the whole matrix -> estimates/validation.{csv,md}
    python benchmarks/validate.py --parts A          # only part A; --models gpt2,gemma-2b to narrow it down
    python benchmarks/validate.py --render-only      # rebuild validation.md (and the CSV's `why`) from the CSV
    python benchmarks/validate.py --parts A --no-render & python benchmarks/validate.py --parts B --no-render
                                                     # both parts at once on 2 cores; then --render-only

Parts C and D repeat A and B for the loop around the model (issue 13: the optimizer kernel, gradient accumulation,
in-place zeroing, padded batches, kept outputs, a KV cache, the Trainer's defaults) on four architectures. Part E
trains narrow copies with a real transformers Trainer (variable-length padded batches, gradient accumulation) under
memprof's callback and compares every step's measured peak with the estimate of that step's shape
(validation_steps.csv).

Part A, full depth, CUDA modelled: every architecture at its real depth x every method x four precision regimes x
batch/sequence sizes. Analytic (plain, and ``tracked=True``) against the trace (depths 2 and 3 extrapolated to
the full depth; CUDA kernels emulated on fake CPU tensors, 512-byte blocks).
Part B, 2 blocks, CPU kernels: the same architectures cut to 2 blocks, a real CPU step measured in this process
(``peak_bytes`` = the tracker's live-tensor peak of a steady-state step) against the trace with CPU kernels and
the analytic estimate with ``device="cpu"``. fp32 at the real widths; the half-precision regimes on narrow
copies of each architecture (same structure, smaller widths and vocabulary), because half-precision matmuls
on this CPU (no AVX-512 BF16) run 5-60x slower than fp32 and a real-width step takes minutes.

Rows are appended to the CSV as they finish and a re-run skips rows already there, so an interrupted run
resumes; delete the CSV to redo everything. The markdown is rewritten from the whole CSV at the end, with the
investigated reason for each row that misses a target (EXPLANATIONS below; kept out of the runs, so a new finding
needs only --render-only). The matrix of issue 4's eight methods took 33 minutes here (part A 6, part B 27; run
the two parts in parallel, as done here, to overlap them); the 630 rows of the seven methods issue 14 added about
45 more (parts A and B in parallel).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

# ---- targets (issue 4) --------------------------------------------------------------------------------------------
ANALYTIC_VS_TRACED = 0.05   # analytic peak within 5% of the traced peak, every row
TRACED_VS_MEASURED = 0.03   # traced (same device type) within 3% of the CPU-measured live-tensor peak
# issue 15: the plain estimate against the allocator-level peak of an unobserved CPU step, held to what the tracked
# estimate meets against the tracker on these rows (worst -0.374% when issue 15 began): 1%
PLAIN_VS_UNOBSERVED = 0.01
PER_CATEGORY = 0.10         # each category at the peak within 10% ...
CATEGORY_FLOOR = 0.01       # ... when it holds at least 1% of the peak; smaller ones are reported as a share of it

# ---- the matrix --------------------------------------------------------------------------------------------------
MODELS = ("bert-base-uncased", "gpt2", "Llama-3.2-1B", "Qwen2.5-0.5B", "gemma-2b", "Phi-3-mini-4k-instruct",
          "Mixtral-8x7B-v0.1", "OLMoE-1B-7B-0924")
FAMILY = {"bert-base-uncased": "encoder (BERT)", "gpt2": "GPT-2", "Llama-3.2-1B": "LLaMA, GQA 32/8",
          "Qwen2.5-0.5B": "Qwen2, GQA 14/2, qkv bias", "gemma-2b": "Gemma, MQA, 256k vocab",
          "Phi-3-mini-4k-instruct": "Phi-3, fused qkv / gate_up",
          "Mixtral-8x7B-v0.1": "MoE: 8 experts, top-2, GQA 32/8", "OLMoE-1B-7B-0924": "MoE: 64 experts, top-8, q/k norm"}
# models whose 2-block copies at real width do not fit this machine's memory in fp32 (Mixtral's experts: 5.6 GB a
# block): their fp32 CPU rows (part B) use the narrow copies too
NARROW_FP32 = ("Mixtral-8x7B-v0.1", "OLMoE-1B-7B-0924")
METHODS = ("full", "lora", "qlora", "adapter", "bitfit", "ia3", "prefix", "prompt", "dora", "adalora", "vera", "loha",
           "lokr", "ln-tuning", "p-tuning", "trainable-tokens", "lora-all-linear")
# a method row that is another method with options: (method, options merged under the model's own for it);
# lora-all-linear (issue 15): LoRA on every linear layer, where the CPU's promoted copies and the fp32 input copy
# peft keeps sit at the peak
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {"dora": ("lora", {"lora": {"dora": True}}),
                                                  "lora-all-linear": ("lora", {"lora": {"targets": "all-linear"}})}
REGIMES: dict[str, dict[str, str]] = {
    "fp32": {"dtype": "fp32"},
    "bf16": {"dtype": "bf16"},                       # pure bf16: weights, grads, states in bf16
    "fp16-amp": {"dtype": "fp16", "regime": "amp"},  # fp32 params, autocast fp16
    "bf16-mixed": {"dtype": "bf16", "regime": "mixed"},  # bf16 weights + fp32 master weights and states
}
# (batch, sequence) per regime at full depth; every size for fp32 / bf16, one for the other two
FULL_SIZES = {"fp32": ((1, 384), (4, 256), (16, 128)), "bf16": ((1, 384), (4, 256), (16, 128)),
              "fp16-amp": ((4, 256),), "bf16-mixed": ((4, 256),)}
CPU_SIZE = (2, 64)                  # real widths, fp32
NARROW_SIZES = ((2, 64), (1, 128))  # narrow copies, half precisions
# peft has no default LoRA / IA3 targets for Phi-3: all linears (LoRA), and LLaMA's IA3 choice on Phi-3's names
METHOD_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "Phi-3-mini-4k-instruct": {**{m: {"lora": {"targets": "all-linear"}}
                                  for m in ("lora", "qlora", "adalora", "vera", "loha", "lokr")},
                               "ia3": {"ia3": {"targets": "qkv_proj,down_proj", "feedforward": "down_proj"}}},
}
# Narrow copies for the half-precision CPU measurements: the architecture's own structure (model type, GQA
# ratio, head size where it fits, biases, tying, norms), smaller widths and an 8192-token vocabulary.
NARROW: dict[str, dict[str, int]] = {
    "bert-base-uncased": {"hidden_size": 192, "num_attention_heads": 3, "intermediate_size": 768, "vocab_size": 8192},
    "gpt2": {"n_embd": 192, "n_head": 3, "vocab_size": 8192},
    "Llama-3.2-1B": {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64,
                     "intermediate_size": 1024, "vocab_size": 8192},
    "Qwen2.5-0.5B": {"hidden_size": 224, "num_attention_heads": 7, "num_key_value_heads": 1,
                     "intermediate_size": 1216, "vocab_size": 8192},
    "gemma-2b": {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128,
                 "intermediate_size": 2048, "vocab_size": 8192},
    "Phi-3-mini-4k-instruct": {"hidden_size": 384, "num_attention_heads": 4, "num_key_value_heads": 4,
                               "intermediate_size": 1024, "vocab_size": 8192, "pad_token_id": 0},
    # MoE: the real expert count and top-k, the routing unchanged; narrow experts
    "Mixtral-8x7B-v0.1": {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64,
                          "intermediate_size": 512, "vocab_size": 8192},
    "OLMoE-1B-7B-0924": {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
                         "intermediate_size": 128, "vocab_size": 8192, "eos_token_id": 2, "pad_token_id": 1},
}
# Parts C and D (issue 13): the loop around the model. Each variant against a plain torch loop's row of A / B.
LOOP_VARIANTS: dict[str, dict[str, Any]] = {
    "fused AdamW": {"optimizer_impl": "fused"},
    "for-loop AdamW": {"optimizer_impl": "for-loop"},
    "foreach AdamW": {"optimizer_impl": "foreach"},
    "zero_grad zeros": {"zero_grad": "zeros"},
    "grad accum 2": {"grad_accum": 2},
    "padded": {"padded": True},
    "kept outputs": {"keep_outputs": True},
    "KV cache": {"use_cache": True},
    "KV cache kept": {"use_cache": True, "keep_outputs": True},
    "Trainer": {"loop": "trainer"},
    "Trainer, accum 4, padded": {"loop": "trainer", "grad_accum": 4, "padded": True},
}
LOOP_MODELS = ("bert-base-uncased", "gpt2", "Llama-3.2-1B", "Qwen2.5-0.5B")
LOOP_METHODS = ("full", "lora")
LOOP_PRECISIONS = ("fp32", "bf16", "fp16-amp")
LOOP_SIZE = (4, 256)
CATEGORIES = ("params_trainable", "params_frozen", "gradients", "optimizer_states", "master_weights",
              "weight_copies", "activations", "temporaries", "inputs")
KEY = ("part", "model", "layers", "method", "precision", "batch_size", "seq_len", "loop")
COLUMNS = (
    *KEY, "family", "device", "status", "verdict", "why", "note", "total_params", "trainable_params",
    "analytic_peak_bytes", "analytic_tracked_peak_bytes", "traced_peak_bytes", "measured_peak_bytes",
    "analytic_phase", "traced_phase", "measured_phase",
    "plain_vs_tracked_frac", "plain_vs_tracked_worst_phase_frac", "analytic_vs_traced_frac", "worst_phase_vs_traced_frac",
    "traced_vs_measured_frac", "analytic_vs_measured_frac",
    *(f"{cmp}_worst_category{x}" for cmp in ("analytic_vs_traced", "traced_vs_measured")
      for x in ("", "_frac", "_share_of_peak", "_material")),
    *(f"{who}_{c}_bytes" for who in ("analytic", "traced", "measured") for c in CATEGORIES),
    "analytic_allocated_bytes", "analytic_reserved_bytes", "analytic_device_total_bytes",
    "traced_allocated_bytes", "traced_reserved_bytes", "traced_device_total_bytes",
    "trace_s", "measure_s", "step_s",
    # issue 15: the allocator-level peak of an unobserved CPU step (profiler memory events) and the plain estimate
    "unobserved_peak_bytes", "unobserved_phase", "plain_vs_unobserved_frac", "observer_frac",
)
UNOBSERVED_COLUMNS = COLUMNS[-4:]


@dataclass(frozen=True)
class Job:
    part: str            # "A"/"C" full depth, CUDA modelled | "B"/"D" 2 blocks, CPU measured (C, D: loop variants)
    model: str           # preset name (+ " narrow" for the narrow copies)
    method: str
    precision: str       # key of REGIMES
    batch_size: int
    seq_len: int
    layers: str = "full"  # "full" or the block count the model was cut to
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    loop: str = ""       # key of LOOP_VARIANTS ("" = a plain torch loop)

    @property
    def key(self) -> tuple[str, ...]:
        return (self.part, self.model, self.layers, self.method, self.precision, str(self.batch_size),
                str(self.seq_len), self.loop)


def method_options(model: str, method: str) -> dict[str, Any]:
    """The options a row of ``method`` runs with on ``model`` (an alias's options merged into its base method's)."""
    base, extra = ALIASES.get(method, (method, {}))
    options = {k: dict(v) if isinstance(v, dict) else v for k, v in METHOD_OPTIONS.get(model, {}).get(base, {}).items()}
    for key, value in extra.items():
        options[key] = {**options.get(key, {}), **value} if isinstance(value, dict) else value
    return options


def jobs(parts: str, models: tuple[str, ...], methods: tuple[str, ...], precisions: tuple[str, ...]) -> Iterator[Job]:
    for model in models:
        for method in methods:
            options = method_options(model, method)
            if "A" in parts:
                for precision in precisions:
                    for b, s in FULL_SIZES[precision]:
                        yield Job("A", model, method, precision, b, s, "full", options)
            if "B" in parts:
                for precision in precisions:
                    if precision == "fp32":
                        name = f"{model} narrow" if model in NARROW_FP32 else model
                        yield Job("B", name, method, precision, *CPU_SIZE, "2", options)
                    else:
                        for b, s in NARROW_SIZES:
                            yield Job("B", f"{model} narrow", method, precision, b, s, "2", options)
    for model in (m for m in models if m in LOOP_MODELS):
        for method in (m for m in methods if m in LOOP_METHODS):
            options = method_options(model, method)
            for loop, over in LOOP_VARIANTS.items():
                if "C" in parts:
                    for precision in (p for p in precisions if p in LOOP_PRECISIONS):
                        yield Job("C", model, method, precision, *LOOP_SIZE, "full", {**options, **over}, loop)
                if "D" in parts and "fp32" in precisions:
                    # fp32 CPU kernels; the LLaMA-style models as their narrow copies (2 blocks at 2048-wide
                    # fp32 with a 128k vocabulary would dominate the run)
                    name = model if model in ("bert-base-uncased", "gpt2") else f"{model} narrow"
                    yield Job("D", name, method, "fp32", *CPU_SIZE, "2", {**options, **over}, loop)


# ---- one row ------------------------------------------------------------------------------------------------------
def model_spec(job: Job):  # noqa: ANN201
    from memprof.hub import resolve_spec
    from memprof.spec import from_hf_config

    base = job.model.removesuffix(" narrow")
    spec, _ = resolve_spec(base)
    if job.model.endswith(" narrow"):
        spec = from_hf_config({**spec.hf_config, **NARROW[base]}, job.model, source="file")
    if job.layers != "full":
        spec = spec.with_layers(int(job.layers))
    return spec


def frac(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else (a - b) / b


def category_check(ours: dict[str, int], ref: dict[str, int], peak: int) -> dict[str, Any]:
    """The category furthest from ``ref`` and whether it meets PER_CATEGORY.

    A category holding at least CATEGORY_FLOOR of the peak (in either record) is material: it must be within
    PER_CATEGORY of ``ref`` (relative). A smaller one must differ by less than CATEGORY_FLOOR of the peak.
    Returns name, frac (relative; None when ref is 0), share_of_peak (|difference| / peak), material, ok.
    """
    worst: dict[str, Any] = {}
    worst_score = -1.0
    for c in CATEGORIES:
        a, r = ours.get(c, 0), ref.get(c, 0)
        share = abs(a - r) / peak if peak else 0.0
        material = max(a, r) >= CATEGORY_FLOOR * peak
        rel = (a - r) / r if r else (None if a else 0.0)
        ok = (rel is not None and abs(rel) <= PER_CATEGORY) if material else share < CATEGORY_FLOOR
        # misses first, then material categories by relative error, then small ones by share of the peak
        score = (0.0 if ok else 10.0) + ((abs(rel) if rel is not None else 1.0) if material else share)
        if score > worst_score:
            worst_score = score
            worst = {"": c, "_frac": rel, "_share_of_peak": share, "_material": material, "ok": ok}
    return worst


def _record_category(row: dict[str, Any], cmp: str, check: dict[str, Any], misses: list[str], what: str) -> None:
    for suffix in ("", "_frac", "_share_of_peak", "_material"):
        row[f"{cmp}_worst_category{suffix}"] = check[suffix]
    if not check["ok"]:
        misses.append(f"{check['']} ({what}) {_pct(check['_frac'], check['_share_of_peak'], check['_material'])}")


def job_setup(job: Job):  # noqa: ANN201
    from memprof.resolve import resolve_setup

    device = "cuda" if job.part in ("A", "C") else "cpu"
    return resolve_setup(None, {"method": ALIASES.get(job.method, (job.method,))[0], "batch_size": job.batch_size,
                                "seq_len": job.seq_len, "device": device, **REGIMES[job.precision], **job.options})


def unobserved_fields(plain_bytes: int | None, tracker_bytes: int | None, m: Any) -> dict[str, Any]:
    """The unobserved step's columns: its allocator-level peak, the plain estimate's error against it (the model's
    error on a plain run) and the tracker's peak against it (the observer's effect)."""
    unobserved = getattr(m, "unobserved_peak_bytes", None)
    if unobserved is None:
        return {}
    return {"unobserved_peak_bytes": unobserved, "unobserved_phase": m.unobserved_phase,
            "plain_vs_unobserved_frac": frac(plain_bytes, unobserved), "observer_frac": frac(tracker_bytes, unobserved)}


def backfill_unobserved(job: Job, row: dict[str, Any]) -> dict[str, Any]:
    """For a row measured before issue 15: one more measurement of the same run with the unobserved step (the
    product's path, in a fresh worker, no tracked step). The plain estimate and its error against the unobserved
    peak are ``refresh_plain``'s."""
    from memprof.runtime.runner import measure

    # a fresh worker per row, as `memprof measure` runs it: in one long process, blocks of earlier rows' runs
    # freed inside the profiled window can misreport a kept-output loop's step (found on part D's kept rows)
    m = measure(model_spec(job), job_setup(job), out_dir=None, warmup_steps=1, timed_steps=1, breakdown=False,
                cpu_threads=1)
    if m.status != "ok":
        return {"note": (row.get("note") or "") + f" | unobserved step: {m.status}: {m.message}"}
    return unobserved_fields(None, int(row["measured_peak_bytes"]), m)


def refresh_plain(job: Job, row: dict[str, Any]) -> dict[str, Any]:
    """The plain estimate of a row recomputed from the current model (the CPU kernels' promoted copies entered the
    plain estimate with issue 15; the tracked estimate, the trace and the measurement are unchanged)."""
    from memprof.analytic import estimate

    spec, setup = model_spec(job), job_setup(job)
    est, tracked = estimate(spec, setup), estimate(spec, setup, tracked=True)
    plain = est.peak_bytes
    out: dict[str, Any] = {"analytic_peak_bytes": plain, "plain_vs_tracked_frac": frac(plain, tracked.peak_bytes),
                           "plain_vs_tracked_worst_phase_frac": max(
                               (frac(p.total_bytes, t.total_bytes)
                                for (_, p), (_, t) in zip(est.phase_peaks, tracked.phase_peaks)), key=abs)}
    if row.get("unobserved_peak_bytes"):
        out["plain_vs_unobserved_frac"] = frac(plain, int(row["unobserved_peak_bytes"]))
    return out


def run_job(job: Job) -> dict[str, Any]:
    from memprof.analytic import estimate
    from memprof.errors import MemprofError
    from memprof.runtime.trace import trace

    spec = model_spec(job)
    device = "cuda" if job.part in ("A", "C") else "cpu"
    row: dict[str, Any] = dict(zip(KEY, job.key))
    row.update(family=FAMILY[job.model.removesuffix(" narrow")], device=device + ("" if device == "cpu" else " (modelled)"))
    setup = job_setup(job)
    errors: dict[str, str] = {}
    plain = tracked = traced = measured = None
    try:
        plain = estimate(spec, setup)
        tracked = estimate(spec, setup, tracked=True)
    except MemprofError as exc:
        errors["analytic"] = str(exc)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = trace(spec, setup)
        row["trace_s"] = round(time.perf_counter() - start, 2)
    except MemprofError as exc:
        errors["traced"] = str(exc)
    if job.part in ("B", "D") and (plain is not None or traced is not None):
        if job.method == "qlora":
            errors["measured"] = "not measured: QLoRA needs bitsandbytes' CUDA kernels"
        else:
            measured = _measure(spec, setup, row, errors)

    if traced is None and tracked is None:
        row.update(status="n/a", note=errors.get("analytic") or errors.get("traced"))
        return row
    row["status"] = "ok" if not ({"analytic", "traced"} & set(errors)) else "error"
    notes = [f"{who}: {msg}" for who, msg in errors.items()]
    ref = traced or tracked
    row.update(total_params=ref.total_params, trainable_params=ref.trainable_params)
    if plain is not None:
        row.update(analytic_peak_bytes=plain.peak_bytes, analytic_tracked_peak_bytes=tracked.peak_bytes,
                   analytic_phase=tracked.peak_phase.value,
                   plain_vs_tracked_frac=frac(plain.peak_bytes, tracked.peak_bytes),
                   plain_vs_tracked_worst_phase_frac=max(
                       (frac(p.total_bytes, t.total_bytes) for (_, p), (_, t) in zip(plain.phase_peaks, tracked.phase_peaks)),
                       key=abs),
                   analytic_allocated_bytes=plain.device.allocated_bytes,
                   analytic_reserved_bytes=plain.device.reserved_bytes,
                   analytic_device_total_bytes=plain.device.device_total_bytes)
    if traced is not None:
        row.update(traced_peak_bytes=traced.peak_bytes, traced_phase=traced.peak_phase.value,
                   traced_allocated_bytes=traced.device.allocated_bytes,
                   traced_reserved_bytes=traced.device.reserved_bytes,
                   traced_device_total_bytes=traced.device.device_total_bytes)
        row.update({f"traced_{c}_bytes": v for c, v in traced.peak.as_dict().items()})
    misses: list[str] = []
    if tracked is not None and traced is not None:
        # categories compared at the same phase: the analytic breakdown at the phase where the trace peaks
        a_phases = dict(tracked.phase_peaks)
        a_bd = a_phases[traced.peak_phase].as_dict()
        row.update({f"analytic_{c}_bytes": v for c, v in a_bd.items()})
        rel = frac(tracked.peak_bytes, traced.peak_bytes)
        row["analytic_vs_traced_frac"] = rel
        t_phases = dict(traced.phase_peaks)
        phase_errs = [frac(a_phases[p].total_bytes, t_phases[p].total_bytes) for p in t_phases if p in a_phases]
        row["worst_phase_vs_traced_frac"] = max(phase_errs, key=abs) if phase_errs else None
        if abs(rel) > ANALYTIC_VS_TRACED:
            misses.append(f"analytic vs traced {100 * rel:+.1f}%")
        _record_category(row, "analytic_vs_traced", category_check(a_bd, traced.peak.as_dict(), traced.peak_bytes),
                         misses, "analytic vs traced")
    if measured is not None:
        m_bd = measured.breakdown.as_dict()
        row.update({f"measured_{c}_bytes": v for c, v in m_bd.items()})
        row.update(measured_peak_bytes=measured.peak_bytes, measured_phase=measured.peak_phase)
        if traced is not None:
            rel = frac(traced.peak_bytes, measured.peak_bytes)
            row["traced_vs_measured_frac"] = rel
            if abs(rel) > TRACED_VS_MEASURED:
                misses.append(f"traced vs measured {100 * rel:+.1f}%")
            _record_category(row, "traced_vs_measured", category_check(traced.peak.as_dict(), m_bd,
                                                                       measured.peak_bytes), misses, "traced vs measured")
        if tracked is not None:
            row["analytic_vs_measured_frac"] = frac(tracked.peak_bytes, measured.peak_bytes)
        row.update(unobserved_fields(plain.peak_bytes if plain is not None else None, measured.peak_bytes, measured))
    if row["status"] == "error":
        misses.append("one estimator failed")
    row["verdict"] = "meets targets" if not misses else "misses: " + "; ".join(misses)
    row["note"] = " | ".join(notes)
    return row


def _pct(rel: float | None, share: float, material: bool = True) -> str:
    return f"{100 * rel:+.1f}%" if material and rel is not None else f"{100 * share:.2f}% of the peak"


def _measure(spec, setup, row: dict[str, Any], errors: dict[str, str]):  # noqa: ANN001, ANN202
    from memprof.errors import MemprofError
    from memprof.runtime.runner import measure

    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = measure(spec, setup, isolate=False, out_dir=None, warmup_steps=1, timed_steps=1)
    except MemprofError as exc:
        errors["measured"] = str(exc)
        return None
    finally:
        gc.collect()
    row["measure_s"] = round(time.perf_counter() - start, 2)
    if m.status != "ok" or m.breakdown is None:
        errors["measured"] = f"status {m.status}: {m.message}"
        return None
    row["step_s"] = round(m.step_time_median_s, 3)
    return m


# Why a row misses a target, found by investigating those rows (tensor-level snapshots of the trace at the
# phase peak against the analytic replay). Each entry: (key, test on the row and its verdict, explanation).
EXPLANATIONS: list[tuple[str, Any, str]] = [
    ("E6", lambda r, v: r["method"] == "lora-all-linear" and r["precision"] == "fp16-amp"
     and r["model"] in ("Mixtral-8x7B-v0.1", "OLMoE-1B-7B-0924"),
     "no trace: all-linear adapts Mixtral's and OLMoE's fused experts (peft converts the names to target_parameters), "
     "and peft folds LoRA into them with autocast switched off, which the trace's CUDA autocast emulation does not "
     "follow; the trace refuses in one line (runtime/trace.py) and the analytic estimate models what a GPU runs"),
    ("E5", lambda r, v: r["part"] == "B" and r["method"] == "prompt" and r["precision"] in ("bf16", "bf16-mixed")
     and "temporaries" in v,
     "two moments of nearly the same height: the trace's forward peak is inside the last block's attention (CPU "
     "SDPA's fp32 working copies of the bf16 q, k, v), the replay's at the end of the forward, 0.3% apart; the "
     "breakdowns compared are of different moments (activations +, temporaries -)"),
]

# The largest differences left within the targets, as far as they were investigated. (key, rows, finding.)
KNOWN: list[tuple[str, str]] = [
    ("K1", "Phi-3-mini LoRA / QLoRA / DoRA / AdaLoRA / LoHa / LoKr (all-linear, so o_proj is adapted), fp32, part A: "
     "analytic 1.0-3.8% below the trace. Phi-3's rotary "
     "embedding ends in a torch.cat, so q reaches SDPA contiguous in (b, heads, s, d); the fake CPU flash kernel "
     "allocates its output like q (empty_like), transformers' attn_output.transpose(1, 2).contiguous() then "
     "copies it, and LoRA on o_proj keeps that copy for backward. On a GPU, fp32 SDPA runs the memory-efficient "
     "kernel, which writes (b, s, heads, d) and makes the copy free, as the estimator assumes; flash (half "
     "precision) allocates like q, as the trace does, but there LoRA keeps an fp32 copy of the input instead, so "
     "the copy is a transient. By our reading of the kernels the trace, not the estimator, is off on these fp32 "
     "rows; no GPU was available to check, and the emulation is unchanged"),
]

# What earlier runs of this validation found and what was fixed (the rows now meet the targets; kept so the table
# says how the estimators got there). (key, first seen, the finding and the fix.)
FIXED: list[tuple[str, str]] = [
    ("F1", "prefix tuning, fp16-amp, peak up to -7.9% (bert-base-uncased b=4 s=256): the DynamicCache keeps every "
     "layer's key/value concatenation (fp32 under autocast, where attention saves half copies) until the model's "
     "forward returns; the replay freed them after attention. Fixed in analytic/peft_methods.py (cache_update holds them in "
     "Ctx.kv_cache) with analytic/compose.py's carried tensors: a container cleared at the end of the forward frees "
     "all L-2 middle blocks' copies, not one"),
    ("F2", "full fine-tuning, AMP + gradient checkpointing, +7.8% at 28 blocks (found by the 3B tables): autocast's "
     "weight cache, cleared at the end of the forward, is the same kind of container; the replay carried L-3 "
     "blocks' half weight copies into the optimizer step. Same fix (Storage.carried)"),
    ("F3", "prefix tuning, temporaries +14-42%: the replay kept the whole prefix key/value storage until the head; "
     "it dies with the last layer's cache update. Now freed there"),
    ("F4", "prefix tuning on decoders, about -1.5% at depth: transformers hands SDPA a bool mask and "
     "aten::scaled_dot_product_attention converts it to the query dtype in every layer, and the kernel keeps that "
     "copy; the replay had one float mask for all layers"),
    ("F5", "CPU kernels with dropout (SDPA's math fallback): the math kernel scales q and k^T before the matmul "
     "(new tensors), runs without autocast (fp32 probabilities meet fp32 values), needs no matmul copy of a "
     "contiguous key/value (prefix cache, repeat_kv), and adds the mask in place in a plain run"),
    ("F6", "category labels: the emulated 4-bit dequantization is now filed as weight_copies (as the estimator "
     "does), and an fp32 trainable parameter is no longer relabelled master_weights when MasterWeightOptimizer's "
     "master (p.detach().float()) is the parameter itself"),
    ("F7", "QLoRA under AMP: the trace's emulation now runs as bitsandbytes' Linear4bit does (input cast to the "
     "compute dtype, weight dequantized in the stored dtype then cast, output cast back to the input dtype), and "
     "the estimator models the same copies"),
    ("F8", "CPU kernels, b=1 (bert narrow LoRA/BitFit/prompt, temporaries +92-100%): with a batch of one, "
     "torch.matmul folds any (1, heads, s, d) layout into its batch as a view, so q, k, v need no copies; the "
     "estimator's structural cache key now keeps whether b is 1"),
    ("F9", "prefix tuning on GQA/MQA models (gemma-2b +1.4-2.5%, the narrow LLaMA/Qwen copies +1.0-1.1%, within "
     "the targets): transformers' repeat_kv runs before the attention op, so autocast "
     "casts the repeated tensors; for MQA (one kv head) the repeat is a stride-0 view that a cast materialises "
     "and eager's matmul copies; SDPA's math kernel repeats k/v itself when there is no mask"),
    ("F10", "Phi-3 (found on small configs, below 1% on the real rows): its rotary embedding ends in a torch.cat, "
     "so q is laid out (b, heads, s, d); flash-like kernels (CUDA half precision, the CPU kernel) allocate SDPA's "
     "output like q, and transformers' transpose(1, 2).contiguous() then copies it (kept by o_proj's backward "
     "in full fine-tuning)"),
]


def explain(row: dict[str, str]) -> str:
    """The investigated reason(s) for a row that misses a target ("" for a row that meets them all)."""
    verdict = row.get("verdict", "")
    if row.get("status") not in ("ok", "error") or verdict.startswith("meets"):
        return ""
    found = [f"{key}: {why}" for key, test, why in EXPLANATIONS if test(row, verdict)]
    return " / ".join(found) if found else "not explained"


# ---- the CSV (resumable) ----------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = tuple(reader.fieldnames or ())
        older = (tuple(c for c in COLUMNS if c not in UNOBSERVED_COLUMNS),
                 tuple(c for c in COLUMNS if c != "loop" and c not in UNOBSERVED_COLUMNS))
        if fields and fields != COLUMNS and fields not in older:
            raise SystemExit(f"{path} has other columns than this script writes; move it away to start afresh")
        return [{**r, "loop": r.get("loop") or ""} for r in reader]  # before parts C/D: every row a torch loop


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the whole CSV (after the explanations are recomputed), atomically."""
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in COLUMNS} for r in rows)
    tmp.replace(path)


def append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="raise", lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow({k: _csv_value(row.get(k)) for k in COLUMNS})
        f.flush()


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


# ---- markdown ------------------------------------------------------------------------------------------------------
GIB = 2**30


def _f(row: dict[str, str], key: str) -> float | None:
    v = row.get(key, "")
    return float(v) if v not in ("", None) else None


def _gib(row: dict[str, str], key: str) -> str:
    v = _f(row, key)
    return "" if v is None else f"{v / GIB:.3f}"


def _mib(row: dict[str, str], key: str) -> str:
    v = _f(row, key)
    return "" if v is None else f"{v / 2**20:.2f}"


def _p(row: dict[str, str], key: str, digits: int = 2) -> str:
    v = _f(row, key)
    return "" if v is None else f"{100 * v:+.{digits}f}%"


def _worst(rows: list[dict[str, str]], key: str) -> tuple[float, dict[str, str] | None]:
    best, which = 0.0, None
    for r in rows:
        v = _f(r, key)
        if v is not None and abs(v) >= abs(best):
            best, which = v, r
    return best, which


def _label(r: dict[str, str] | None) -> str:
    if r is None:
        return "-"
    return f"{r['model']} {r['method']} {r['precision']} b={r['batch_size']} s={r['seq_len']}"


def render_markdown(rows: list[dict[str, str]], header: dict[str, str]) -> str:
    from memprof.config import Overheads

    ov = Overheads()
    ok = [r for r in rows if r["status"] == "ok"]
    na = [r for r in rows if r["status"] == "n/a"]
    err = [r for r in rows if r["status"] == "error"]
    missing = [r for r in rows if r["status"] != "n/a" and not r["verdict"].startswith("meets")]
    a_rows = [r for r in ok if r["part"] == "A"]
    b_rows = [r for r in ok if r["part"] == "B"]
    c_rows = [r for r in ok if r["part"] == "C"]
    d_rows = [r for r in ok if r["part"] == "D"]
    measured = [r for r in b_rows + d_rows if r.get("measured_peak_bytes")]
    out = [
        "# Validation: analytic vs traced vs measured",
        "",
        f"Command: `{header['command']}` (resumable: rows already in validation.csv are kept; delete it to redo)  ",
        f"Date: {header['date']}; machine: {header['machine']}; torch threads: 1  ",
        f"Versions: {header['versions']}",
        "",
        "What each number is:",
        "- **analytic**: `memprof.analytic.estimate(spec, setup)`, pure Python. *plain* predicts an unobserved run "
        "(`torch.cuda.max_memory_allocated` on a GPU); *tracked* (`tracked=True`) predicts a run observed by a "
        "TorchDispatchMode, where autograd accumulates gradients out of place. Traces and CPU measurements are "
        "observed runs, so they are compared with *tracked*; the plain-vs-tracked columns show what observing costs.",
        "- **traced**: `memprof.runtime.trace.trace(spec, setup)`: the real transformers model and method on fake "
        "tensors, a warm-up step then a steady-state step under the categorised tracker. Part A traces depths 2 and "
        "3 and extrapolates to the full depth (tests/runtime/test_trace.py checks that this equals a full-depth "
        "trace to the byte); CUDA kernels are emulated on fake CPU tensors and storages rounded to 512-byte blocks. "
        "QLoRA is traced with memprof's emulation of bitsandbytes' 4-bit layers (runtime/quant.py), not "
        "bitsandbytes itself, and cannot be measured on a CPU.",
        "- **measured**: a real CPU training step in this process (`memprof.runtime.runner.measure(..., "
        "isolate=False, out_dir=None, warmup_steps=1, timed_steps=1)`); its `peak_bytes` is the tracker's live-tensor "
        "peak of a steady-state step (a CPU has no allocator peak counter).",
        "- **unobserved** (issue 15, parts B and D): one more steady-state step of the same measured run with no "
        "dispatch mode, under torch.profiler's memory events (`runtime/allocator.py`: every c10 CPU allocation and "
        "free, the ones kernels make inside themselves included), plus the storages alive before it; what "
        "`max_memory_allocated` reads on a GPU. `memprof measure` on CPU reports it beside the tracker's peak. "
        "*plain vs unobserved* is the model's error on a plain run; *observer* is the tracker's peak against it: what "
        "observing the step changes (gradients accumulated out of place; allocations below the dispatcher, such as "
        "a CPU binary op's promoted copy of a narrower input, which the tracker does not see).",
        "",
        f"Targets (issue 4): analytic (tracked) peak within {100 * ANALYTIC_VS_TRACED:.0f}% of the traced peak on every "
        f"row; traced (same device type: CPU kernels) within {100 * TRACED_VS_MEASURED:.0f}% of the CPU-measured peak; "
        f"per category within {100 * PER_CATEGORY:.0f}%, checked for analytic vs traced (at the traced peak phase) and "
        f"traced vs measured (at the peak). The {100 * PER_CATEGORY:.0f}% applies to categories holding at least "
        f"{100 * CATEGORY_FLOOR:.0f}% of the peak; a smaller category passes when it differs by less than "
        f"{100 * CATEGORY_FLOOR:.0f}% of the peak (a relative error on a few bytes, such as the 4-byte loss alive "
        "at the optimizer peak or 512-byte CUDA rounding of a tiny tensor, says nothing).",
        "",
        "## Summary",
        "",
        f"- rows: {len(rows)}: {len(ok)} compared, {len(na)} n/a (the method does not apply; the row says why), "
        f"{len(err)} with one estimator failing",
        f"- part A (full depth, CUDA modelled): {len(a_rows)} compared rows; part B (2 blocks, CPU kernels): "
        f"{len(b_rows)} compared rows; parts C and D (the loop around the model: optimizer kernel, accumulation, "
        f"zeroing, padding, kept outputs, KV cache, the Trainer) at full depth and on CPU: {len(c_rows)} and "
        f"{len(d_rows)} compared rows; {len(measured)} rows measured on CPU in all",
    ]
    for key, what, pool in (("analytic_vs_traced_frac", "analytic (tracked) vs traced, peak", ok),
                            ("worst_phase_vs_traced_frac", "analytic (tracked) vs traced, any phase's peak", ok),
                            ("plain_vs_tracked_frac", "analytic plain vs tracked, peak", ok),
                            ("plain_vs_tracked_worst_phase_frac", "analytic plain vs tracked, any phase's peak", ok),
                            ("traced_vs_measured_frac", "traced vs measured (CPU)", measured),
                            ("analytic_vs_measured_frac", "analytic (tracked) vs measured (CPU)", measured)):
        v, r = _worst(pool, key)
        out.append(f"- worst {what}: {100 * v:+.3f}% ({_label(r)})")
    out += _unobserved_summary(measured)
    exact = sum(1 for r in measured if r["traced_peak_bytes"] == r["measured_peak_bytes"])
    out.append(f"- traced peak equal to the measured peak to the byte: {exact} of {len(measured)} measured rows")
    for cmp, what in (("analytic_vs_traced", "analytic vs traced"), ("traced_vs_measured", "traced vs measured")):
        pool = [r for r in ok if r.get(f"{cmp}_worst_category_material") == "True"]
        v, r = _worst(pool, f"{cmp}_worst_category_frac")
        out.append(f"- worst material category, {what}: {100 * v:+.3f}% "
                   f"({r[f'{cmp}_worst_category'] if r else '-'}; {_label(r)})")
    out.append(f"- rows missing a target: {len(missing)}" + ("" if missing else " (none)"))
    out.append("")
    if missing:
        out += ["### Rows missing a target, and why", "",
                "| part | model | method | precision | b | s | loop | misses | why (below) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in missing:
            keys = ", ".join(w.split(":")[0] for w in r["why"].split(" / ")) if r["why"] else ""
            out.append(f"| {r['part']} | {r['model']} | {r['method']} | {r['precision']} | {r['batch_size']} | "
                       f"{r['seq_len']} | {r['loop'] or 'torch'} | {_md(r['verdict'].removeprefix('misses: '))} | "
                       f"{keys} |")
        out += ["", "Why, as found by investigating these rows (tensor-level snapshots of the trace at the phase peak "
                "against the analytic replay):", ""]
        for key, _test, why in EXPLANATIONS:
            count = sum(1 for r in missing if f"{key}:" in r["why"].split(" / ")[0] or f" / {key}:" in r["why"])
            if count:
                peak, _ = _worst([r for r in missing if key + ":" in r["why"]], "analytic_vs_traced_frac")
                out.append(f"- **{key}** ({count} rows; their peak, analytic vs traced, at worst {100 * peak:+.2f}%): "
                           f"{why}.")
        unexplained = sum(1 for r in missing if r["why"] == "not explained")
        if unexplained:
            out.append(f"- **not explained** ({unexplained} rows): not investigated to the tensor.")
        out.append("")
    out += ["### Largest differences left (within the targets)", ""]
    out += [f"- **{key}**: {what}." for key, what in KNOWN]
    out.append("")
    out += ["### Found by earlier runs and fixed", "",
            "The first complete run of this matrix missed targets on 53 rows, and a re-run after the first fixes on 6 "
            "more (F8); investigating them found estimator bugs and trace-side labelling issues, fixed in the code "
            "(the model, not the tolerance):", ""]
    out += [f"- **{key}**: {what}." for key, what in FIXED]
    out.append("")
    out += [
        "## Device overheads (documented assumptions, not measured here)",
        "",
        "The tensor peak becomes what a GPU shows through three terms from `memprof/analytic/overheads.py` "
        "(overridable with `Overheads` / `--cuda-context-mib` / `--reserve-frac`). No GPU was available for this "
        "validation, so they are stated, not checked:",
        "",
        "| term | value | what it is | prediction |",
        "|---|---|---|---|",
        f"| cuBLAS workspace | {ov.cublas_workspace_bytes / 2**20:.0f} MiB | allocated by the first matmul, kept | "
        "allocated = tensor peak + workspace (`max_memory_allocated`) |",
        f"| allocator reserve | {100 * ov.allocator_reserve_frac:.0f}% of allocated | caching-allocator slack, "
        "fragmentation | reserved = allocated x (1 + fraction) (`max_memory_reserved`) |",
        f"| CUDA context | {ov.cuda_context_bytes / 2**20:.0f} MiB | driver, kernels, library handles (0.3-1.4 GiB by "
        "GPU and driver) | device total = reserved + context (nvidia-smi) |",
        "",
        "Full fine-tuning at b=4, s=256 (GiB; the CSV has these columns for every part A row, analytic and traced):",
        "",
        "| model | precision | tensor peak (analytic plain) | allocated | reserved | device total | traced tensor peak | "
        "traced device total |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in a_rows:
        if r["method"] == "full" and (r["batch_size"], r["seq_len"]) == ("4", "256"):
            out.append(f"| {r['model']} | {r['precision']} | {_gib(r, 'analytic_peak_bytes')} | "
                       f"{_gib(r, 'analytic_allocated_bytes')} | {_gib(r, 'analytic_reserved_bytes')} | "
                       f"{_gib(r, 'analytic_device_total_bytes')} | {_gib(r, 'traced_peak_bytes')} | "
                       f"{_gib(r, 'traced_device_total_bytes')} |")
    out += ["", "## Part A: full depth, CUDA modelled (GiB)", "",
            "Traced: depths 2 and 3 extrapolated to the full depth. *any phase*: the largest difference among the "
            "forward, backward and optimizer peaks. *worst category*: the category furthest from the trace at the "
            "traced peak phase (relative for material categories, else as a share of the peak).", "",
            "| model | method | precision | b | s | analytic plain | analytic tracked | traced | plain vs tracked | "
            "analytic vs traced | any phase | worst category | verdict | note |", "|" + "---|" * 14]
    out += [_row_a(r) for r in rows if r["part"] == "A"]
    out += ["", "## Part B: 2 blocks, CPU kernels, measured (MiB)", "",
            f"fp32 rows: the real widths and vocabulary, b={CPU_SIZE[0]}, s={CPU_SIZE[1]}. Half-precision rows: "
            "*narrow* copies (the same model type and structure with smaller widths and an 8192-token vocabulary; "
            "half-precision matmuls on this CPU run 5-60x slower than fp32, so a real-width step would take "
            f"minutes), at (b, s) = {', '.join(f'({b}, {s})' for b, s in NARROW_SIZES)}:", ""]
    for name, over in NARROW.items():
        out.append(f"- {name} narrow: " + ", ".join(f"{k}={v}" for k, v in over.items()))
    out += ["", "| model | method | precision | b | s | analytic plain | analytic tracked | traced | measured | "
            "unobserved | analytic vs traced | traced vs measured | analytic vs measured | plain vs unobserved | "
            "observer | worst category, traced vs measured | step s | verdict | note |", "|" + "---|" * 19]
    out += [_row_b(r) for r in rows if r["part"] == "B"]
    loops = "; ".join(f"*{k}*: " + ", ".join(f"{o}={v}" for o, v in over.items()) for k, over in LOOP_VARIANTS.items())
    out += ["", "## Part C: the loop around the model, full depth, CUDA modelled (GiB)", "",
            "The same comparison as part A for the loop settings a run can differ by (issue 13), at b=4, s=256: "
            f"{loops}. Each row's reference is its own trace (the loop run as `runtime/step.run_step` runs it).", "",
            "| model | method | precision | b | s | loop | analytic plain | analytic tracked | traced | plain vs tracked | "
            "analytic vs traced | any phase | worst category | verdict | note |", "|" + "---|" * 15]
    out += [_row_a(r) for r in rows if r["part"] == "C"]
    out += ["", "## Part D: the loop around the model, 2 blocks, CPU kernels, measured (MiB)", "",
            f"fp32 at b={CPU_SIZE[0]}, s={CPU_SIZE[1]}; bert-base-uncased and gpt2 at their real widths, the "
            "LLaMA-style models as their narrow copies.", "",
            "| model | method | precision | b | s | loop | analytic plain | analytic tracked | traced | measured | "
            "unobserved | analytic vs traced | traced vs measured | analytic vs measured | plain vs unobserved | "
            "observer | worst category, traced vs measured | step s | verdict | note |", "|" + "---|" * 20]
    out += [_row_b(r) for r in rows if r["part"] == "D"]
    out += _long_context_summary()
    out += ["", "## Columns of validation.csv", "",
            "- key: `part` (A full depth CUDA modelled, B 2 blocks CPU; C and D the same for the loop variants), "
            "`model`, `layers`, `method`, `precision` (fp32 | bf16 = pure bf16 | fp16-amp | bf16-mixed = bf16 weights "
            "with fp32 master weights and states), `batch_size`, `seq_len`, `loop` (a LOOP_VARIANTS key; empty: a "
            "plain torch loop);",
            "- `status` ok | n/a (the method does not apply; `note` says why) | error (one estimator failed); "
            "`verdict` meets targets | misses: what; `note`: estimator messages and the investigated reason for a miss;",
            "- `*_peak_bytes`: analytic plain, analytic tracked, traced, measured; `*_phase`: the phase of each peak;",
            "- `*_frac`: signed relative differences (0.01 = 1%) of the first named against the second; "
            "`*_worst_phase_frac`: the largest over the three phase peaks;",
            "- `<comparison>_worst_category{,_frac,_share_of_peak,_material}`: the category furthest from the "
            "reference, its relative difference, its difference as a share of the peak, and whether it holds at "
            f"least {100 * CATEGORY_FLOOR:.0f}% of the peak;",
            "- `analytic_<category>_bytes` (tracked, at the traced peak phase), `traced_<category>_bytes`, "
            "`measured_<category>_bytes` (at their peaks);",
            "- `*_allocated_bytes`, `*_reserved_bytes`, `*_device_total_bytes`: the device predictions above "
            "(part A, CUDA modelled);",
            "- `trace_s`, `measure_s`: wall time of the trace and of the whole measurement (build, two steps, the "
            "tracked step); `step_s`: the timed (untracked) CPU step.",
            ""]
    return "\n".join(out)


def _long_context_summary() -> list[str]:
    """Parts L and N (issue 16), run by benchmarks/long_context.py into estimates/long_context.{csv,md}."""
    path = Path(__file__).resolve().parents[1] / "estimates" / "long_context.csv"
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    lrows = [r for r in rows if r["part"] == "L"]
    nrows = [r for r in rows if r["part"] == "N"]
    errs = [abs(float(r["analytic_vs_trace"])) for r in rows]
    exact = sum(r["trace_vs_measured"] != "" and float(r["trace_vs_measured"]) == 0.0 for r in nrows)
    models = sorted({r["model"] for r in lrows})
    return ["", "## Long context (issue 16): parts L and N", "",
            f"`python benchmarks/long_context.py` (estimates/long_context.md has every row). Part L: {len(lrows)} rows "
            f"at full depth with every block traced (no extrapolation), CUDA modelled, {', '.join(models)} at 2k-32k "
            "tokens (GPT-2 at its 1024 limit), full fine-tuning and LoRA in pure bf16 and fp16 AMP, with and without "
            f"checkpointing. Part N: {len(nrows)} narrow copies with the real windows and layer patterns at long s on "
            f"CPU. Analytic (tracked) within 1% of the trace on {sum(e <= 1.0 for e in errs)} of {len(errs)} rows "
            f"(worst {max(errs, default=0):.3f}%, median {sorted(errs)[len(errs) // 2] if errs else 0:.4f}%); the "
            f"trace equal to the real CPU step to the byte on {exact} of {len(nrows)} part N rows."]


def _cat(r: dict[str, str], cmp: str) -> str:
    name = r.get(f"{cmp}_worst_category")
    if not name:
        return ""
    rel, share = _f(r, f"{cmp}_worst_category_frac"), _f(r, f"{cmp}_worst_category_share_of_peak") or 0.0
    if r.get(f"{cmp}_worst_category_material") == "True" and rel is not None:
        return f"{name} {100 * rel:+.2f}%"
    return f"{name} {100 * share:.3f}% of peak"


def _md(text: str) -> str:
    return (text or "").replace("|", "/").replace("\n", " ")


def _row(r: dict[str, str], cells: list[str]) -> str:
    """A table row: the run's key columns, then ``cells`` and the verdict and note (an n/a row: blanks)."""
    head = f"| {r['model']} | {r['method']} | {r['precision']} | {r['batch_size']} | {r['seq_len']} |"
    if r["part"] in ("C", "D"):
        head += f" {r['loop']} |"
    if r["status"] == "n/a":
        return head + f"{' |' * len(cells)} n/a | {_md(r['note'])} |"
    return head + "".join(f" {c} |" for c in cells) + f" {_md(r['verdict'])} | {_note(r)} |"


def _row_a(r: dict[str, str]) -> str:
    return _row(r, [_gib(r, "analytic_peak_bytes"), _gib(r, "analytic_tracked_peak_bytes"), _gib(r, "traced_peak_bytes"),
                    _p(r, "plain_vs_tracked_frac"), _p(r, "analytic_vs_traced_frac", 3),
                    _p(r, "worst_phase_vs_traced_frac", 3), _cat(r, "analytic_vs_traced")])


def _note(r: dict[str, str]) -> str:
    """The row's note, and the keys of the explanations that apply to it."""
    see = ", ".join(w.split(":")[0] for w in r["why"].split(" / ")) if r["why"] else ""
    return _md(r["note"]) + (f" (see {see})" if see else "")


def _row_b(r: dict[str, str]) -> str:
    return _row(r, [_mib(r, "analytic_peak_bytes"), _mib(r, "analytic_tracked_peak_bytes"), _mib(r, "traced_peak_bytes"),
                    _mib(r, "measured_peak_bytes"), _mib(r, "unobserved_peak_bytes"), _p(r, "analytic_vs_traced_frac", 3),
                    _p(r, "traced_vs_measured_frac", 3), _p(r, "analytic_vs_measured_frac", 3),
                    _p(r, "plain_vs_unobserved_frac", 3), _p(r, "observer_frac", 3),
                    _cat(r, "traced_vs_measured"), r.get("step_s", "")])


# What separates a row's tracker peak from its unobserved step, as found (key, test on the row, explanation).
OBSERVER: list[tuple[str, Any, str]] = [
    ("O1", lambda r: r["precision"] in ("bf16", "bf16-mixed") and r["method"] in ALL_LINEAR_FP32_ADAPTERS,
     "allocations below the dispatcher: peft keeps adapter weights fp32 on a bf16 base, so `result + lora_out` "
     "adds bf16 to fp32, and on CPU TensorIterator copies the bf16 operand to fp32 inside the kernel (compute_types, "
     "\"Promotes inputs by creating temporaries\"); the tracker sees the output only (a bf16 base in the pure and "
     "the mixed regime alike; the forward peak sits at such an add where LoRA adapts the MLP). Modelled: "
     "sim.Graph._promoted_copies (plain CPU runs)"),
    ("O2", lambda r: True,
     "the observer: under a dispatch mode autograd accumulates a second gradient out of place (input_buffer.cpp "
     "can_accumulate_inplace sees every tensor as subclass-like), which the tracked estimate models and the plain "
     "one does not (issue 16, sim.grad_arrives_as_view)"),
]
KEPT_LOOPS = ("kept outputs", "KV cache kept")
ALL_LINEAR_FP32_ADAPTERS = ("lora", "lora-all-linear", "dora", "adalora", "vera", "loha", "lokr")


def _unobserved_summary(measured: list[dict[str, str]]) -> list[str]:
    """Summary lines for the unobserved step: coverage, the worst plain error and observer effect, rows past the
    target with what they are."""
    have = [r for r in measured if r.get("unobserved_peak_bytes")]
    if not have:
        return []
    kept = [r for r in measured if not r.get("unobserved_peak_bytes") and r["loop"] in KEPT_LOOPS]
    out = [f"- unobserved CPU steps (allocator-level peak): {len(have)} of {len(measured)} measured rows"
           + (f"; the other {len(kept)} are the loops that keep the previous step's output ({', '.join(KEPT_LOOPS)}), "
              "where torch.profiler's memory events were found to miss that output's free now and then (up to "
              "+10% on these 2-block steps, varying from run to run in fresh processes): `memprof measure` takes "
              "no unobserved step there and says so" if kept else "")]
    for key, what in (("plain_vs_unobserved_frac", "analytic plain vs unobserved (the model on a plain run)"),
                      ("observer_frac", "measured (tracker) vs unobserved (what observing changes)")):
        v, r = _worst(have, key)
        out.append(f"- worst {what}: {100 * v:+.3f}% ({_label(r)})")
    past = [r for r in have if abs(float(r["plain_vs_unobserved_frac"])) > PLAIN_VS_UNOBSERVED]
    out.append(f"- rows where the plain estimate misses the unobserved peak by more than "
               f"{100 * PLAIN_VS_UNOBSERVED:.0f}%: {len(past)}" + ("" if past else " (none)"))
    for r in past:
        out.append(f"  - {_label(r)}: {100 * float(r['plain_vs_unobserved_frac']):+.3f}%")
    moved = [r for r in have if abs(float(r["observer_frac"])) > 0.001]
    for key, test, why in OBSERVER:
        rows = [r for r in moved if test(r)]
        moved = [r for r in moved if not test(r)]
        if rows:
            v, w = _worst(rows, "observer_frac")
            out.append(f"- observer effect above 0.1% on {len(rows)} rows, **{key}** (at worst {100 * v:+.3f}%, "
                       f"{_label(w)}): {why}")
    return out


# ---- part E: a real Trainer, per step ------------------------------------------------------------------------------
TRAINER_MODELS = ("gpt2", "Llama-3.2-1B")   # narrow copies, 2 blocks, fp32, CPU
TRAINER_RUN = {"batch_size": 4, "grad_accum": 2, "steps": 4, "sequences": 32, "lengths": (16, 128), "seed": 0}
STEP_COLUMNS = ("model", "method", "step", "micro_batches", "shapes", "real_tokens", "measured_peak_bytes",
                "estimate_peak_bytes", "drift_frac", "forward_peak_bytes", "backward_peak_bytes", "optimizer_peak_bytes")


def trainer_steps() -> list[dict[str, Any]]:
    """Train each narrow copy with transformers' Trainer on variable-length, right-padded batches (gradient
    accumulation 2, its default fused AdamW) under memprof's callback; one row per optimizer step."""
    import random

    import torch
    import transformers

    from memprof.resolve import resolve_setup
    from memprof.integrations import attach, pad_batch
    from memprof.runtime.build import apply_method, build_base_model

    cfg = TRAINER_RUN
    rng = random.Random(cfg["seed"])
    lengths = [rng.randint(*cfg["lengths"]) for _ in range(cfg["sequences"])]

    out = []
    for model_name in TRAINER_MODELS:
        spec = model_spec(Job("E", f"{model_name} narrow", "full", "fp32", 0, 0, "2"))
        data = [{"input_ids": [rng.randrange(3, spec.vocab_size) for _ in range(k)]} for k in lengths]
        for method in ("full", "lora"):
            setup = resolve_setup(None, {"method": method, "dtype": "fp32", "device": "cpu", "batch_size": 1,
                                         "seq_len": max(lengths), **METHOD_OPTIONS.get(model_name, {}).get(method, {})})
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = apply_method(build_base_model(spec, setup, "cpu"), spec, setup)
                args = transformers.TrainingArguments(
                    output_dir="/tmp/memprof-validate-trainer", per_device_train_batch_size=cfg["batch_size"],
                    gradient_accumulation_steps=cfg["grad_accum"], max_steps=cfg["steps"], report_to=[],
                    use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1000)
                trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=pad_batch)
                callback = attach(trainer, out=None)
                trainer.train()
            for r in callback.records:
                out.append({"model": f"{model_name} narrow", "method": method, "step": r.step,
                            "micro_batches": r.micro_batches, "shapes": f"b={r.batch_size} s<={r.seq_len}",
                            "real_tokens": r.real_tokens, "measured_peak_bytes": r.peak_bytes,
                            "estimate_peak_bytes": r.estimate_peak_bytes, "drift_frac": r.drift_frac,
                            **{f"{p}_peak_bytes": v for p, v in r.phase_peaks.items()}})
    return out


def render_steps(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    worst, which = _worst(rows, "drift_frac")
    cfg = TRAINER_RUN
    out = ["", "## Part E: a real transformers Trainer, every step (CPU, MiB)", "",
           f"Narrow copies (2 blocks, fp32) trained by `transformers.Trainer` for {cfg['steps']} optimizer steps: "
           f"{cfg['sequences']} sequences of {cfg['lengths'][0]}-{cfg['lengths'][1]} random tokens (seed "
           f"{cfg['seed']}), per-device batch {cfg['batch_size']}, right-padded to each batch's longest, "
           f"gradient accumulation {cfg['grad_accum']}, the Trainer's default fused AdamW; `memprof.integrations."
           "attach(trainer)` records each step (the tracker's live-tensor peak on CPU) and estimates it at its own "
           "micro-batch shapes (the first micro-batch without gradients, the second with them; tracked). The "
           "first step has no optimizer state yet and is compared with the first-step estimate.", "",
           f"Worst drift: {100 * worst:+.3f}% ({which['model']} {which['method']} step {which['step']})." if which
           else "", "",
           "| model | method | step | micro-batches | shape | real tokens | measured | estimate | drift | forward | "
           "backward | optimizer |", "|" + "---|" * 12]
    for r in rows:
        out.append(f"| {r['model']} | {r['method']} | {r['step']} | {r['micro_batches']} | {r['shapes']} | "
                   f"{r['real_tokens']} | {_mib(r, 'measured_peak_bytes')} | {_mib(r, 'estimate_peak_bytes')} | "
                   f"{_p(r, 'drift_frac', 3)} | {_mib(r, 'forward_peak_bytes')} | {_mib(r, 'backward_peak_bytes')} | "
                   f"{_mib(r, 'optimizer_peak_bytes')} |")
    return out


def environment() -> dict[str, str]:
    import peft
    import torch
    import transformers

    from memprof import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, no GPU",
            "versions": f"memprof {__version__}, Python {platform.python_version()}, torch {torch.__version__}, "
                        f"transformers {transformers.__version__}, peft {peft.__version__}",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def _backfill(csv_path: Path) -> None:
    """``--unobserved``: each measured row without an unobserved peak gets one; the CSV is rewritten atomically
    after every row, so an interrupted run resumes where it stopped."""
    rows = read_rows(csv_path)
    by_key = {j.key: j for j in jobs("ABCD", MODELS, METHODS, tuple(REGIMES))}
    todo = [r for r in rows if r.get("status") == "ok" and r.get("analytic_peak_bytes")]
    print(f"{sum(1 for r in todo if not r.get('unobserved_peak_bytes') and r.get('measured_peak_bytes') and r['loop'] not in KEPT_LOOPS)} measured "
          f"rows to give an unobserved step; {len(todo)} rows' plain estimates recomputed", flush=True)
    for i, row in enumerate(todo, 1):
        job = by_key.get(tuple(row[k] for k in KEY))
        if job is None:
            continue
        start = time.perf_counter()
        kept = bool(job.options.get("keep_outputs"))  # no unobserved step there (harness.run_measurement)
        measure = row["part"] in ("B", "D") and row.get("measured_peak_bytes") and not row.get("unobserved_peak_bytes") \
            and not kept
        if measure:
            row.update({k: _csv_value(v) for k, v in backfill_unobserved(job, row).items()})
        row.update({k: _csv_value(v) for k, v in refresh_plain(job, row).items()})
        if measure:
            print(f"[{i}/{len(todo)}] {' '.join(job.key)}: plain vs unobserved "
                  f"{row.get('plain_vs_unobserved_frac') or '-'}, observer {row.get('observer_frac') or '-'} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
        if time.perf_counter() - start > 1:
            write_rows(csv_path, rows)
    write_rows(csv_path, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "estimates", help="folder of validation.csv / .md")
    parser.add_argument("--parts", default="A,B,C,D,E",
                        help="A (full depth, traced), B (2 blocks, CPU measured), C and D (the same for the loop "
                             "variants), E (real Trainer runs, per step)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--precisions", default=",".join(REGIMES))
    parser.add_argument("--render-only", action="store_true", help="rebuild the markdown from the CSV")
    parser.add_argument("--unobserved", action="store_true",
                        help="measured rows without an unobserved step get one (the rest of the row is kept); "
                             "every CPU row's plain estimate is recomputed from the current model")
    parser.add_argument("--no-render", action="store_true",
                        help="only append rows (for several processes filling one CSV; render once afterwards)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # tiny ops on a 2-core VM are dominated by thread fork/join
    import transformers

    transformers.logging.set_verbosity_error()
    csv_path, md_path = args.out / "validation.csv", args.out / "validation.md"
    args.out.mkdir(parents=True, exist_ok=True)
    done = {tuple(r[k] for k in KEY) for r in read_rows(csv_path)}
    if not args.render_only and not args.unobserved:
        todo = [j for j in jobs(args.parts, tuple(args.models.split(",")), tuple(args.methods.split(",")),
                                tuple(args.precisions.split(","))) if j.key not in done]
        print(f"{len(done)} rows already in {csv_path}; {len(todo)} to run", flush=True)
        for i, job in enumerate(todo, 1):
            start = time.perf_counter()
            row = run_job(job)
            append_row(csv_path, row)
            print(f"[{i}/{len(todo)}] {' '.join(job.key)}: {row['status']} {row.get('verdict') or ''} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    if args.unobserved:
        _backfill(csv_path)
    steps_path = args.out / "validation_steps.csv"
    if "E" in args.parts and not args.render_only and not args.unobserved:
        steps = trainer_steps()
        with steps_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=STEP_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: _csv_value(r.get(k)) for k in STEP_COLUMNS} for r in steps)
        print(f"part E: {len(steps)} Trainer steps -> {steps_path}", flush=True)
    if args.no_render:
        return
    rows = read_rows(csv_path)
    order = {k: i for i, k in enumerate(j.key for j in jobs("ABCD", MODELS, METHODS, tuple(REGIMES)))}
    rows.sort(key=lambda r: order.get(tuple(r[k] for k in KEY), len(order)))
    for r in rows:  # the reasons are kept here, not with the runs, so a new finding needs no re-run
        r["why"] = explain(r)
    write_rows(csv_path, rows)
    header = {**environment(), "command": "python benchmarks/validate.py" + (
        " " + shlex.join(a for a in sys.argv[1:] if a != "--render-only") if [a for a in sys.argv[1:] if a != "--render-only"] else "")}
    steps = list(csv.DictReader(steps_path.open(newline=""))) if steps_path.exists() else []
    catalogue = args.out / "peft_catalogue.md"  # written by benchmarks/peft_catalogue.py
    tail = ""
    if catalogue.exists():
        body = catalogue.read_text().split("\n", 1)[1]
        tail = "\n## Part F: peft's whole method catalogue, traced (tiny models, CPU)\n" + body
    md_path.write_text(render_markdown(rows, header) + "\n".join(render_steps(steps)) + ("\n" if steps else "") + tail)
    print(f"wrote {md_path} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
