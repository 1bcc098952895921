"""Profile your own training run: ``MemprofCallback`` for transformers' Trainer (TRL's SFTTrainer is one) and
``StepProfiler`` for a plain or accelerate loop. Each optimizer step becomes one record: peak memory by phase
(forward, backward, optimizer), reserved and NVML device memory on CUDA, step time, tokens/s of the real
(non-pad) tokens, PEFT-aware FLOPs and MFU, energy where NVML has it; beside it memprof's analytic estimate for
that step's own shape (batch, padded length, padding) and the drift between the two.

Reading memory: on CUDA ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``, reset at each phase
boundary (estimate: the plain one + cuBLAS workspace); on CPU memprof's tracker (a TorchDispatchMode) is active
during the step and gives the exact live-tensor peak (estimate: the tracked one, as ``memprof measure`` does).
Records are ``memprof.measurement/1`` JSONL lines (one per step and rank) that ``memprof report`` renders;
the Trainer callback also logs ``STEP_METRICS`` through ``Trainer.log`` (W&B, TensorBoard, MLflow get them).

    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    memprof.integrations.attach(trainer, out="measurements")   # or callbacks=[MemprofCallback()]
    trainer.train()

    profiler = StepProfiler(model, optimizer, out="measurements")  # a plain loop
    for batch in loader:
        with profiler.step():
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
import datetime
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .config import Device
from .records import Category, Measurement, MemoryBreakdown, setup_row
from .runtime import probes
from .runtime.from_model import describe_run, step_setup
from .runtime.tracker import MemoryTracker

try:  # the callback subclasses TrainerCallback when transformers is there (it always is with memprof[measure])
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[assignment,misc]

__all__ = ["MemprofCallback", "StepProfiler", "StepRecord", "attach", "pad_batch", "STEP_METRICS"]

SCHEMA = "memprof.measurement/1"
# Trainer.log keys (stable): bytes, seconds, fractions; "estimate" is memprof's analytic estimate of the step
STEP_METRICS = (
    "memprof/peak_bytes", "memprof/forward_peak_bytes", "memprof/backward_peak_bytes", "memprof/optimizer_peak_bytes",
    "memprof/reserved_peak_bytes", "memprof/device_used_bytes", "memprof/estimate_peak_bytes", "memprof/drift_frac",
    "memprof/step_time_s", "memprof/tokens_per_s", "memprof/flops_per_step", "memprof/mfu", "memprof/energy_per_step_j",
    "memprof/batch_size", "memprof/seq_len", "memprof/peak_bytes_max",
)


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as measured, with the estimate of its shape."""

    step: int
    rank: int
    device: str
    batch_size: int                     # largest micro-batch of the step
    seq_len: int                        # longest (padded) sequence length of the step
    padded: bool
    micro_batches: int
    real_tokens: int                    # tokens that are not padding, all micro-batches
    peak_bytes: int                     # CUDA: max_memory_allocated; CPU: the tracker's live-tensor peak
    phase_peaks: dict[str, int]         # forward | backward | optimizer -> peak bytes
    step_time_s: float
    reserved_bytes: int | None = None
    device_used_bytes: int | None = None
    breakdown: MemoryBreakdown | None = None  # CPU: categories at the peak
    estimate_peak_bytes: int | None = None  # the analytic estimate on the same basis (see module docstring)
    drift_frac: float | None = None     # (measured - estimate) / estimate
    flops_per_step: int | None = None
    mfu: float | None = None
    energy_j: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.step_time_s if self.step_time_s > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """The values of STEP_METRICS that this step has (Trainer.log takes floats)."""
        values = {
            "memprof/peak_bytes": self.peak_bytes, "memprof/reserved_peak_bytes": self.reserved_bytes,
            "memprof/device_used_bytes": self.device_used_bytes,
            "memprof/estimate_peak_bytes": self.estimate_peak_bytes, "memprof/drift_frac": self.drift_frac,
            "memprof/step_time_s": self.step_time_s, "memprof/tokens_per_s": self.tokens_per_s,
            "memprof/flops_per_step": self.flops_per_step, "memprof/mfu": self.mfu,
            "memprof/energy_per_step_j": self.energy_j, "memprof/batch_size": self.batch_size,
            "memprof/seq_len": self.seq_len,
            **{f"memprof/{p}_peak_bytes": v for p, v in self.phase_peaks.items()},
        }
        return {k: float(v) for k, v in values.items() if v is not None}


@dataclass
class _Step:
    """What one step has seen so far."""

    start: float
    shapes: list[tuple[int, int, int, bool]] = field(default_factory=list)  # (b, s, real tokens, padded)
    phase_peaks: dict[str, int] = field(default_factory=dict)
    reserved: int = 0
    energy_start: int | None = None
    tracker: MemoryTracker | None = None
    phase: str = "forward"
    first: bool = False                 # the optimizer's first step: its states are allocated during it


class StepProfiler:
    """Per-step memory and time of a live training loop (see the module docstring).

    Args:
        model: the model being trained (a peft model is fine).
        optimizer: its optimizer (read for the optimizer kind and kernel; with ``hooks`` its step marks the
            optimizer phase).
        args: a Trainer's TrainingArguments (the Trainer loop: accumulation, autocast, ...), or None.
        overrides: RunSetup fields that the run does not say (``{"zero_grad": "zeros"}``, ...).
        out: folder of the JSONL records (``<name>.rank<r>.jsonl``); None keeps them in ``records`` only.
        name: file stem [default: the model's name].
        warn_margin: warn once when a step's peak exceeds its estimate by more than this fraction.
        hooks: mark the optimizer phase with the optimizer's own step hooks (plain loops; the callback uses the
            Trainer's events instead).
        rank: the process's rank [default: torch.distributed's, else 0].
    """

    def __init__(self, model: nn.Module, optimizer: Any = None, *, args: Any = None,
                 overrides: dict[str, Any] | None = None, out: str | Path | None = None, name: str | None = None,
                 warn_margin: float = 0.10, hooks: bool = True, rank: int | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        self.spec, self.setup, self.notes = describe_run(model, optimizer, args, overrides)
        param = next(iter(model.parameters()), None)
        self.device = "cuda" if param is not None and param.device.type == "cuda" else "cpu"
        self.rank = rank if rank is not None else _rank()
        self.warn_margin = warn_margin
        self.out = Path(out) if out is not None else None
        stem = name or (self.spec.name if self.spec else type(model).__name__)
        self.path = self.out / f"{_safe(stem)}.rank{self.rank}.jsonl" if self.out is not None else None
        self.records: list[StepRecord] = []
        self.env = probes.env_info(self.device)
        self._step: _Step | None = None
        self._count = 0
        self._warned = False
        self._micro_shapes: list[tuple[int, int, int, bool]] = []
        self._first = False
        self._handles = [model.register_forward_pre_hook(self._forward_begins, with_kwargs=True),
                         model.register_forward_hook(self._forward_ends)]
        inner = getattr(optimizer, "optimizer", optimizer)
        if hooks and inner is not None and hasattr(inner, "register_step_pre_hook"):
            self._handles.append(inner.register_step_pre_hook(lambda *_: self.optimizer_begin()))

    # ---- the step -----------------------------------------------------------------------------------------
    def begin(self) -> None:
        """The step starts (Trainer: on_step_begin)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step = _Step(start=time.perf_counter(), energy_start=probes.nvml_energy_mj() if self.device == "cuda" else None)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        step.first = inner is not None and not getattr(inner, "state", None)  # its states are made this step
        if self.device == "cpu":
            tracker = MemoryTracker()
            tracker.register_module(self.model)
            if self.optimizer is not None:
                tracker.register_optimizer(getattr(self.optimizer, "optimizer", self.optimizer))
            tracker.__enter__()
            tracker.reset_peak()
            tracker.set_phase("forward")
            step.tracker = tracker
        self._step = step

    def _phase_ends(self, phase: str) -> None:
        """Close ``phase`` (its peak so far) and start the next window."""
        step = self._step
        if step is None:
            return
        if step.tracker is not None:
            peaks = step.tracker.phase_peaks()
            if phase in peaks:
                step.phase_peaks[phase] = max(step.phase_peaks.get(phase, 0), peaks[phase][0])
        else:
            step.phase_peaks[phase] = max(step.phase_peaks.get(phase, 0), torch.cuda.max_memory_allocated())
            step.reserved = max(step.reserved, torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()

    def _enter(self, phase: str) -> None:
        step = self._step
        if step is None or step.phase == phase:
            return
        self._phase_ends(step.phase)
        step.phase = phase
        if step.tracker is not None:
            step.tracker.set_phase(phase)

    def _forward_begins(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        step = self._step
        if step is None:
            return
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        mask = kwargs.get("attention_mask")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            b, s = ids.shape
            real = int(mask.sum()) if isinstance(mask, torch.Tensor) else b * s
            step.shapes.append((int(b), int(s), real, real < b * s))
            if step.tracker is not None:  # the batch exists before the step: file it under inputs
                step.tracker.register([t for t in kwargs.values() if isinstance(t, torch.Tensor)], Category.inputs)
        self._enter("forward")

    def _forward_ends(self, _module: nn.Module, _args: tuple, _output: Any) -> None:
        step = self._step
        if step is not None and step.tracker is not None:
            step.tracker.mark_activations()
        self._enter("backward")

    def optimizer_begin(self) -> None:
        """Backward is over, the optimizer steps now (Trainer: on_pre_optimizer_step)."""
        step = self._step
        if step is not None and step.tracker is not None:
            step.tracker.mark_gradients(self.model)
        self._enter("optimizer")

    def end(self, step_index: int | None = None) -> StepRecord:
        """The step is over (Trainer: on_step_end): read, estimate, record."""
        step = self._step
        if step is None:
            raise RuntimeError("StepProfiler.end() without begin()")
        if self.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - step.start
        self._phase_ends(step.phase)
        breakdown = None
        if step.tracker is not None:
            if self.optimizer is not None:
                step.tracker.mark_optimizer(getattr(self.optimizer, "optimizer", self.optimizer))
            breakdown = step.tracker.breakdown()
            step.tracker.__exit__(None, None, None)
        self._step = None
        self._count += 1
        b, s, real, padded = _shape(step.shapes)
        self._micro_shapes, self._first = list(step.shapes), step.first
        record = StepRecord(
            step=step_index if step_index is not None else self._count, rank=self.rank, device=self.device,
            batch_size=b, seq_len=s, padded=padded, micro_batches=len(step.shapes), real_tokens=real,
            peak_bytes=max(step.phase_peaks.values(), default=0), phase_peaks=dict(step.phase_peaks),
            step_time_s=elapsed, breakdown=breakdown,
            reserved_bytes=(step.reserved or None) if self.device == "cuda" else None,
            device_used_bytes=probes.nvml_process_used_bytes() if self.device == "cuda" else None,
            energy_j=_energy(step.energy_start) if self.device == "cuda" else None,
        )
        record = self._with_estimate(record)
        self.records.append(record)
        if self.path is not None:
            from .runtime.runner import append_jsonl, measurement_to_dict, setup_to_json, spec_to_json

            setup = self._setup_at(record)
            entry = {"schema": SCHEMA, "written_at": _now(), "measurement": measurement_to_dict(self._measurement(record))}
            if setup is not None and self.spec is not None:
                entry.update(setup=setup_to_json(setup), spec=spec_to_json(self.spec))
            append_jsonl(self.path, entry)
        return record

    @contextlib.contextmanager
    def step(self, step_index: int | None = None) -> Iterator[StepProfiler]:
        """``with profiler.step(): ...`` around one optimizer step of a plain loop."""
        self.begin()
        try:
            yield self
        except BaseException:
            if self._step is not None and self._step.tracker is not None:
                self._step.tracker.__exit__(None, None, None)
            self._step = None
            raise
        self.end(step_index)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---- estimate and record --------------------------------------------------------------------------------
    def _setup_at(self, record: StepRecord) -> Any:
        if self.setup is None or record.micro_batches == 0:
            return None
        return step_setup(self.setup, record.batch_size, record.seq_len, record.padded)

    def _with_estimate(self, record: StepRecord) -> StepRecord:
        setup = self._setup_at(record)
        if setup is None or self.spec is None:
            return record
        from .analytic import estimate
        from .analytic.flops import mfu, peak_flops, step_flops
        from .errors import MemprofError

        try:
            # each micro-batch at its own shape; the first finds no gradients, the later ones all of them
            predicted, flops = 0, 0
            for k, (b, s, _, padded) in enumerate(self._micro_shapes or [(record.batch_size, record.seq_len, 0,
                                                                          record.padded)]):
                micro = step_setup(self.setup, b, s, padded)
                micro = replace(micro, grad_accum=1 if k == 0 else max(2, micro.grad_accum))
                est = estimate(self.spec, micro, tracked=self.device == "cpu")
                peak = est.first_step_peak_bytes if self._first else est.peak_bytes
                if self.device == "cuda":
                    peak += est.device.allocated_bytes - est.peak_bytes  # + cuBLAS workspace
                predicted = max(predicted, peak)
                flops += step_flops(self.spec, replace(micro, grad_accum=1)).total_flops
        except MemprofError as exc:
            if not self._warned:
                warnings.warn(f"memprof: no estimate for this run: {exc}", stacklevel=3)
                self._warned = True
            return record
        drift = (record.peak_bytes - predicted) / predicted if predicted else None
        util = None
        if self.device == "cuda" and self.env.device_name:
            peak = peak_flops(self.env.device_name, setup.dtype.value)
            util = mfu(flops, record.step_time_s, peak) if peak else None
        if drift is not None and drift > self.warn_margin and not self._warned:
            self._warned = True
            warnings.warn(f"memprof: step {record.step} peaked at {record.peak_bytes / 2**30:.2f} GiB, "
                          f"{100 * drift:.1f}% above memprof's estimate of {predicted / 2**30:.2f} GiB for b="
                          f"{record.batch_size} s={record.seq_len}; something in this run is not what memprof "
                          f"modelled ({'; '.join(self.notes) or 'see memprof estimate --explain'})", stacklevel=3)
        return replace(record, estimate_peak_bytes=predicted, drift_frac=drift, flops_per_step=flops, mfu=util)

    def _measurement(self, record: StepRecord) -> Measurement:
        setup = self._setup_at(record)
        row = setup_row(self.spec, setup) if setup is not None and self.spec is not None else {
            "model": self.spec.name if self.spec else type(self.model).__name__, "batch_size": record.batch_size,
            "seq_len": record.seq_len}
        return Measurement(
            spec_name=row["model"], setup_row=row, status="ok", device=self.device,
            peak_bytes=record.peak_bytes, reserved_bytes=record.reserved_bytes,
            device_used_bytes=record.device_used_bytes, breakdown=record.breakdown,
            peak_phase=max(record.phase_peaks, key=record.phase_peaks.get) if record.phase_peaks else None,
            tracker_peak_bytes=record.peak_bytes if self.device == "cpu" else None,
            step_times_s=(record.step_time_s,), step_time_median_s=record.step_time_s,
            step_time_p10_s=record.step_time_s, step_time_p90_s=record.step_time_s,
            samples_per_s=record.micro_batches * record.batch_size / record.step_time_s if record.step_time_s else None,
            tokens_per_s=record.tokens_per_s, flops_per_step=record.flops_per_step, mfu=record.mfu,
            energy_per_step_j=record.energy_j, timed_steps=1, env=self.env,
            extra={"step": record.step, "rank": record.rank, "source": "step profiler",
                   "real_tokens": record.real_tokens, "micro_batches": record.micro_batches,
                   "phase_peaks": record.phase_peaks, "estimate_peak_bytes": record.estimate_peak_bytes,
                   "drift_frac": record.drift_frac, "notes": list(self.notes)},
        )


class MemprofCallback(TrainerCallback):
    """A transformers TrainerCallback that profiles every optimizer step (StepProfiler under the Trainer's events).

    Args:
        out: folder of the JSONL records [default: measurements].
        name: file stem [default: the model's name].
        warn_margin: warn once when a step exceeds its estimate by more than this fraction.
        trainer: the Trainer, to log the metrics through ``Trainer.log`` (``attach`` sets it).
        overrides: RunSetup fields the Trainer does not say.
        fit_check: at train start, ``True`` predicts the largest per-device batch that fits at the training set's
            longest sequence and warns when the configured batch is larger; ``"verify"`` then confirms it with
            real steps in worker processes (``memprof.verify``), backing off after an OOM.
        gpu: the budget of the fit check: a catalog name or a size ("A100-80GB", "24GiB") [default: this CUDA
            device; on a CPU the check needs one].
    """

    def __init__(self, out: str | Path | None = "measurements", name: str | None = None, warn_margin: float = 0.10,
                 trainer: Any = None, overrides: dict[str, Any] | None = None, fit_check: bool | str = False,
                 gpu: str | None = None) -> None:
        if fit_check not in (False, True, "predict", "verify"):
            raise ValueError(f"fit_check must be False, True ('predict') or 'verify', not {fit_check!r}")
        self.out, self.name, self.warn_margin, self.trainer, self.overrides = out, name, warn_margin, trainer, overrides
        self.fit_check, self.gpu = fit_check, gpu
        self.profiler: StepProfiler | None = None
        self.max_peak_bytes = 0
        self.predicted_max_batch: int | None = None
        self.verified: Any = None  # memprof.verify.FitCheck after fit_check="verify"

    @property
    def records(self) -> list[StepRecord]:
        return self.profiler.records if self.profiler is not None else []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        assert model is not None
        self.profiler = StepProfiler(model, optimizer, args=args, overrides=self.overrides, out=self.out,
                                     name=self.name, warn_margin=self.warn_margin, hooks=False,
                                     rank=getattr(args, "process_index", None))
        if self.fit_check:
            self._predict_fit(args, kwargs.get("train_dataloader"))

    def _predict_fit(self, args: Any, loader: Any) -> None:
        """fit_check: before the first step, the largest per-device batch the estimate says fits the budget at the
        dataset's longest sequence, a warning when the configured batch is larger (the long batch would OOM), and
        with "verify" real steps at that size in worker processes. On CUDA the workers share the device with this
        process, which already holds the model: a size that fits alone can fail the check (said in the warning)."""
        profiler = self.profiler
        if profiler is None or profiler.setup is None or profiler.spec is None:
            return
        if self.gpu is None and profiler.device != "cuda":
            return  # no budget to check against: on a CPU, name the GPU to plan for (gpu=)
        longest = _longest(getattr(loader, "dataset", None))
        if longest is None:
            return
        from .analytic.fit import Gpu, max_batch_size, resolve_gpu

        gpu = (resolve_gpu(self.gpu) if self.gpu is not None else
               Gpu(profiler.env.device_name or "this GPU", int(profiler.env.device_total_memory_bytes or 0)))
        setup = replace(step_setup(profiler.setup, 1, longest, True), device=Device.cuda)  # the plan for a GPU
        self.predicted_max_batch = max_batch_size(profiler.spec, setup, gpu)
        wanted = int(getattr(args, "per_device_train_batch_size", 1))
        if self.predicted_max_batch < wanted:
            warnings.warn(f"memprof: at the longest sequence in the training set ({longest} tokens) the largest "
                          f"batch that fits {gpu.name} is predicted to be {self.predicted_max_batch}, below "
                          f"per_device_train_batch_size={wanted}: the step that meets it would run out of memory",
                          stacklevel=2)
        if self.fit_check != "verify":
            return
        from .verify import verify_fit

        held = torch.cuda.memory_reserved() if profiler.device == "cuda" else 0
        self.verified = check = verify_fit(profiler.spec, setup, gpu, profiler.device)
        if check.confirmed is None or check.confirmed < min(wanted, check.predicted):
            shared = (f"; this process held {held / 2**30:.2f} GiB of the device during the check" if held else "")
            warnings.warn(f"memprof: verified at s={longest} on {check.device}: predicted b={check.predicted}, "
                          f"confirmed " + (f"b={check.confirmed}" if check.confirmed is not None else "none") +
                          f" ({', '.join(f'b={a.size} {a.status}' for a in check.attempts)}){shared}", stacklevel=2)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.profiler is not None:
            self.profiler.begin()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.profiler is not None:
            self.profiler.optimizer_begin()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.profiler is None or self.profiler._step is None:
            return
        record = self.profiler.end(state.global_step)
        self.max_peak_bytes = max(self.max_peak_bytes, record.peak_bytes)
        steps = getattr(args, "logging_steps", 1) or 1
        if self.trainer is not None and (state.global_step % max(1, int(steps)) == 0 or state.global_step == 1):
            self.trainer.log({**record.metrics(), "memprof/peak_bytes_max": float(self.max_peak_bytes)})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.profiler is not None:
            self.profiler.close()


def attach(trainer: Any, **options: Any) -> MemprofCallback:
    """Add a MemprofCallback to ``trainer`` that logs through ``trainer.log``; returns it (its ``records``)."""
    callback = MemprofCallback(trainer=trainer, **options)
    trainer.add_callback(callback)
    return callback


def pad_batch(rows: list[dict], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """A data collator for rows of ``input_ids``: right padding to the batch's longest, an attention mask, and
    labels that are the ids with -100 on the pads (what DataCollatorForSeq2Seq produces for causal LMs)."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _longest(dataset: Any, limit: int = 1_000_000) -> int | None:
    """The longest ``input_ids`` of a map-style dataset of dicts (None when it cannot be read cheaply)."""
    try:
        n = len(dataset)
    except TypeError:
        return None
    if not n or n > limit:
        return None
    longest = 0
    for i in range(n):
        row = dataset[i]
        ids = row.get("input_ids") if isinstance(row, dict) else None
        if ids is None:
            return None
        longest = max(longest, len(ids))
    return longest or None


def _shape(shapes: list[tuple[int, int, int, bool]]) -> tuple[int, int, int, bool]:
    if not shapes:
        return 0, 0, 0, False
    return (max(b for b, _, _, _ in shapes), max(s for _, s, _, _ in shapes), sum(r for _, _, r, _ in shapes),
            any(p for _, _, _, p in shapes))


def _energy(start: int | None) -> float | None:
    end = probes.nvml_energy_mj()
    return (end - start) / 1000 if start is not None and end is not None else None


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._") or "run"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
