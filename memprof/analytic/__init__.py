"""The analytic estimator: ModelSpec + RunSetup -> Estimate, in pure Python (no torch import).

Known limitations (what the estimate does not capture; see also analytic/overheads.py):
- allocator behaviour beyond a flat reserve fraction: fragmentation depends on the allocation history;
- kernel workspaces other than cuBLAS's (cuDNN, flash-attention split buffers) and exact kernel temporaries
  inside backward (modelled for attention, approximated elsewhere);
- padding masks (synthetic batches have none), KV caches (training only), gradient accumulation across
  micro-batches (one micro-batch is modelled), data-parallel buckets and communication buffers;
- the scripts mirror transformers 5.x / peft 0.21 modeling code (forward.py, families/*.py, each naming its upstream file); other versions may differ,
  and ``--trace`` runs the real code.
"""

from __future__ import annotations

import dataclasses

from ..compat import refusal_note
from ..config import RunSetup, check_runnable, with_method_defaults
from ..records import Category, Estimate, MemoryBreakdown, Phase
from ..spec import ModelSpec
from ..spec import Family, Task as SpecTask, check_sequence_length
from ..config import Method
from .compose import FATES, Timeline, structural, timeline
from .explain import explain_terms
from .overheads import device_totals
from .params import ParamCounts, method_params
from .states import StateBytes, state_bytes

__all__ = ["estimate"]


# the replay's fates are MemoryBreakdown's fields, in order
assert FATES == tuple(f.name for f in dataclasses.fields(MemoryBreakdown))


_STRUCTURES: dict[tuple, tuple[ParamCounts, StateBytes, Timeline]] = {}


def _structure(spec: ModelSpec, setup: RunSetup, tracked: bool) -> tuple[ParamCounts, StateBytes, Timeline]:
    """Everything that does not depend on (b, s), cached per model and structural options."""
    key = (spec, setup.method, setup.dtype, setup.regime, setup.optimizer, setup.attn_impl, setup.device,
           setup.grad_checkpointing, setup.dropout, setup.lora, setup.quant, setup.adapter, setup.ia3, setup.prompt,
           tracked, setup.batch_size == 1)
    hit = _STRUCTURES.get(key)
    if hit is None:
        struct = structural(setup)
        hit = method_params(spec, struct), state_bytes(spec, struct), timeline(spec, struct, tracked)
        if len(_STRUCTURES) > 4096:
            _STRUCTURES.clear()
        _STRUCTURES[key] = hit
    return hit


def input_bytes(spec: ModelSpec, setup: RunSetup) -> int:
    """The batch: int64 token ids (b*s); seq-cls labels (b); causal-LM labels are the ids themselves."""
    b, s = setup.batch_size, setup.seq_len
    return 8 * b * s + (8 * b if spec.task is SpecTask.seq_cls else 0)


def _best(cands: tuple, totals: tuple, b: int, s: int):  # noqa: ANN202
    bs, bss = b * s, b * s * s
    best_i, best_v = 0, None
    for i, p in enumerate(totals):
        v = p[0] * bs + p[1] * bss + p[2] * b + p[3] * s + p[4]
        if best_v is None or v > best_v:
            best_i, best_v = i, v
    return cands[best_i]


def estimate(spec: ModelSpec, setup: RunSetup, explain: bool = False, tracked: bool = False) -> Estimate:
    """Predict one training step's memory: peak, the phase that sets it, and the breakdown by category.

    Args:
        spec: the model architecture (``memprof.hub.resolve_spec``).
        setup: batch size b, sequence length s, dtype/regime, method, optimizer, attention kernel, device.
        explain: also return the named terms (formulas with numbers substituted) in ``Estimate.terms``.
        tracked: predict a run observed by a TorchDispatchMode (memprof's trace, a CPU breakdown step) instead
            of a plain run: autograd then accumulates gradients out of place (one more buffer at those points).

    Returns:
        An ``Estimate`` (kind "analytic") in bytes: steady-state peak by category, per-phase peaks,
        first-step peak, bytes kept between steps, and allocated / reserved / device-total predictions.

    Raises:
        ConfigError: the method does not apply (no targets, BitFit on a bias-free model, ...).
    """
    setup = with_method_defaults(setup)
    check_runnable(setup)
    if spec.family is not Family.llama:
        extra = setup.prompt.num_virtual_tokens if setup.method is Method.prompt and setup.prompt else 0
        check_sequence_length(spec, setup.seq_len + extra)
    pc, sb, tl = _structure(spec, setup, tracked)
    b, s = setup.batch_size, setup.seq_len
    bs, bss = b * s, b * s * s
    inputs = input_bytes(spec, setup)
    base = (sb.params_trainable, sb.params_frozen, 0, sb.optimizer_states, sb.master_weights, 0, 0, 0, inputs)

    def breakdown(sparse: tuple, temporaries: int = 0, gradients: int = 0) -> MemoryBreakdown:
        v = list(base)
        for k, p in sparse:
            v[k] += round(p[0] * bs + p[1] * bss + p[2] * b + p[3] * s + p[4])
        v[2] += gradients
        v[7] += temporaries
        return MemoryBreakdown(*v)

    fwd = breakdown(_best(tl.forward_sparse, tl.forward_totals, b, s))
    bwd = breakdown(_best(tl.backward_sparse, tl.backward_totals, b, s))
    opt = breakdown(tl.end_of_backward_sparse, sb.optimizer_temp + sb.grad_upcast, -sb.grads_freed_at_step)
    phases = ((Phase.forward, fwd), (Phase.backward, bwd), (Phase.optimizer, opt))
    peak_phase, peak = max(phases, key=lambda kv: kv[1].total_bytes)
    first = max(fwd.total_bytes, bwd.total_bytes) - sb.optimizer_states
    first = max(first, opt.total_bytes)
    steady = sb.params_trainable + sb.params_frozen + sb.optimizer_states + sb.master_weights + inputs
    terms = explain_terms(spec, setup, pc, sb, inputs, peak.total_bytes, peak_phase) if explain else ()
    notes: tuple[str, ...] = ()
    refused = refusal_note(spec, setup)
    if refused:
        notes += (refused,)
    # the loss holds an fp32 log-softmax of the b*s*V logits, and its backward two more of that size
    if spec.task is SpecTask.causal_lm and 3 * spec.vocab_size * bs * 4 > 0.25 * peak.total_bytes:
        notes += ("the loss over b*s*V logits (fp32 log-softmax and its gradients) is a large share of the peak; "
                 "a chunked / fused cross-entropy would cut it",)
    return Estimate(
        kind="analytic", spec=spec, setup=setup, total_params=pc.total, trainable_params=pc.trainable,
        peak=peak, peak_phase=peak_phase, phase_peaks=phases, first_step_peak_bytes=first, steady_bytes=steady,
        device=device_totals(peak.total_bytes, setup), terms=terms, notes=notes,
    )


def category_bytes(est: Estimate, category: Category) -> int:
    return est.peak.get(category)
