"""Predict, then verify (``memprof fit --verify``): the largest batch size the analytic estimate says fits, then
real steps at that size on the actual device, each in its own worker process (runtime/runner.py), backing off
after an out-of-memory until a size runs.

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
from .analytic.fit import Gpu, max_batch_size
from .analytic.overheads import device_totals
from .config import Device, RunSetup
from .records import Measurement
from .spec import ModelSpec

MAX_ATTEMPTS = 4


@dataclass(frozen=True)
class Attempt:
    batch_size: int
    status: str                      # ok | oom | error | timeout | too big (ran, but over the budget)
    device_total_bytes: int | None   # measured (CUDA) or measured peak + modelled overheads (CPU)
    peak_phase: str | None
    message: str | None = None


@dataclass(frozen=True)
class FitCheck:
    predicted: int                   # the analytic prediction (largest batch that fits)
    confirmed: int | None            # the largest size that ran within the budget (None: none did)
    attempts: tuple[Attempt, ...]
    device: str
    budget_bytes: int
    note: str

    @property
    def limiting_phase(self) -> str | None:
        ok = [a for a in self.attempts if a.batch_size == self.confirmed]
        return ok[0].peak_phase if ok else None


def _measured_total(m: Measurement, setup: RunSetup) -> int | None:
    if m.peak_bytes is None:
        return None
    if m.device == "cuda":
        reserved = m.reserved_bytes or m.peak_bytes
        return max(m.device_used_bytes or 0, reserved + setup.overheads.cuda_context_bytes)
    return device_totals(m.peak_bytes, dataclasses.replace(setup, device=Device.cuda)).device_total_bytes


def verify_batch_size(spec: ModelSpec, setup: RunSetup, gpu: Gpu, device: str, *,
                      measure: Callable[..., Measurement] | None = None, timeout_s: float | None = None,
                      progress: Callable[[str, int, int], None] | None = None) -> FitCheck:
    """The predicted largest batch size, then real steps (one warm-up, one timed) at it on ``device``.

    Args:
        spec, setup: the run (``setup.batch_size`` is replaced by the sizes tried).
        gpu: the budget (on CUDA, the device's own memory).
        device: "cuda" or "cpu": where the steps run.
        measure: ``runtime.runner.measure`` (injected by tests); runs each size in a fresh worker.
        timeout_s: per attempt.

    Returns:
        FitCheck: predicted, confirmed, every attempt, and which phase sets the confirmed size's peak.
    """
    if measure is None:
        from .runtime.runner import measure
    predicted = max_batch_size(spec, setup, gpu)
    attempts: list[Attempt] = []
    confirmed = None
    size = predicted
    while size >= 1 and len(attempts) < MAX_ATTEMPTS:
        run = dataclasses.replace(setup, batch_size=size, device=Device(device))
        if progress is not None:
            progress(f"b={size}", len(attempts), MAX_ATTEMPTS)
        m = measure(spec, run, out_dir=None, warmup_steps=1, timed_steps=1, timeout_s=timeout_s)
        total = _measured_total(m, run) if m.status == "ok" else None
        status = m.status if m.status != "ok" else ("ok" if total is not None and total <= gpu.memory_bytes
                                                    else "too big")
        attempts.append(Attempt(size, status, total, m.peak_phase, m.message if m.status != "ok" else None))
        if status == "ok":
            confirmed = size
            break
        if status not in ("oom", "too big"):
            break  # an error or timeout says nothing about memory: stop and report it
        size -= 1  # back off one sequence at a time: the prediction is usually within a step or two
    predicted_est = estimate(spec, dataclasses.replace(setup, batch_size=max(predicted, 1)))
    note = (f"predicted peak at b={max(predicted, 1)}: {predicted_est.peak_phase.value} phase; "
            + ("CUDA: measured max_memory_reserved + CUDA context against the GPU's memory"
               if device == "cuda" else
               "CPU: the real CPU step's live-tensor peak + modelled CUDA overheads against the budget (CPU "
               "kernels, not the GPU's)"))
    return FitCheck(predicted, confirmed, tuple(attempts), device, gpu.memory_bytes, note)
