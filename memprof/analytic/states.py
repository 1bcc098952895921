"""Model states: weights, gradients, optimizer states, master weights, and the optimizer step's temporaries (pure).

Bytes per parameter follow the README's precision regimes (Rajbhandari et al. 2020, ZeRO, Sec. 3.1 for the
16-byte mixed-precision budget). Frozen parameters cost only their weights. Tensors a PEFT method adds are fp32
on a half base (peft ``autocast_adapter_dtype=True``; memprof's adapters do the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Device, Method, Optimizer, OptimizerImpl, Regime, RunSetup
from ..spec import ModelSpec
from .params import ParamCounts, method_params, trainable_tensors
from .sim import BYTES

NF4_BYTES_PER_PARAM = 0.5          # two 4-bit codes per byte (Dettmers et al. 2023, QLoRA Sec. 2)
BNB_8BIT_MIN_NUMEL = 4096          # bitsandbytes keeps smaller tensors' optimizer states in 32 bit
BNB_8BIT_BLOCK = 256               # bitsandbytes blockwise 8-bit optimizer: one fp32 absmax per 256 values


@dataclass(frozen=True)
class StateBytes:
    params_trainable: int
    params_frozen: int
    gradients: int
    optimizer_states: int
    master_weights: int
    optimizer_temp: int            # extra bytes alive during optimizer.step() (steady state)
    grad_upcast: int               # mixed regime: fp32 copies of the gradients made at the step
    grads_freed_at_step: int       # mixed regime: the half gradients, dropped as their fp32 copies are made


def weight_bytes(setup: RunSetup) -> int:
    """Bytes per base weight: half under pure/mixed (and QLoRA's non-quantized weights), fp32 otherwise."""
    if setup.effective_regime in (Regime.pure, Regime.mixed) or setup.method is Method.qlora:
        return BYTES[setup.dtype.value]
    return 4


def quantized_bytes(n_params: int, setup: RunSetup) -> int:
    """4-bit NF4/FP4 weights plus their block constants (QLoRA double quantization: 8-bit absmax per block
    of 64 and one fp32 constant per 256 blocks; without it one fp32 absmax per block)."""
    q = setup.quant
    block = q.blocksize if q else 64
    blocks = math.ceil(n_params / block)
    constants = blocks * 1 + math.ceil(blocks / 256) * 4 if (q is None or q.double_quant) else blocks * 4
    return math.ceil(n_params * NF4_BYTES_PER_PARAM) + constants


def _state_elems_per_tensor(rows: int, cols: int, opt: Optimizer) -> float:
    """Optimizer state elements for one tensor (in the parameter's dtype, except 8-bit AdamW in bytes)."""
    n = rows * cols
    if opt is Optimizer.adamw:
        return 2 * n                      # exp_avg, exp_avg_sq (Loshchilov & Hutter 2019)
    if opt in (Optimizer.sgd_momentum, Optimizer.lion):
        return n                          # momentum buffer / Lion's exp_avg (Chen et al. 2023)
    if opt is Optimizer.adafactor:        # factored second moment (Shazeer & Stern 2018): row + column stats
        return rows + cols if rows > 1 and cols > 1 else n
    return 0                              # plain SGD


def step_counter_bytes(spec: ModelSpec, setup: RunSetup) -> int:
    """AdamW's and Adafactor's per-tensor ``state["step"]``: a 0-dim fp32 tensor, on the parameter's device
    when the kernel is fused (or the parameters are on the CPU), else on the CPU (torch 2.13 adam.py,
    ``_init_group``), where it costs the device nothing. NB: 4 bytes each here; the CUDA caching allocator
    serves each from a 512-byte block."""
    if setup.optimizer not in (Optimizer.adamw, Optimizer.adafactor):
        return 0
    if setup.device is Device.cpu or setup.effective_optimizer_impl is OptimizerImpl.fused:
        return 4 * len(trainable_tensors(spec, setup))
    return 0


def optimizer_state_bytes(spec: ModelSpec, setup: RunSetup) -> int:
    opt = setup.optimizer
    total = step_counter_bytes(spec, setup)
    wb = weight_bytes(setup)
    master = setup.effective_regime is Regime.mixed
    for rows, cols, adapter in trainable_tensors(spec, setup):
        n = rows * cols
        if opt is Optimizer.adamw_8bit:
            # Dettmers et al. 2022 (arXiv:2110.02861): two 1-byte states + fp32 absmax per block
            total += 8 * n if n < BNB_8BIT_MIN_NUMEL else 2 * n + 2 * 4 * math.ceil(n / BNB_8BIT_BLOCK)
            continue
        dtype_bytes = 4 if adapter or master else wb
        total += int(_state_elems_per_tensor(rows, cols, opt) * dtype_bytes)
    return total


def _optimizer_temp_bytes(spec: ModelSpec, setup: RunSetup) -> int:
    """Extra memory inside optimizer.step(), steady state.

    AdamW: foreach (CUDA default) computes ``exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs)`` for a whole
    (device, dtype) group at once: one temporary of the group's size; the for-loop path (CPU default) does
    ``(exp_avg_sq.sqrt() / bias_correction2_sqrt)`` per tensor: two temporaries of the largest tensor; the fused
    kernel (``torch._fused_adamw_``, the Trainer's adamw_torch_fused) updates in place: none.
    Adafactor builds a full-size variance estimate per tensor (group-wide with foreach). Lion (memprof's
    implementation) allocates one update per tensor. SGD's updates are in place.
    """
    opt = setup.optimizer
    tensors = trainable_tensors(spec, setup)
    impl = setup.effective_optimizer_impl
    if not tensors or opt in (Optimizer.sgd, Optimizer.sgd_momentum, Optimizer.adamw_8bit) \
            or impl is OptimizerImpl.fused:
        return 0
    master = setup.effective_regime is Regime.mixed
    wb = weight_bytes(setup)

    def nbytes(rows: int, cols: int, adapter: bool) -> int:
        return rows * cols * (4 if adapter or master else wb)

    if impl is OptimizerImpl.foreach:
        groups: dict[bool, int] = {}
        for rows, cols, adapter in tensors:
            key = adapter or master or wb == 4
            groups[key] = groups.get(key, 0) + nbytes(rows, cols, adapter)
        return max(groups.values())
    # for-loop: the previous tensor's result (``denom`` / ``update``) is still bound while the next one's
    # temporaries are made: AdamW sqrt() and the division (2 per tensor), Lion/Adafactor one update each
    per_tensor = 2 if opt is Optimizer.adamw else 1
    sizes = [nbytes(r, c, a) for r, c, a in tensors]
    return max(prev + per_tensor * cur for prev, cur in zip([0] + sizes[:-1], sizes))


def state_bytes(spec: ModelSpec, setup: RunSetup) -> StateBytes:
    """Weights, gradients, optimizer states and master weights of ``spec`` under ``setup`` (steady state)."""
    pc: ParamCounts = method_params(spec, setup)
    regime = setup.effective_regime
    wb = weight_bytes(setup)
    adapter = pc.adapter_fp32
    base_trainable = pc.trainable - adapter
    adapter_bytes = 4 * adapter          # fp32 under every regime
    trainable_bytes = adapter_bytes + base_trainable * wb
    frozen = pc.frozen
    if setup.method is Method.qlora:
        frozen_bytes = quantized_bytes(pc.quantized, setup) + (frozen - pc.quantized) * wb
    else:
        frozen_bytes = frozen * wb
    frozen_bytes += 4 * pc.buffers_fp32  # VeRA's shared projections
    grads = trainable_bytes                      # gradients in the parameter's dtype
    masters = 4 * base_trainable if regime is Regime.mixed else 0
    upcast = 4 * base_trainable if regime is Regime.mixed else 0
    return StateBytes(
        params_trainable=trainable_bytes, params_frozen=frozen_bytes, gradients=grads,
        optimizer_states=optimizer_state_bytes(spec, setup), master_weights=masters,
        optimizer_temp=_optimizer_temp_bytes(spec, setup), grad_upcast=upcast,
        grads_freed_at_step=base_trainable * wb if regime is Regime.mixed else 0,
    )
