"""The named terms behind an analytic estimate, with formulas and substituted numbers (pure).

Model states follow the precision regimes of the README (Rajbhandari et al. 2020, Sec. 3.1); activations are the tensors autograd keeps at the
end of the forward (PyTorch tools/autograd/derivatives.yaml save rules; the layer structure of Korthikanti
et al. 2022, arXiv:2205.05198, Sec. 4.1, generalised to each family's actual ops); overheads are in
overheads.py.
"""

from __future__ import annotations

from collections import OrderedDict

from ..config import ZERO_STRATEGIES, Method, Optimizer, Regime, RunSetup
from ..records import Category, Phase, Term
from ..spec import ModelSpec
from ..units import fmt_bytes_auto
from .compose import replay, structural
from .forward import window_reached
from .overheads import allocator_reserve_bytes, cublas_workspace_bytes, cuda_context_bytes
from .params import ParamCounts
from .sim import BYTES, peval
from .states import StateBytes, weight_bytes

_STATE_SOURCE = "README, Precision regimes; Rajbhandari et al. 2020 (ZeRO, arXiv:1910.02054) Sec. 3.1"
_ACT_SOURCE = "autograd save rules (derivatives.yaml), layer structure as in Korthikanti et al. 2022 Sec. 4.1"
_OPT_STATES = {
    Optimizer.adamw: ("2 x P_t x B_state", "exp_avg + exp_avg_sq (Loshchilov & Hutter 2019)"),
    Optimizer.adamw_8bit: ("2 x P_t x 1 B + absmax", "blockwise 8-bit states (Dettmers et al. 2022, arXiv:2110.02861)"),
    Optimizer.sgd: ("0", "plain SGD keeps no state"),
    Optimizer.sgd_momentum: ("P_t x B_state", "one momentum buffer"),
    Optimizer.adafactor: ("sum(rows + cols) x B_state", "factored second moment (Shazeer & Stern 2018)"),
    Optimizer.lion: ("P_t x B_state", "one momentum (Chen et al. 2023, arXiv:2302.06675)"),
}


def _poly_formula(poly: tuple, dtype: str, b: int, s: int) -> tuple[str, str]:
    """('b*s x 2048 x 2 B', '4*512 x 2048 x 2 B') for a byte polynomial of one tensor."""
    nb = BYTES.get(dtype, 1) or 1
    names = (("b*s", b * s, f"{b}*{s}"), ("b*s^2", b * s * s, f"{b}*{s}^2"), ("b", b, f"{b}"), ("s", s, f"{s}"),
             ("1", 1, "1"), ("s^2", s * s, f"{s}^2"))
    parts, subs = [], []
    for (name, _value, sub), coef in zip(names, poly):
        if not coef:
            continue
        elems = coef / nb
        elems_txt = f"{elems:g}"
        parts.append(f"{name} x {elems_txt}" if name != "1" else elems_txt)
        subs.append(f"{sub} x {elems_txt}" if name != "1" else elems_txt)
    unit = f" x {nb:g} B ({dtype})" if dtype else " B"
    return " + ".join(parts) + unit, " + ".join(subs) + unit


def _block_list(blocks: list[int]) -> str:
    """[0, 2, 4] -> '0, 2, 4'; long lists shortened ('0, 2, ..., 24')."""
    names = [str(i) for i in blocks]
    return ", ".join(names if len(names) <= 4 else [*names[:2], "...", names[-1]])


def _activation_terms(spec: ModelSpec, setup: RunSetup) -> list[Term]:
    rep = replay(spec, structural(setup), window_reached=window_reached(spec, setup))
    b, s, L = setup.batch_size, setup.seq_len, spec.num_layers
    groups: "OrderedDict[str, list[tuple[str, str, tuple]]]" = OrderedDict()
    for seg, label, dtype, poly in rep.saved_terms:
        groups.setdefault(seg, []).append((label, dtype, poly))
    def labels(seg: str) -> list[tuple[str, str]]:
        return [(lbl, dt) for lbl, dt, _ in groups.get(seg, [])]

    scopes = []
    if "embed" in groups:
        scopes.append(("embeddings", "embed", 1, ""))
    if rep.layers == 1:
        scopes.append(("the block", "layer0", 1, ""))
    elif rep.layers == 2:
        scopes += [("first block", "layer0", 1, ""), ("last block", "layer1", 1, "")]
    elif rep.layers > 3:  # a full-depth replay (mixed layer types): blocks grouped by what they keep
        kinds: "OrderedDict[tuple, list[int]]" = OrderedDict()
        for i in range(rep.layers):
            kinds.setdefault(tuple(groups.get(f"layer{i}", [])), []).append(i)
        for same in kinds.values():
            scopes.append((f"blocks {_block_list(same)} (x{len(same)})" if len(same) > 1 else f"block {same[0]}",
                           f"layer{same[0]}", len(same),
                           str(len(same)) if len(same) > 1 else ""))
    elif labels("layer0") == labels("layer1") == labels("layer2"):
        scopes.append((f"each block (x{L})", "layer1", L, "L"))
    else:
        # the first block's input may need no gradient; the last block's output feeds the head, not a block
        scopes += [("first block", "layer0", 1, ""), (f"each middle block (x{L - 2})", "layer1", L - 2, "(L-2)"),
                   ("last block", "layer2", 1, "")]
    scopes.append(("head and loss", "head", 1, ""))
    terms = []
    for scope, seg, mult, symbol in scopes:
        for label, dtype, poly in groups.get(seg, []):
            one = peval(poly, b, s)
            formula, sub = _poly_formula(poly, dtype, b, s)
            if symbol:
                formula, sub = f"{symbol} x ({formula})", f"{mult} x ({sub})"
            category = Category.activations
            if label.startswith("[weight copy] "):
                category, label = Category.weight_copies, label.removeprefix("[weight copy] ")
            terms.append(Term(category, f"{scope}: {label}", formula, sub, round(one * mult), _ACT_SOURCE))
    return terms


def _state_formula(formula: str, state_b: int, adapters: bool) -> str:
    """The optimizer-state formula with its byte sizes: P_t split into the base's trainable parameters (states in
    their dtype) and a method's fp32 tensors (fp32 states)."""
    if not adapters or state_b == 4:
        return formula.replace("B_state", f"{state_b} B")
    return formula.replace("P_t x B_state", f"(P_base x {state_b} B + P_adapter x 4 B)").replace(
        "B_state", f"{state_b} B")


def _state_substituted(setup: RunSetup, base_t: int, adapter: int, state_b: int, spec: ModelSpec) -> str:
    """The numbers in the formula (P_base, P_adapter; AdamW's per-tensor step counters where they are on the
    device)."""
    from .states import step_counter_bytes

    k = {Optimizer.adamw: "2 x ", Optimizer.sgd_momentum: "", Optimizer.lion: ""}.get(setup.optimizer, "")
    parts = f"{base_t:,} x {state_b} B" + (f" + {adapter:,} x 4 B" if adapter else "")
    text = f"{k}({parts})" if k or adapter else parts
    steps = step_counter_bytes(spec, setup)
    return text + (f" + {steps // 4:,} step counters x 4 B" if steps else "")


def explain_terms(spec: ModelSpec, setup: RunSetup, pc: ParamCounts, sb: StateBytes, inputs: int,
                  peak_tensor_bytes: int, phase: Phase, kept_outputs_bytes: int = 0) -> tuple[Term, ...]:
    """Every named piece of the estimate: model states, activations kept for backward, overheads."""
    regime = setup.effective_regime
    wb = weight_bytes(setup)
    dt = setup.dtype.value if wb == 2 else "fp32"
    adapter = pc.adapter_fp32
    base_t = pc.trainable - adapter
    terms: list[Term] = []
    t_formula = f"P_t x {wb} B ({dt})" + (" + P_adapter x 4 B (fp32)" if adapter else "")
    t_sub = f"{base_t:,} x {wb} B" + (f" + {adapter:,} x 4 B" if adapter else "")
    terms.append(Term(Category.params_trainable, "trainable weights", t_formula, t_sub, sb.params_trainable,
                      _STATE_SOURCE))
    if setup.method is Method.qlora:
        other = pc.frozen - pc.quantized
        terms.append(Term(Category.params_frozen, "frozen weights (4-bit base + others)",
                          f"P_q x 0.5 B + absmax + P_other x {wb} B",
                          f"{pc.quantized:,} x 0.5 B + constants + {other:,} x {wb} B", sb.params_frozen,
                          "Dettmers et al. 2023 (QLoRA) Sec. 2: NF4 + double quantization"))
    elif pc.buffers_fp32:
        terms.append(Term(Category.params_frozen, "frozen weights + VeRA's shared projections (fp32 buffers)",
                          f"P_f x {wb} B ({dt}) + r x (max d_in + max d_out) x 4 B",
                          f"{pc.frozen:,} x {wb} B + {pc.buffers_fp32:,} x 4 B", sb.params_frozen,
                          "peft 0.21 vera/model.py _init_vera_A_vera_B: one vera_A, vera_B shared by every target"))
    else:
        terms.append(Term(Category.params_frozen, "frozen weights", f"P_f x {wb} B ({dt})",
                          f"{pc.frozen:,} x {wb} B", sb.params_frozen, _STATE_SOURCE))
    terms.append(Term(Category.gradients, "gradients (one per trainable weight, its dtype)", t_formula, t_sub,
                      sb.gradients, _STATE_SOURCE))
    if setup.grads_kept:
        why = (f"micro-batches 2..{setup.grad_accum} of each step find them all (grad accumulation)"
               if setup.grad_accum > 1 else "zero_grad(set_to_none=False) keeps them between steps")
        terms.append(Term(Category.gradients, "gradients alive through forward and backward", t_formula, why,
                          sb.gradients, "torch accumulate_grad.h: .grad += new, in place"))
    formula, source = _OPT_STATES[setup.optimizer]
    state_b = 4 if regime in (Regime.mixed,) or wb == 4 else wb
    terms.append(Term(Category.optimizer_states, f"optimizer states ({setup.optimizer.value})",
                      _state_formula(formula, state_b, bool(adapter)), _state_substituted(setup, base_t, adapter,
                                                                                           state_b, spec),
                      sb.optimizer_states, source))
    if sb.master_weights:
        terms.append(Term(Category.master_weights, "fp32 master weights", "P_t x 4 B", f"{base_t:,} x 4 B",
                          sb.master_weights, _STATE_SOURCE))
    per = "8 x b x s" + (" x 3 (ids, attention mask, labels)" if setup.padded and spec.task.value == "causal-lm"
                         else " x 2 (ids, attention mask) + 8 x b labels" if setup.padded
                         else " + 8 x b labels" if spec.task.value == "seq-cls" else "")
    batches = setup.grad_accum if setup.loop.value == "trainer" else 1
    terms.append(Term(Category.inputs, "batch (int64 token ids, labels" + (", attention mask)" if setup.padded else ")")
                      + (f" x {batches} micro-batches fetched at once (Trainer.get_batch_samples)" if batches > 1
                         else ""), (f"{batches} x ({per})" if batches > 1 else per),
                      f"b={setup.batch_size}, s={setup.seq_len}", inputs, "the batch the loop holds"))
    acts = _activation_terms(spec, setup)  # weight copies first, then activations, as the report groups them
    terms += [t for t in acts if t.category is Category.weight_copies]
    terms += [t for t in acts if t.category is Category.activations]
    impl = setup.effective_optimizer_impl.value
    if sb.optimizer_temp:
        how = ("foreach: one temporary per (device, dtype) group, _foreach_sqrt(exp_avg_sq)" if impl == "foreach"
               else "for-loop: per tensor, exp_avg_sq.sqrt() / bias_correction (largest tensors, x2)")
        terms.append(Term(Category.temporaries, "optimizer.step() temporaries", how, fmt_bytes_auto(sb.optimizer_temp),
                          sb.optimizer_temp, "torch.optim.adamw _multi_tensor_adamw / _single_tensor_adamw"))
    elif impl == "fused" and setup.optimizer is Optimizer.adamw:
        terms.append(Term(Category.temporaries, "optimizer.step() temporaries", "fused kernel: updates in place",
                          "0 B", 0, "torch.optim.adamw _fused_adamw (torch._fused_adamw_)"))
    if setup.keep_outputs:
        terms.append(Term(Category.activations, "the previous step's model output (logits, cache), held by the loop",
                          "as this step's output", "until this step's forward returns", kept_outputs_bytes,
                          "a loop that binds outputs = model(**batch); counted in the forward phase"))
    # a ZeRO rank's step casts its partition, sub-group by sub-group: ranks.py lists that term instead
    zero_rank = setup.parallel is not None and setup.parallel.strategy in ZERO_STRATEGIES
    if sb.grad_upcast and not zero_rank:
        terms.append(Term(Category.temporaries, "fp32 copies of the gradients at the step (mixed regime)",
                          "P_t x 4 B", f"{base_t:,} x 4 B", sb.grad_upcast, "memprof MasterWeightOptimizer"))
    ws = cublas_workspace_bytes(setup)
    if ws:
        terms.append(Term(Category.overhead, "cuBLAS workspace", "per handle, kept after the first matmul",
                          fmt_bytes_auto(ws), ws, "CUBLAS_WORKSPACE_CONFIG default"))
        reserve = allocator_reserve_bytes(peak_tensor_bytes + ws, setup)
        terms.append(Term(Category.overhead, "caching-allocator reserve", "frac x allocated peak",
                          f"{setup.overheads.allocator_reserve_frac:g} x {fmt_bytes_auto(peak_tensor_bytes + ws)}",
                          reserve, "max_memory_reserved - max_memory_allocated, typical"))
        ctx = cuda_context_bytes(setup)
        terms.append(Term(Category.overhead, "CUDA context", "driver + kernels + library handles",
                          fmt_bytes_auto(ctx), ctx, "outside the allocator; 0.3-1.4 GiB by GPU/driver"))
    return tuple(terms)
