"""The analytic estimator: ModelSpec + RunSetup -> Estimate, in pure Python (no torch import).

Known limitations (what the estimate does not capture; see also estimate/overheads.py):
- allocator behaviour beyond a flat reserve fraction: fragmentation depends on the allocation history;
- kernel workspaces other than cuBLAS's (cuDNN, flash-attention split buffers) and exact kernel temporaries
  inside backward (modelled for attention, approximated elsewhere);
- padding masks (synthetic batches have none), KV caches (training only), gradient accumulation across
  micro-batches (one micro-batch is modelled), data-parallel buckets and communication buffers;
- the scripts mirror transformers 5.x / peft 0.21 modeling code (blocks.py); other versions may differ,
  and ``--trace`` runs the real code.
"""

from __future__ import annotations

import dataclasses

from ..config import Overheads, RunSetup, with_method_defaults
from ..records import Category, Estimate, MemoryBreakdown, Phase
from ..spec import ModelSpec
from ..spec import Task as SpecTask
from .compose import FATES, Vec, timeline, vtotal
from .explain import explain_terms
from .overheads import device_totals
from .params import method_params
from .sim import peval
from .states import state_bytes

__all__ = ["estimate"]


def _structural(setup: RunSetup) -> RunSetup:
    """The part of a setup that changes the replay (cache key): everything but b, s and the overheads."""
    return dataclasses.replace(setup, batch_size=1, seq_len=1, overheads=_DEFAULT_OVERHEADS)


_DEFAULT_OVERHEADS = Overheads()


def input_bytes(spec: ModelSpec, setup: RunSetup) -> int:
    """The batch: int64 token ids (b*s); seq-cls labels (b); causal-LM labels are the ids themselves."""
    b, s = setup.batch_size, setup.seq_len
    return 8 * b * s + (8 * b if spec.task is SpecTask.seq_cls else 0)


def _eval(vec: Vec, b: int, s: int) -> list[int]:
    return [round(peval(p, b, s)) for p in vec]


def _best(cands: tuple[Vec, ...], b: int, s: int) -> Vec:
    best, best_total = cands[0], None
    for c in cands:
        t = peval(vtotal(c), b, s)
        if best_total is None or t > best_total:
            best, best_total = c, t
    return best


def estimate(spec: ModelSpec, setup: RunSetup, explain: bool = False) -> Estimate:
    """Predict one training step's memory: peak, the phase that sets it, and the breakdown by category.

    Args:
        spec: the model architecture (``memprof.hub.resolve_spec``).
        setup: batch size b, sequence length s, dtype/regime, method, optimizer, attention kernel, device.
        explain: also return the named terms (formulas with numbers substituted) in ``Estimate.terms``.

    Returns:
        An ``Estimate`` (kind "analytic") in bytes: steady-state peak by category, per-phase peaks,
        first-step peak, bytes kept between steps, and allocated / reserved / device-total predictions.

    Raises:
        ConfigError: the method does not apply (no targets, BitFit on a bias-free model, ...).
    """
    setup = with_method_defaults(setup)
    pc = method_params(spec, setup)
    sb = state_bytes(spec, setup)
    tl = timeline(spec, _structural(setup))
    b, s = setup.batch_size, setup.seq_len
    inputs = input_bytes(spec, setup)
    base = {"params_trainable": sb.params_trainable, "params_frozen": sb.params_frozen,
            "optimizer_states": sb.optimizer_states, "master_weights": sb.master_weights, "inputs": inputs}

    def breakdown(vec: Vec, extra: dict[str, int], states: bool = True) -> MemoryBreakdown:
        values = dict(zip(FATES, _eval(vec, b, s)))
        for key, val in base.items():
            if key == "optimizer_states" and not states:
                continue
            values[key] += val
        for key, val in extra.items():
            values[key] += val
        return MemoryBreakdown.from_dict(values)

    fwd = breakdown(_best(tl.forward, b, s), {})
    bwd = breakdown(_best(tl.backward, b, s), {})
    opt_extra = {"temporaries": sb.optimizer_temp + sb.grad_upcast, "gradients": -sb.grads_freed_at_step}
    opt = breakdown(tl.end_of_backward, opt_extra)
    phases = ((Phase.forward, fwd), (Phase.backward, bwd), (Phase.optimizer, opt))
    peak_phase, peak = max(phases, key=lambda kv: kv[1].total_bytes)
    first = max(breakdown(_best(tl.forward, b, s), {}, states=False).total_bytes,
                breakdown(_best(tl.backward, b, s), {}, states=False).total_bytes,
                opt.total_bytes)
    steady = sb.params_trainable + sb.params_frozen + sb.optimizer_states + sb.master_weights + inputs
    terms = explain_terms(spec, setup, pc, sb, inputs, peak.total_bytes, peak_phase) if explain else ()
    notes = []
    if spec.task is SpecTask.causal_lm and spec.vocab_size * s * b * 4 > 0.25 * peak.total_bytes:
        notes.append("the fp32 logits (b*s*V) are a large share of the peak; chunked cross-entropy would cut it")
    return Estimate(
        kind="analytic", spec=spec, setup=setup, total_params=pc.total, trainable_params=pc.trainable,
        peak=peak, peak_phase=peak_phase, phase_peaks=phases, first_step_peak_bytes=first, steady_bytes=steady,
        device=device_totals(peak.total_bytes, setup), terms=terms, notes=tuple(notes),
    )


def category_bytes(est: Estimate, category: Category) -> int:
    return est.peak.get(category)
