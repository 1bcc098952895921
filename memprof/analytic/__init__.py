"""The analytic estimator: ModelSpec + RunSetup -> Estimate, in pure Python (no torch import).

Known limitations (what the estimate does not capture; see also analytic/overheads.py):
- allocator behaviour beyond a flat reserve fraction: fragmentation depends on the allocation history;
- kernel workspaces other than cuBLAS's (cuDNN, flash-attention split buffers) and exact kernel temporaries
  inside backward (modelled for attention, approximated elsewhere);
- data parallelism (ranks.py): torch FSDP2's and DDP's buffers are modelled from their sources and checked against
  traces and real gloo ranks; DeepSpeed ZeRO's from its source only; NCCL's own buffers, CUDA stream reuse across
  FSDP2's collective streams and gradient accumulation under data parallelism are not modelled;
- the scripts mirror transformers 5.x / peft 0.21 modeling code (forward.py, families/*.py, each naming its upstream file); other versions may differ,
  and ``--trace`` runs the real code.
"""

from __future__ import annotations

import dataclasses

from ..compat import lora_target_note, refusal_note, resolve_attention
from ..config import RunSetup, check_runnable, with_method_defaults
from ..records import Category, Estimate, MemoryBreakdown, Phase
from ..spec import ModelSpec
from ..errors import UnsupportedModelError
from ..spec import ANALYTIC_TASKS, Family, Task as SpecTask, check_sequence_length
from ..config import Loop, Regime, ZeroGrad
from .compose import FATES, Timeline, structural, timeline
from .explain import explain_terms
from .forward import window_reached
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
           tracked, setup.batch_size == 1, setup.effective_optimizer_impl, setup.grads_kept, setup.zero_grad,
           setup.padded, setup.keep_outputs, setup.builds_cache, window_reached(spec, setup))
    hit = _STRUCTURES.get(key)
    if hit is None:
        struct = structural(setup)
        hit = (method_params(spec, struct), state_bytes(spec, struct),
               timeline(spec, struct, tracked, window_reached(spec, setup)))
        if len(_STRUCTURES) > 4096:
            _STRUCTURES.clear()
        _STRUCTURES[key] = hit
    return hit


def input_bytes(spec: ModelSpec, setup: RunSetup) -> int:
    """The batch: int64 token ids (b*s); seq-cls labels (b); causal-LM labels are the ids themselves, or with
    padding their own tensor (pads set to -100); a padded batch also has its int64 attention mask (b*s). The
    Trainer fetches all K micro-batches of a step before the first (Trainer.get_batch_samples): K batches."""
    b, s = setup.batch_size, setup.seq_len
    labels = 8 * b if spec.task is SpecTask.seq_cls else (8 * b * s if setup.padded else 0)
    batches = setup.grad_accum if setup.loop is Loop.trainer else 1
    return batches * (8 * b * s + labels + (8 * b * s if setup.padded else 0))


def _best(cands: tuple, totals: tuple, b: int, s: int):  # noqa: ANN202
    bs, bss, ss = b * s, b * s * s, s * s
    best_i, best_v = 0, None
    for i, p in enumerate(totals):
        v = p[0] * bs + p[1] * bss + p[2] * b + p[3] * s + p[4] + p[5] * ss
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
    if spec.family is Family.other or spec.task not in ANALYTIC_TASKS:
        raise UnsupportedModelError(f"{spec.name}: the analytic model does not describe {spec.model_type} with a "
                                    f"{spec.task.value} head; use memprof trace (or estimate --trace)")
    setup = with_method_defaults(setup)
    check_runnable(setup)
    setup, attention_note = resolve_attention(spec, setup)
    if spec.family is not Family.llama:
        check_sequence_length(spec, setup.seq_len + setup.prepended_tokens)
    share = None
    if setup.parallel is not None:  # one rank of a data-parallel run: the one-device step, states per strategy
        from .ranks import one_device_setup, rank_share

        one = one_device_setup(setup)
        pc, sb, tl = _structure(spec, one, tracked)
        share = rank_share(spec, setup, sb, tracked)
        sb, tl = share.states, share.timeline
    else:
        pc, sb, tl = _structure(spec, setup, tracked)
    persistent = share.persistent_grads if share is not None else 0
    b, s = setup.batch_size, setup.seq_len
    bs, bss = b * s, b * s * s
    inputs = input_bytes(spec, setup)
    # gradients a backward finds already there: all of them after the first micro-batch (grad_accum > 1), or
    # kept between steps (zero_grad=zeros); each new one is added in place (sim.Graph.grads_kept); and the engine's
    # gradient buffers of a data-parallel rank (DDP buckets, ZeRO's contiguous bucket)
    held_grads = (sb.gradients if setup.grads_kept else 0) + persistent
    base = (sb.params_trainable, sb.params_frozen, held_grads, sb.optimizer_states, sb.master_weights, 0, 0, 0,
            inputs)

    def value(p: tuple) -> int:
        return round(p[0] * bs + p[1] * bss + p[2] * b + p[3] * s + p[4] + p[5] * s * s)

    def breakdown(sparse: tuple, temporaries: int = 0, gradients: int = 0, activations: int = 0) -> MemoryBreakdown:
        v = list(base)
        for k, p in sparse:
            v[k] += value(p)
        v[2] += gradients
        v[6] += activations
        v[7] += temporaries
        return MemoryBreakdown(*v)

    # a loop that keeps the model output (keep_outputs) holds the previous step's through this step's forward:
    # the same tensors as this step's, alive after its backward (all that is, besides gradients)
    kept = sum(value(p) for k, p in tl.end_of_backward_sparse if FATES[k] != "gradients")
    fwd = breakdown(_best(tl.forward_sparse, tl.forward_totals, b, s), activations=kept)
    bwd = breakdown(_best(tl.backward_sparse, tl.backward_totals, b, s))
    opt = breakdown(tl.end_of_backward_sparse, sb.optimizer_temp + sb.grad_upcast, -sb.grads_freed_at_step)
    phases = ((Phase.forward, fwd), (Phase.backward, bwd), (Phase.optimizer, opt))
    peak_phase, peak = max(phases, key=lambda kv: kv[1].total_bytes)
    first = max(fwd.total_bytes, bwd.total_bytes) - sb.optimizer_states
    first = max(first, opt.total_bytes)
    steady = sb.params_trainable + sb.params_frozen + sb.optimizer_states + sb.master_weights + inputs + kept \
        + persistent
    # right after optimizer.step() every gradient is still there (the mixed regime's step has dropped them)
    # (a data-parallel rank keeps its gradient shards or partition: FSDP's fp32 shards are the masters, ZeRO keeps
    # its partition until zero_grad)
    dropped = setup.effective_regime is Regime.mixed and (share is None or sb.grads_freed_at_step > 0)
    after_step = steady + (0 if dropped else sb.gradients)
    if setup.zero_grad is ZeroGrad.zeros and setup.effective_regime is not Regime.mixed:
        steady += sb.gradients  # zeroed in place, not freed
    terms = explain_terms(spec, setup, pc, sb, inputs, peak.total_bytes, peak_phase, kept) if explain else ()
    notes: tuple[str, ...] = (attention_note,) if attention_note else ()
    if share is not None:  # the one-device state terms give way to the rank's (ranks.state_terms)
        states = {Category.params_trainable, Category.params_frozen, Category.gradients, Category.optimizer_states,
                  Category.master_weights}
        terms = tuple(t for t in terms if t.category not in states) + share.terms if explain else ()
        notes += share.notes
    refused = refusal_note(spec, setup)
    if refused:
        notes += (refused,)
    chosen = lora_target_note(spec, setup)  # the LoRA targets memprof picks where peft has no usable default
    if chosen:
        notes += (chosen,)
    # the loss holds an fp32 log-softmax of the b*s*V logits, and its backward two more of that size
    if spec.task is SpecTask.causal_lm and 3 * spec.vocab_size * bs * 4 > 0.25 * peak.total_bytes:
        notes += ("the loss over b*s*V logits (fp32 log-softmax and its gradients) is a large share of the peak; "
                 "a chunked / fused cross-entropy would cut it",)
    return Estimate(
        kind="analytic", spec=spec, setup=setup, total_params=pc.total, trainable_params=pc.trainable,
        peak=peak, peak_phase=peak_phase, phase_peaks=phases, first_step_peak_bytes=first, steady_bytes=steady,
        after_step_bytes=after_step,
        device=device_totals(peak.total_bytes, setup), terms=terms, notes=notes,
        host_bytes=share.host_bytes if share is not None else None,
    )


def category_bytes(est: Estimate, category: Category) -> int:
    return est.peak.get(category)
