"""Result records shared by the estimator, the tracer and the harness: raw numbers plus provenance (pure).

One ``Category`` vocabulary everywhere, so "estimate vs measured" is a join on category. Records hold ints
(bytes, params) and floats (seconds); formatting is report.py's job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .compat import attention_kernel
from .config import OPTION_GROUPS, ZERO_FIELDS, RunSetup
from .spec import ModelSpec


class Category(str, Enum):
    params_trainable = "params_trainable"    # weights the optimizer updates
    params_frozen = "params_frozen"          # frozen weights (4-bit for QLoRA), buffers
    gradients = "gradients"                  # .grad of trainable params
    optimizer_states = "optimizer_states"    # Adam moments, momentum, ...
    master_weights = "master_weights"        # fp32 copies of half weights (mixed regime)
    weight_copies = "weight_copies"          # half copies of weights autocast keeps for backward; dequantized 4-bit
    activations = "activations"              # tensors alive at the end of forward (saved for backward, logits)
    temporaries = "temporaries"              # transient: loss/logit buffers, activation grads, optimizer temporaries
    inputs = "inputs"                        # the batch
    overhead = "overhead"                    # outside tensors: CUDA context, cuBLAS workspace, allocator reserve


CATEGORIES = tuple(Category)
MODEL_STATE_CATEGORIES = (Category.params_trainable, Category.params_frozen, Category.gradients,
                          Category.optimizer_states, Category.master_weights)


class Phase(str, Enum):
    forward = "forward"
    backward = "backward"
    optimizer = "optimizer"


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes by category at one moment (a peak). ``total_bytes`` is the sum of the tensor categories."""

    params_trainable: int = 0
    params_frozen: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    master_weights: int = 0
    weight_copies: int = 0
    activations: int = 0
    temporaries: int = 0
    inputs: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.params_trainable + self.params_frozen + self.gradients + self.optimizer_states
                + self.master_weights + self.weight_copies + self.activations + self.temporaries + self.inputs)

    @property
    def model_state_bytes(self) -> int:
        return (self.params_trainable + self.params_frozen + self.gradients + self.optimizer_states
                + self.master_weights)

    def get(self, category: Category) -> int:
        return 0 if category is Category.overhead else getattr(self, category.value)

    def as_dict(self) -> dict[str, int]:
        return {c.value: self.get(c) for c in CATEGORIES if c is not Category.overhead}

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> "MemoryBreakdown":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in values.items() if k in names})


@dataclass(frozen=True)
class Term:
    """One named piece of the analytic estimate, for --explain: formula, substituted numbers, bytes, source."""

    category: Category
    name: str
    formula: str
    substituted: str
    bytes: int
    source: str = ""


@dataclass(frozen=True)
class DeviceTotals:
    """What the device would show: tensors (allocated), allocator segments (reserved), process total."""

    allocated_bytes: int          # = peak tensor bytes (+ cuBLAS workspace on CUDA)
    reserved_bytes: int           # allocated + caching-allocator slack
    device_total_bytes: int       # reserved + CUDA context (what nvidia-smi shows for the process)


@dataclass(frozen=True)
class Estimate:
    """A predicted training step (analytic or traced): peak and its phase, breakdown, per-phase peaks."""

    kind: str                                   # analytic | traced
    spec: ModelSpec
    setup: RunSetup
    total_params: int
    trainable_params: int
    peak: MemoryBreakdown                       # steady-state step peak, by category
    peak_phase: Phase
    phase_peaks: tuple[tuple[Phase, MemoryBreakdown], ...]
    first_step_peak_bytes: int                  # step 1 (optimizer states not yet allocated in forward/backward)
    steady_bytes: int                           # allocated between steps (params, states; grads freed)
    device: DeviceTotals
    terms: tuple[Term, ...] = ()
    notes: tuple[str, ...] = ()
    elapsed_s: float | None = None              # wall time to produce it (traced)
    after_step_bytes: int | None = None         # allocated right after optimizer.step(), before zero_grad (the
                                                # gradients still alive): what published benchmarks often read
    host_bytes: int | None = None               # data parallelism with offload: states held in host (CPU) memory

    @property
    def peak_bytes(self) -> int:
        return self.peak.total_bytes

    def to_row(self) -> dict[str, Any]:
        """Flat dict: the one interchange format for tables (pandas) and files (json/csv)."""
        row: dict[str, Any] = {
            "kind": self.kind, **setup_row(self.spec, self.setup),
            "total_params": self.total_params, "trainable_params": self.trainable_params,
            "peak_bytes": self.peak_bytes, "peak_phase": self.peak_phase.value,
            "first_step_peak_bytes": self.first_step_peak_bytes, "steady_bytes": self.steady_bytes,
            "after_step_bytes": self.after_step_bytes,
            "allocated_bytes": self.device.allocated_bytes, "reserved_bytes": self.device.reserved_bytes,
            "device_total_bytes": self.device.device_total_bytes,
        }
        row.update({f"{k}_bytes": v for k, v in self.peak.as_dict().items()})
        for phase, bd in self.phase_peaks:
            row[f"{phase.value}_peak_bytes"] = bd.total_bytes
        if self.elapsed_s is not None:
            row["elapsed_s"] = self.elapsed_s
        if self.host_bytes is not None:
            row["host_bytes"] = self.host_bytes
        return row


def setup_row(spec: ModelSpec, setup: RunSetup) -> dict[str, Any]:
    """The columns that identify a run (the join key of compare)."""
    return {
        "model": spec.name, "task": spec.task.value, "method": setup.method.value,
        "batch_size": setup.batch_size, "seq_len": setup.seq_len, "dtype": setup.dtype.value,
        "regime": setup.effective_regime.value, "optimizer": setup.optimizer.value,
        "attn_impl": attention_kernel(spec, setup).value, "device": setup.device.value,
        "grad_checkpointing": setup.grad_checkpointing, "dropout": setup.dropout,
        "method_options": method_options_str(setup), "loop_options": loop_options_str(setup),
    }


LOOP_FIELDS = ("loop", "optimizer_impl", "zero_grad", "grad_accum", "padded", "keep_outputs", "use_cache")


def loop_options_str(setup: RunSetup) -> str:
    """The loop's settings that differ from a plain torch loop ('' for it): part of the join key. The optimizer
    kernel is named when it is not the device's torch default."""
    default = RunSetup(device=setup.device, optimizer=setup.optimizer)
    parts = []
    for name in LOOP_FIELDS:
        value = getattr(setup, name)
        if name == "optimizer_impl":
            value, base = setup.effective_optimizer_impl, default.effective_optimizer_impl
        else:
            base = getattr(default, name)
        if value != base:
            parts.append(f"{name}={value.value if isinstance(value, Enum) else value}")
    if setup.parallel is not None:  # per-rank rows of a data-parallel run join on its shape too
        par = setup.parallel
        parts.append(f"strategy={par.strategy.value} world_size={par.world_size}"
                     + (f" nodes={par.nodes}" if par.nodes > 1 else "")
                     + (f" shard_size={par.shard_group}" if par.shard_size is not None else "")
                     + (f" offload={par.offload.value}" if par.offload.value != "none" else "")
                     + "".join(f" {k}={getattr(par, k)}" for k in ZERO_FIELDS if getattr(par, k) is not None))
    return " ".join(parts)


def method_options_str(setup: RunSetup) -> str:
    """A short stable description of the method's options (part of the join key)."""
    parts = []
    for name in OPTION_GROUPS:
        value = getattr(setup, name)
        if value is None:
            continue
        items = []
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v != f.default:
                v = ",".join(v) if isinstance(v, tuple) else (v.value if isinstance(v, Enum) else v)
                items.append(f"{f.name}={v}")
        if items:
            parts.append(f"{name}({' '.join(items)})")
    return " ".join(parts)


@dataclass(frozen=True)
class EnvInfo:
    """Where a measurement ran."""

    memprof_version: str
    python_version: str
    torch_version: str | None = None
    transformers_version: str | None = None
    peft_version: str | None = None
    device_name: str | None = None
    device_total_memory_bytes: int | None = None
    cuda_version: str | None = None
    driver_version: str | None = None
    cpu_threads: int | None = None
    platform: str | None = None
    date: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Measurement:
    """A measured training run. ``status`` is ok | oom | error | timeout | n/a (the installed libraries refuse
    the run); failed runs keep the message."""

    spec_name: str
    setup_row: dict[str, Any]
    status: str
    device: str                                  # cpu | cuda
    message: str | None = None
    total_params: int | None = None
    trainable_params: int | None = None
    peak_bytes: int | None = None                # CUDA: max_memory_allocated; CPU: tracker's live tensor peak
    reserved_bytes: int | None = None            # CUDA: max_memory_reserved
    device_used_bytes: int | None = None         # NVML: process memory on the device
    steady_bytes: int | None = None              # allocated after optimizer.step() + zero_grad
    after_step_bytes: int | None = None          # allocated after optimizer.step(), before zero_grad
    rss_peak_bytes: int | None = None            # CPU: process peak resident set (context only)
    breakdown: MemoryBreakdown | None = None     # tracker categories at the peak (breakdown mode)
    peak_phase: str | None = None
    tracker_peak_bytes: int | None = None
    unobserved_peak_bytes: int | None = None     # CPU: allocator-level peak of an unobserved step (profiler events)
    unobserved_phase: str | None = None          # the phase where that peak falls
    step_times_s: tuple[float, ...] = ()
    step_time_median_s: float | None = None
    step_time_p10_s: float | None = None
    step_time_p90_s: float | None = None
    step_time_ci95_s: tuple[float, float] | None = None  # 95% confidence interval of the median step time
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    flops_per_step: float | None = None
    mfu: float | None = None
    energy_per_step_j: float | None = None
    warmup_steps: int = 0
    timed_steps: int = 0
    env: EnvInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None                      # data-parallel rank of this row; None: one device, or the job's row
    world_size: int | None = None                # ranks of the job (runtime/ranks.py); None: a single-device run

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"kind": "measured", **self.setup_row, "status": self.status}
        if self.world_size is not None:
            row.update(rank=self.rank, world_size=self.world_size)
        for name in ("message", "total_params", "trainable_params", "peak_bytes", "reserved_bytes",
                     "device_used_bytes", "steady_bytes", "after_step_bytes", "rss_peak_bytes", "peak_phase",
                     "tracker_peak_bytes", "unobserved_peak_bytes", "unobserved_phase",
                     "step_time_median_s", "step_time_p10_s", "step_time_p90_s", "samples_per_s", "tokens_per_s",
                     "flops_per_step", "mfu", "energy_per_step_j", "warmup_steps", "timed_steps"):
            row[name] = getattr(self, name)
        ci = self.step_time_ci95_s
        row["step_time_ci_low_s"], row["step_time_ci_high_s"] = (ci[0], ci[1]) if ci else (None, None)
        if self.breakdown is not None:
            row.update({f"{k}_bytes": v for k, v in self.breakdown.as_dict().items()})
        if self.env is not None:
            row.update({f"env_{k}": v for k, v in self.env.as_dict().items()})
        return row


def loop_description(setup: RunSetup) -> str:
    """'torch loop' / 'Trainer loop, grad accum 4, padded batches, ...': the loop part of a setup line."""
    parts = ["Trainer loop" if setup.loop.value == "trainer" else "torch loop"]
    if setup.grad_accum > 1:
        parts.append(f"grad accum {setup.grad_accum}")
    if setup.zero_grad.value == "zeros":
        parts.append("grads zeroed in place")
    if setup.padded:
        parts.append("padded batches")
    if setup.keep_outputs:
        parts.append("outputs kept through backward")
    if setup.use_cache:
        parts.append("KV cache built" if setup.builds_cache else "use_cache (off under checkpointing)")
    if setup.parallel is not None:
        parts.append(f"per rank of {setup.parallel.describe()}")
    return ", ".join(parts)
