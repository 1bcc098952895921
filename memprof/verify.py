"""Predict, then verify (``memprof fit --verify``, ``MemprofCallback(fit_check="verify")``): the largest batch size
and sequence length the analytic estimate says fit, then real steps at each on the actual device, each in its own
worker process (runtime/runner.py), backing off after an out-of-memory until a size runs.

On CUDA the device itself is the budget: a size fits when its steps run (an OOM is a recorded result, not a crash)
and the measured device total (max_memory_reserved + the CUDA context, from NVML when available) stays within the
GPU's memory. On a CPU there is no device to run out of: the measured live-tensor peak of the real CPU step, plus
the modelled CUDA overheads, is compared with the budget of ``--gpu`` (CPU kernels differ from CUDA's in dropout
masks and attention, so this confirms the model's code path, not the GPU's allocator). No torch import here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from .analytic import estimate
from .analytic.fit import Gpu, max_batch_size, max_seq_len
from .analytic.overheads import device_totals
from .config import Device, RunSetup
from .records import Measurement
from .spec import ModelSpec

MAX_ATTEMPTS = 4


DIMENSIONS = ("batch_size", "seq_len")
_SYMBOL = {"batch_size": "b", "seq_len": "s"}


@dataclass(frozen=True)
class Attempt:
    size: int                        # the batch size or sequence length tried (FitCheck.dimension says which)
    status: str                      # ok | oom | error | timeout | too big (ran, but over the budget)
    device_total_bytes: int | None   # measured (CUDA) or measured peak + modelled overheads (CPU)
    peak_phase: str | None
    message: str | None = None


@dataclass(frozen=True)
class FitCheck:
    dimension: str                   # batch_size (at setup.seq_len) | seq_len (at setup.batch_size)
    predicted: int                   # the analytic prediction (the largest size that fits)
    confirmed: int | None            # the largest size that ran within the budget (None: none did)
    attempts: tuple[Attempt, ...]
    device: str
    budget_bytes: int
    note: str                        # the phase that sets the predicted size's peak
    basis: str                       # what "fits" meant on this device

    @property
    def symbol(self) -> str:
        return _SYMBOL[self.dimension]

    @property
    def limiting_phase(self) -> str | None:
        ok = [a for a in self.attempts if a.size == self.confirmed]
        return ok[0].peak_phase if ok else None

    def to_dict(self) -> dict:
        return {"dimension": self.dimension, "predicted": self.predicted, "confirmed": self.confirmed,
                "device": self.device, "budget_bytes": self.budget_bytes, "limiting_phase": self.limiting_phase,
                "attempts": [dataclasses.asdict(a) for a in self.attempts], "note": self.note, "basis": self.basis}


def _measured_total(m: Measurement, setup: RunSetup) -> int | None:
    if m.peak_bytes is None:
        return None
    if m.device == "cuda":
        reserved = m.reserved_bytes or m.peak_bytes
        return max(m.device_used_bytes or 0, reserved + setup.overheads.cuda_context_bytes)
    return device_totals(m.peak_bytes, dataclasses.replace(setup, device=Device.cuda)).device_total_bytes


def _back_off(predicted: int) -> int:
    """How far each retry steps down: about 3% of the prediction, at least one (one sequence at the batch sizes
    people run; a token or a sequence at a time would take thousands of tries at large predictions)."""
    return max(1, predicted // 32)


def _next_size(spec: ModelSpec, run: RunSetup, gpu: Gpu, dimension: str, stepped: int, total: int | None) -> int:
    """The next size to try: ``stepped`` after an OOM (no reading); after a run that went over the budget, also no
    more than the estimate allows once scaled by what this run measured against it (a CPU step whose kernels keep
    20% more than CUDA's would otherwise take many 3% steps to get under)."""
    if total is None:
        return stepped
    plan = dataclasses.replace(run, device=Device.cuda)  # the run as planned for the GPU (the budget's terms)
    predicted_total = estimate(spec, plan).device.device_total_bytes
    ratio = total / max(predicted_total, 1)
    if ratio <= 1:
        return stepped
    scaled = Gpu(gpu.name, int(gpu.memory_bytes / ratio), gpu.peak_tflops)
    largest = (max_batch_size if dimension == "batch_size" else max_seq_len)(spec, plan, scaled)
    return min(stepped, largest)


def verify_fit(spec: ModelSpec, setup: RunSetup, gpu: Gpu, device: str, *, dimension: str = "batch_size",
               measure: Callable[..., Measurement] | None = None, timeout_s: float | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> FitCheck:
    """The predicted largest batch size (at ``setup.seq_len``) or sequence length (at ``setup.batch_size``), then
    real steps (one warm-up, one timed) at it on ``device``, backing off after an OOM or an over-budget run.

    Args:
        spec, setup: the run (the ``dimension`` field is replaced by the sizes tried).
        gpu: the budget (on CUDA, the device's own memory).
        device: "cuda" or "cpu": where the steps run.
        dimension: "batch_size" or "seq_len".
        measure: ``runtime.runner.measure`` (injected by tests); runs each size in a fresh worker.
        timeout_s: per attempt.

    Returns:
        FitCheck: predicted, confirmed, every attempt, and which phase sets the confirmed size's peak.
    """
    if dimension not in DIMENSIONS:
        raise ValueError(f"dimension must be one of {DIMENSIONS}, not {dimension!r}")
    if measure is None:
        from .runtime.runner import measure
    predicted = (max_batch_size if dimension == "batch_size" else max_seq_len)(spec, setup, gpu)
    step = _back_off(predicted)
    attempts: list[Attempt] = []
    confirmed = None        # the largest size that ran within the budget
    failed = None           # the smallest size that did not
    size = predicted
    while size >= 1 and len(attempts) < MAX_ATTEMPTS:
        run = dataclasses.replace(setup, device=Device(device), **{dimension: size})
        if progress is not None:
            progress(f"{_SYMBOL[dimension]}={size}", len(attempts), MAX_ATTEMPTS)
        m = measure(spec, run, out_dir=None, warmup_steps=1, timed_steps=1, timeout_s=timeout_s)
        total = _measured_total(m, run) if m.status == "ok" else None
        status = m.status if m.status != "ok" else ("ok" if total is not None and total <= gpu.memory_bytes
                                                    else "too big")
        attempts.append(Attempt(size, status, total, m.peak_phase, m.message if m.status != "ok" else None))
        if status == "ok":
            confirmed = size
        elif status in ("oom", "too big"):
            failed = size
        else:
            break  # an error or timeout says nothing about memory: stop and report it
        if confirmed is None:
            size = _next_size(spec, run, gpu, dimension, size - step, total)
        elif failed is None or failed - confirmed <= step:
            break  # the prediction ran, or the answer is known to within one step
        else:
            size = (confirmed + failed) // 2  # a size ran below one that did not: narrow the gap
    at = f"{_SYMBOL[dimension]}={max(predicted, 1)}"
    predicted_est = estimate(spec, dataclasses.replace(setup, **{dimension: max(predicted, 1)}))
    note = f"predicted peak at {at}: {predicted_est.peak_phase.value} phase"
    basis = ("CUDA: measured max_memory_reserved + CUDA context against the GPU's memory" if device == "cuda" else
             "CPU: the real CPU step's live-tensor peak + modelled CUDA overheads against the budget (CPU kernels, "
             "not the GPU's)" + ("; half-precision steps are slow on most CPUs (minutes per step at real sizes)"
                                 if setup.dtype.value != "fp32" else ""))
    return FitCheck(dimension, predicted, confirmed, tuple(attempts), device, gpu.memory_bytes, note, basis)
