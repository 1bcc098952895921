"""The in-process measurement: real training steps on CPU or CUDA, peak memory and step time.

Phases, each a small function: build (model, method, optimizer, batch) -> warm-up (>= 1 step; the first
allocates optimizer state and the cuBLAS workspace) -> reset (CUDA: synchronize, empty_cache,
reset_peak_memory_stats) -> timed steps without any tracking -> read (allocator peaks, NVML, energy) ->
optional breakdown step under ``MemoryTracker`` (categories at the tracked peak) -> CPU: one unobserved step
under torch.profiler's memory events (``unobserved_step``: the allocator-level peak a GPU's
``max_memory_allocated`` would read, including what kernels allocate below the dispatcher).

On CUDA ``peak_bytes`` is ``max_memory_allocated`` over the timed steps. CPU has no allocator peak counter:
there ``peak_bytes`` is the tracker's live-tensor peak of one tracked steady-state step, so it needs
``breakdown=True``; the process's peak RSS is recorded as context only (it includes the Python heap,
libraries and the allocator's cache). Run each measurement in a fresh process (``runner.measure``) for a
clean peak.
"""

from __future__ import annotations

import errno
import gc
import math
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..compat import check_supported, lora_target_note
from ..config import Dtype, Method, Regime, RunSetup, with_method_defaults
from ..errors import ConfigError, DependencyMissingError, DeviceUnavailableError, MemprofError
from ..images import image_note, image_run
from ..records import Category, EnvInfo, Measurement, MemoryBreakdown, Phase, setup_row
from ..spec import Family, ModelSpec
from . import probes
from .build import (TORCH_DTYPE, apply_method, host_buffers, build_base_model, check_positions, count_trainable, enable_checkpointing, make_optimizer,
                    resolve_attention_of_class, synthetic_batch)
from .allocator import PhaseMarks, live_storage_bytes, unobserved_peak
from .refusals import library_refusals, what_runs
from .step import block_modules, run_step
from .tracker import MemoryTracker, local_tensor

ProgressFn = Callable[[str, int, int], None]
CUDA_BLOCK_BYTES = 512  # caching-allocator rounding, so the tracker's CUDA peak compares to max_memory_allocated
_CPU_OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "could not allocate", "out of memory")


@dataclass
class BuiltRun:
    """Everything a step needs, built once."""

    model: nn.Module
    optimizer: Any
    batch: dict[str, torch.Tensor]
    scaler: Any
    trainable_params: int
    total_params: int
    held: list = field(default_factory=list)  # the loop's kept model output (keep_outputs), across steps
    after_step_bytes: int | None = None       # CUDA: allocated right after the last timed optimizer.step()


def _progress(progress: ProgressFn | None, phase: str, step: int, total: int) -> None:
    if progress is not None:
        progress(phase, step, total)


def _check_device(setup: RunSetup) -> str:
    device = setup.device.value
    if device == "cuda":
        probes.require_cuda()
    if setup.method is Method.qlora and device != "cuda":
        raise DeviceUnavailableError("QLoRA needs bitsandbytes' 4-bit CUDA kernels; measure it with --device cuda "
                                     "on a GPU, or measure --method lora on CPU")
    return device


def quantize_blocks_4bit(model: nn.Module, setup: RunSetup) -> int:
    """QLoRA storage (Dettmers et al. 2023): replace every linear inside the transformer blocks by a
    bitsandbytes ``Linear4bit`` (heads and embeddings stay in the compute dtype). CUDA only, untested here.

    Returns:
        the number of modules replaced.

    Raises:
        DependencyMissingError: bitsandbytes is not installed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise DependencyMissingError("QLoRA needs bitsandbytes: pip install bitsandbytes") from None
    from transformers.pytorch_utils import Conv1D

    quant = setup.quant
    assert quant is not None
    compute = TORCH_DTYPE[setup.dtype]
    replaced = 0
    for block in block_modules(model):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, (nn.Linear, Conv1D)):
                    continue
                # GPT-2's Conv1D stores (in, out); Linear4bit wants (out, in)
                weight = child.weight.data.t() if isinstance(child, Conv1D) else child.weight.data
                d_out, d_in = weight.shape
                new = bnb.nn.Linear4bit(d_in, d_out, bias=child.bias is not None, compute_dtype=compute,
                                        compress_statistics=quant.double_quant, quant_type=quant.quant_type,
                                        device="meta")
                new.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, blocksize=quant.blocksize,
                                               compress_statistics=quant.double_quant, quant_type=quant.quant_type,
                                               module=new)
                if child.bias is not None:
                    new.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, new.to(weight.device))  # Params4bit quantizes on its first move to CUDA
                replaced += 1
    torch.cuda.empty_cache()
    return replaced


def keep_on_host(model: torch.nn.Module, device: str) -> None:
    """Parameters and buffers to ``device`` (peft and memprof's adapters already create theirs there), except the
    buffers of peft's layers that peft leaves in host memory, as in peft's own benchmark (the base loaded on the
    device, never moved after ``get_peft_model``): BOFT's permutation matrices ``boft_P``, which its forward
    copies to the device at each use. ``trace.host_buffers`` picks the same ones."""
    host = host_buffers(model, torch.device(device).type)
    model.to(device)
    for module, name in host:
        module._buffers[name] = module._buffers[name].to("cpu")


def build_run(spec: ModelSpec, setup: RunSetup, device: str, pretrained: str | None = None,
              peft_config: Any = None, wrap: Callable[[nn.Module], nn.Module] | None = None) -> BuiltRun:
    """Build phase: the model on ``device`` (random init unless ``pretrained``), the method, activation
    checkpointing, ``wrap`` (a data-parallel rank: parallel.wrap_for_strategy, before the optimizer sees the
    parameters), the optimizer, a GradScaler for fp16 AMP on CUDA, and the synthetic batch."""
    check_positions(spec, setup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_base_model(spec, setup, device, pretrained)
        if setup.method is Method.qlora:
            quantize_blocks_4bit(model, setup)
        model = apply_method(model, spec, setup, peft_config)
        keep_on_host(model, device)
        if setup.grad_checkpointing:
            enable_checkpointing(model)  # non-reentrant; transformers enables input grads for PEFT
        if wrap is not None:
            model = wrap(model)
    model.train()
    trainable, total = count_trainable(model)
    optimizer = make_optimizer(model, setup, device)
    scaler = None
    if device == "cuda" and setup.effective_regime is Regime.amp and setup.dtype is Dtype.fp16:
        scaler = torch.amp.GradScaler("cuda")
    batch = synthetic_batch(spec, setup, device)
    return BuiltRun(model, optimizer, batch, scaler, trainable, total)


def _step(run: BuiltRun, setup: RunSetup, device: str, tracker: MemoryTracker | None = None,
          after_step: Callable[[], None] | None = None) -> None:
    run_step(run.model, run.batch, run.optimizer, setup, device, tracker=tracker, scaler=run.scaler, held=run.held,
             after_step=after_step)


def run_warmup(run: BuiltRun, setup: RunSetup, device: str, steps: int, progress: ProgressFn | None = None) -> None:
    for i in range(steps):
        _step(run, setup, device)
        _progress(progress, "warmup", i + 1, steps)


def run_timed(run: BuiltRun, setup: RunSetup, device: str, steps: int | None,
              progress: ProgressFn | None = None) -> list[float]:
    """The timed window: plain steps (no tracker, no hooks), one wall time each in seconds. ``steps`` None times
    until the median is known to +-5% (its 95% confidence interval, ``median_ci``) or ADAPTIVE_MAX_STEPS /
    ADAPTIVE_MAX_S are reached, at least ADAPTIVE_MIN_STEPS. The last step also reads CUDA's allocated bytes
    right after optimizer.step() (``run.after_step_bytes``)."""
    timer = probes.StepTimer(device)
    limit = steps if steps is not None else ADAPTIVE_MAX_STEPS
    i = 0
    while i < limit:
        def read() -> None:
            if device == "cuda":
                run.after_step_bytes = probes.cuda_allocated_bytes()
        with timer.step():
            _step(run, setup, device, after_step=read)
        i += 1
        _progress(progress, "timed", i, limit if steps is not None else max(i, ADAPTIVE_MIN_STEPS))
        if steps is None and i >= ADAPTIVE_MIN_STEPS:
            lo, hi = median_ci(timer.times_s)
            med = statistics.median(timer.times_s)
            if (hi - lo) <= 2 * ADAPTIVE_REL_HALF_WIDTH * med or sum(timer.times_s) >= ADAPTIVE_MAX_S:
                break
    return timer.times_s


ADAPTIVE_MIN_STEPS = 5        # 5-8 steps: the interval is their range (94-99% coverage); 9 on: order statistics
ADAPTIVE_MAX_STEPS = 30
ADAPTIVE_MAX_S = 60.0         # of timed steps
ADAPTIVE_REL_HALF_WIDTH = 0.05


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: order statistics x_(j), x_(n+1-j) with j the largest
    rank such that P(Binomial(n, 1/2) < j) <= (1 - confidence) / 2 (e.g. Conover, Practical Nonparametric
    Statistics, 3rd ed., Sec. 3.2). With too few values for that, the range."""
    xs = sorted(values)
    n = len(xs)
    alpha = (1 - confidence) / 2
    cdf, j = 0.0, 0
    for k in range(n + 1):  # cdf = P(X <= k - 1) before the update = P(X < k)
        if cdf > alpha:
            break
        j = k
        cdf += math.comb(n, k) / 2 ** n
    if j < 1:
        return xs[0], xs[-1]
    return xs[j - 1], xs[n - j]


@dataclass(frozen=True)
class TrackedStep:
    """What one tracked step saw, in bytes."""

    breakdown: MemoryBreakdown     # categories at the tracked peak; total_bytes == peak_bytes
    peak_bytes: int
    peak_phase: str                # forward | backward | optimizer
    steady_bytes: int              # live after optimizer.step() + zero_grad
    after_step_bytes: int          # live right after optimizer.step(), before zero_grad


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor reachable in a model output (ModelOutput fields, tuples, a Cache's layers)."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(x: Any) -> None:
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif hasattr(x, "layers"):  # transformers Cache: per-layer keys/values
            for layer in x.layers:
                walk(getattr(layer, "keys", None))
                walk(getattr(layer, "values", None))

    walk(obj)
    return out


def tracked_step(run: BuiltRun, setup: RunSetup, device: str) -> TrackedStep:
    """One more steady-state step under the categorised tracker. Optimizer states (and master weights)
    exist before the step, so they are registered with the parameters and the batch."""
    tracker = MemoryTracker(round_bytes=CUDA_BLOCK_BYTES if device == "cuda" else 1)
    tracker.register_module(run.model)
    tracker.register(run.batch.values(), Category.inputs)
    tracker.register_optimizer(run.optimizer)
    # the previous step's output a keep_outputs loop still holds (logits, the KV cache): alive since its forward
    tracker.register(_tensors(run.held), Category.activations)
    tracker.reset_peak()
    after: list[int] = []
    with tracker:
        _step(run, setup, device, tracker=tracker, after_step=lambda: after.append(tracker.current_bytes))
    breakdown = tracker.breakdown()
    phase_peaks = tracker.phase_peaks()
    top = max(phase_peaks, key=lambda p: phase_peaks[p][0]) if phase_peaks else Phase.forward.value
    return TrackedStep(breakdown, tracker.peak_bytes, top.split(".")[0], tracker.current_bytes, after[-1])


@dataclass(frozen=True)
class UnobservedStep:
    """What one unobserved CPU step allocated, in bytes (``runtime/allocator.py``: profiler memory events)."""

    peak_bytes: int        # live before the step + the running sum's maximum during it
    peak_phase: str        # forward | backward | optimizer
    live_before_bytes: int  # the storages alive when the step began (parameters, states, batch, kept outputs)


def unobserved_step(run: BuiltRun, setup: RunSetup) -> UnobservedStep:
    """One more steady-state CPU step, not under any dispatch mode: autograd accumulates and kernels allocate as in
    a plain training script, and c10's CPU allocator reports every allocation to torch.profiler (also those kernels
    make internally: TensorIterator's promoted input copies, workspaces), which a TorchDispatchMode does not see.
    The peak is what was alive before (each storage once) plus the running sum's maximum during the step."""
    model, optimizer = run.model, run.optimizer
    live: list[int] = []

    def prepare() -> None:
        # one plain step inside the profile first: what the measured step frees of it (a kept output) is seen
        # freed (allocator.unobserved_peak); then the storages alive, each once
        _step(run, setup, "cpu")
        states = (v for st in getattr(optimizer, "state", {}).values() if isinstance(st, dict)
                  for v in st.values() if isinstance(v, torch.Tensor))
        tensors = [*model.parameters(), *model.buffers(), *run.batch.values(), *states,
                   *(p.grad for p in model.parameters()), *_tensors(run.held), *_master_weights(optimizer)]
        # a DTensor (FSDP2's sharded parameters, gradients, states) holds its rank's shard: count that
        live.append(live_storage_bytes(local_tensor(t) for t in tensors))

    step = unobserved_peak(lambda: _step(run, setup, "cpu", tracker=PhaseMarks()), before_fn=prepare)
    return UnobservedStep(live[0] + step.peak_bytes, step.top_phase(p.value for p in Phase), live[0])


def _master_weights(optimizer: Any) -> list[torch.Tensor]:
    """fp32 master copies a MasterWeightOptimizer keeps beside half parameters (build.py; none otherwise)."""
    return [t for t in getattr(optimizer, "masters", ()) if isinstance(t, torch.Tensor)]


def _real_tokens(batch: dict[str, torch.Tensor], setup: RunSetup) -> int:
    """Tokens that are not padding (the attention mask's ones; every token without a mask; images: the tokens of
    each image, ``seq_len``)."""
    mask = batch.get("attention_mask")
    if mask is None and "input_ids" not in batch:
        return setup.batch_size * setup.seq_len
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 1]."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _flops(spec: ModelSpec, setup: RunSetup, peft_config: Any) -> int | None:
    if peft_config is not None or spec.family is Family.other:
        return None  # an arbitrary peft config or architecture: no analytic FLOP count
    from ..analytic.flops import step_flops

    try:
        return step_flops(spec, setup).total_flops
    except MemprofError:  # e.g. LoRA defaults memprof does not know but peft does: the run stands, FLOPs unknown
        return None


def is_oom(exc: BaseException) -> bool:
    """CUDA OutOfMemoryError, Python MemoryError, a CPU allocator failure (RuntimeError 'can't allocate'), or
    an OSError with ENOMEM (a file operation, such as a lazy import, that could not get memory)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _CPU_OOM_MARKERS)


def run_measurement(spec: ModelSpec, setup: RunSetup, *, warmup_steps: int = 1, timed_steps: int | None = None,
                    breakdown: bool = True, pretrained: str | None = None, peft_config: Any = None,
                    progress: ProgressFn | None = None, unobserved_cpu: bool = True,
                    wrap: Callable[[nn.Module], nn.Module] | None = None) -> Measurement:
    """Measure training steps of ``spec`` under ``setup`` on ``setup.device``, in this process.

    Args:
        spec: the model; weights are random unless ``pretrained`` (memory and time do not depend on them).
        setup: the run; ``setup.device`` is cpu or cuda (resolve "auto" before calling).
        warmup_steps: untimed steps first (>= 1; the first allocates optimizer state).
        timed_steps: steps timed and measured (>= 1); None: until the median is known to +-5% (run_timed).
        breakdown: run one more step under the tracker for the category breakdown (required on CPU for
            ``peak_bytes``; on CUDA it adds ``tracker_peak_bytes`` next to the allocator's peak).
        pretrained: local path or hub id of real weights to load instead of random init.
        peft_config: a peft config object to apply instead of the method's own (FLOPs then not counted).
        progress: ``progress(phase, step, total)`` after each step of build | warmup | timed | breakdown.
        unobserved_cpu: on CPU, one more step without the tracker under torch.profiler's memory events
            (``unobserved_step``): ``unobserved_peak_bytes``, what a plain script allocates. Not for a loop that
            keeps its outputs (``keep_outputs``: the profiler was found to miss the kept output's free).
        wrap: applied to the model after the method and before the optimizer (``build_run``; a rank of
            ``runtime.rank_worker``).

    Returns:
        A Measurement with status "ok", or "oom" (with the phase and the error) when memory ran out.

    Raises:
        DeviceUnavailableError: CUDA requested but absent; QLoRA on CPU.
        ConfigError: invalid step counts, or the model/method cannot be built.
        DependencyMissingError: QLoRA without bitsandbytes.
        LibraryRefusalError: the installed transformers / peft refuse this method on this model.
    """
    if warmup_steps < 1 or (timed_steps is not None and timed_steps < 1):
        raise ConfigError(f"warm-up and timed steps must be >= 1, got {warmup_steps} and {timed_steps}")
    setup = image_run(spec, with_method_defaults(setup))  # image-cls: seq_len = the tokens of one image
    device = _check_device(setup)
    setup, attention_note = resolve_attention_of_class(spec, setup)
    if peft_config is None:
        check_supported(spec, setup)
    env = probes.env_info(device)
    base = dict(spec_name=spec.name, setup_row=setup_row(spec, setup), device=device, env=env,
                warmup_steps=warmup_steps, timed_steps=timed_steps or 0)
    phase = "build"
    try:
        with library_refusals(what_runs(spec, setup, peft_config)):
            _progress(progress, "build", 0, 1)
            run = build_run(spec, setup, device, pretrained, peft_config, wrap)
            _progress(progress, "build", 1, 1)
            phase = "warmup"
            run_warmup(run, setup, device, warmup_steps, progress)
            phase = "timed"
            if device == "cuda":
                probes.cuda_reset_peak()
            energy_start = probes.nvml_energy_mj() if device == "cuda" else None
            times = run_timed(run, setup, device, timed_steps, progress)
            reads = _read(device, energy_start, len(times))
            unobserved = None
            if device == "cpu" and unobserved_cpu and not setup.keep_outputs:
                phase = "unobserved"
                unobserved = unobserved_step(run, setup)
            tracked = None
            if breakdown:
                phase = "breakdown"
                _progress(progress, "breakdown", 0, 1)
                tracked = tracked_step(run, setup, device)
                _progress(progress, "breakdown", 1, 1)
    except MemprofError:
        raise
    except Exception as exc:  # noqa: BLE001 (OOM is a result; anything else propagates)
        if not is_oom(exc):
            raise
        first = (str(exc).splitlines() or [""])[0][:500]  # a bare MemoryError has no message
        message = f"out of memory during {phase}: {type(exc).__name__}" + (f": {first}" if first else "")
        del exc
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        return Measurement(status="oom", message=message, rss_peak_bytes=probes.rss_peak_bytes(), **base)
    measured = _assemble(spec, setup, device, run, times, reads, tracked, peft_config, base, unobserved)
    if image_note(spec, setup):
        measured.extra["notes"].append(image_note(spec, setup))
    if peft_config is None and (lora_note := lora_target_note(spec, setup)):
        measured.extra["notes"].insert(0, lora_note)
    if attention_note:
        measured.extra["notes"].insert(0, attention_note)
    return measured


def _read(device: str, energy_start: int | None, steps: int) -> dict[str, Any]:
    """Read phase: allocator peaks and NVML (CUDA), steady-state allocated, energy per step."""
    out: dict[str, Any] = {"rss_peak_bytes": probes.rss_peak_bytes()}
    if device != "cuda":
        return out
    probes.cuda_synchronize()
    out["peak_bytes"] = probes.cuda_max_allocated_bytes()
    out["reserved_bytes"] = probes.cuda_max_reserved_bytes()
    out["steady_bytes"] = probes.cuda_allocated_bytes()  # run_step ends with optimizer.step() + zero_grad
    out["device_used_bytes"] = probes.nvml_process_used_bytes()
    energy_end = probes.nvml_energy_mj()
    if energy_start is not None and energy_end is not None:
        out["energy_per_step_j"] = (energy_end - energy_start) / 1000 / steps
    return out


def _assemble(spec: ModelSpec, setup: RunSetup, device: str, run: BuiltRun, times: list[float],
              reads: dict[str, Any], tracked: TrackedStep | None, peft_config: Any,
              base: dict[str, Any], unobserved: UnobservedStep | None = None) -> Measurement:
    median = statistics.median(times)
    flops = _flops(spec, setup, peft_config)
    mfu = None
    env: EnvInfo = base["env"]
    if flops is not None and device == "cuda" and env.device_name:
        from ..analytic.flops import mfu as _mfu, peak_flops

        peak = peak_flops(env.device_name, setup.dtype.value)
        mfu = _mfu(flops, median, peak) if peak else None
    notes = []
    if tracked is not None:
        notes.append(f"breakdown from one tracked step after the timed window ({'512-byte blocks' if device == 'cuda' else 'exact storage bytes'})")
    if device == "cpu":
        notes.append("CPU: peak_bytes is the tracker's live-tensor peak of a steady-state step"
                     + ("" if tracked else "; not measured (run with breakdown)") + "; rss_peak_bytes is context only")
        if setup.keep_outputs and tracked is not None:
            notes.append("CPU: no unobserved step for a loop that keeps the previous step's output: torch.profiler's "
                         "memory events were found to miss that output's free now and then (up to +10% on a 2-block "
                         "step), so the allocator-level peak would not be trusted")
        if unobserved is not None:
            notes.append("CPU: unobserved_peak_bytes is the allocator-level peak of one more step run without the "
                         "tracker (torch.profiler memory events: every c10 CPU allocation, kernels' own included), "
                         "plus the storages alive before it")
    peak = reads.get("peak_bytes", tracked.peak_bytes if tracked and device == "cpu" else None)
    steady = reads.get("steady_bytes", tracked.steady_bytes if tracked and device == "cpu" else None)
    after_step = run.after_step_bytes if device == "cuda" else (tracked.after_step_bytes if tracked else None)
    base = {**base, "timed_steps": len(times)}
    return Measurement(
        status="ok", total_params=run.total_params, trainable_params=run.trainable_params,
        peak_bytes=peak, reserved_bytes=reads.get("reserved_bytes"), device_used_bytes=reads.get("device_used_bytes"),
        steady_bytes=steady, after_step_bytes=after_step, rss_peak_bytes=reads.get("rss_peak_bytes"),
        breakdown=tracked.breakdown if tracked else None, peak_phase=tracked.peak_phase if tracked else None,
        tracker_peak_bytes=tracked.peak_bytes if tracked else None,
        unobserved_peak_bytes=unobserved.peak_bytes if unobserved else None,
        unobserved_phase=unobserved.peak_phase if unobserved else None,
        step_times_s=tuple(times), step_time_median_s=median, step_time_p10_s=_percentile(times, 0.1),
        step_time_p90_s=_percentile(times, 0.9), step_time_ci95_s=median_ci(times), samples_per_s=setup.grad_accum * setup.batch_size / median,
        tokens_per_s=setup.grad_accum * _real_tokens(run.batch, setup) / median, flops_per_step=float(flops) if flops is not None else None, mfu=mfu,
        energy_per_step_j=reads.get("energy_per_step_j"), extra={"notes": notes}, **base,
    )
