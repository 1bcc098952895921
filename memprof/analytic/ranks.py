"""One rank's share of a data-parallel step (pure): the strategy's model states and timeline, from the one-device
replay (parallel.py: FSDP2 and DDP, zero.py: DeepSpeed ZeRO), cached per structure as the one-device ones are."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import FSDP_STRATEGIES, ZERO_STRATEGIES, Device, Dtype, Method, Offload, Regime, RunSetup, Strategy
from ..records import Category, Term
from ..spec import ModelSpec
from .compose import Timeline, assemble, replay, structural
from .forward import window_reached
from .modules import tied_head
from .parallel import (ROOT, check_parallel, ddp_bucket_bytes, fsdp_replay, group_bytes, rank_tensors,
                       sharded_states)
from .states import StateBytes
from .zero import zero_replay, zero_states

_SOURCE_FSDP = "torch 2.13 distributed/fsdp/_fully_shard/_fsdp_param_group.py, _fsdp_collectives.py"
_SOURCE_DDP = "torch 2.13 nn/parallel/distributed.py, csrc/distributed/c10d/reducer.cpp (initialize_buckets)"
_SOURCE_ZERO = "deepspeed runtime/zero/stage_1_and_2.py, stage3.py, config.py (defaults)"


@dataclass(frozen=True)
class RankShare:
    states: StateBytes
    timeline: Timeline
    persistent_grads: int     # engine buffers of the gradient category alive the whole step (DDP / ZeRO buckets)
    host_bytes: int | None    # offloaded states in host memory
    terms: tuple[Term, ...]
    notes: tuple[str, ...]


def state_terms(sb: StateBytes, how: str, source: str) -> tuple[Term, ...]:
    """The rank's model states, one term per category (``how``: what each rank holds of them)."""
    rows = ((Category.params_trainable, "trainable weights", sb.params_trainable),
            (Category.params_frozen, "frozen weights", sb.params_frozen),
            (Category.gradients, "gradients (the rank's)", sb.gradients),
            (Category.optimizer_states, "optimizer states", sb.optimizer_states),
            (Category.master_weights, "fp32 master weights", sb.master_weights))
    return tuple(Term(cat, f"{name}, per rank", how, f"{nbytes:,} B", nbytes, source) for cat, name, nbytes in rows
                 if nbytes)


def one_device_setup(setup: RunSetup) -> RunSetup:
    """The step each rank runs, on one device. ZeRO in half precision is DeepSpeed's mixed precision (its bf16 /
    fp16: half weights, fp32 masters and Adam states), unless the flags name ``--regime amp``: DeepSpeed's
    torch_autocast (fp32 weights, the forward under torch.autocast)."""
    one = setup.on_one_device()
    par = setup.parallel
    if par is not None and par.strategy in ZERO_STRATEGIES and setup.dtype is not Dtype.fp32 \
            and setup.regime is not Regime.amp:
        one = dataclasses.replace(one, regime=Regime.mixed)
    return one


_CACHE: dict[tuple, RankShare] = {}


def rank_share(spec: ModelSpec, setup: RunSetup, one_states: StateBytes, tracked: bool) -> RankShare:
    """States, timeline and engine terms of one rank of ``setup.parallel`` (cached per structure)."""
    one = one_device_setup(setup)
    struct = structural(one)
    key = (spec, struct, setup.parallel, tracked, window_reached(spec, one), setup.batch_size == 1)
    hit = _CACHE.get(key)
    if hit is None:
        hit = _share(spec, setup, one, struct, one_states, tracked)
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[key] = hit
    return hit


def _share(spec: ModelSpec, setup: RunSetup, one: RunSetup, struct: RunSetup, one_states: StateBytes,
           tracked: bool) -> RankShare:
    par = setup.parallel
    assert par is not None
    check_parallel(setup)
    tensors = rank_tensors(spec, one)
    if par.strategy is Strategy.zero3 or (par.strategy in ZERO_STRATEGIES and one.regime is Regime.mixed):
        # DeepSpeed's half engine casts peft's adapters too, and ZeRO-3 replaces torch's linear: the replay keeps
        # the parallel part to say so (forward.build_context)
        struct = dataclasses.replace(struct, parallel=par)
    rep = replay(spec, struct, tracked, window_reached(spec, one))
    n = par.shard_group
    what = par.describe()
    notes = [f"per rank of {what}: activations are one device's (each rank runs its own micro-batch of "
             f"{setup.batch_size})"]
    if par.strategy in FSDP_STRATEGIES:
        mixed = one.effective_regime is Regime.mixed
        if mixed:
            # FSDP2's mixed precision: fp32 shards (they are the masters), a MixedPrecisionPolicy gathering in the
            # half dtype and reducing gradients in fp32 (torchtitan's default, mixed_precision_reduce="float32")
            tensors = rank_tensors(spec, dataclasses.replace(one, dtype=Dtype.fp32, regime=None))
            sb = dataclasses.replace(sharded_states(spec, one, one_states, tensors, n), master_weights=0,
                                     grad_upcast=0, grads_freed_at_step=0)
            notes.append("FSDP mixed precision: fp32 shards, MixedPrecisionPolicy(param_dtype="
                         f"{setup.dtype.value}, reduce_dtype=fp32)")
        else:
            sb = sharded_states(spec, one, one_states, tensors, n)
        half = 2 if mixed else None
        tl = assemble(fsdp_replay(rep, tensors, par, gloo=one.device is Device.cpu, param_bytes=half,
                                  reduce_bytes=4 if mixed else None), spec.num_layers)
        host = None
        if par.offload is Offload.params:
            host = sb.params_trainable + sb.params_frozen + sb.gradients + sb.optimizer_states
            sb = dataclasses.replace(sb, params_trainable=0, params_frozen=0, gradients=0, optimizer_states=0,
                                     optimizer_temp=0)
        blk, root = group_bytes(tensors, 0, n, half, 4 if mixed else None), group_bytes(tensors, ROOT, n, half)
        kept = "until the block's backward" if par.strategy is Strategy.fsdp_grad_op else "for the block's forward"
        terms = state_terms(sb, f"dim-0 shard of each tensor: ceil(rows / {n}) rows (padded)", _SOURCE_FSDP) + (
            Term(Category.weight_copies, "unsharded block (FSDP all-gather copy-out)",
                 f"block params padded to a multiple of {n} rows", f"{blk.unsharded:,} B, kept {kept}",
                 blk.unsharded, _SOURCE_FSDP),
            Term(Category.temporaries, "all-gather output buffer (kept to the next block's copy-out in forward; "
                 "the next block's prefetch in backward)", "= unsharded block", f"{blk.unsharded:,} B",
                 blk.unsharded, _SOURCE_FSDP),
            Term(Category.weight_copies, "unsharded root (embeddings, final norm, head: not resharded after "
                 "forward)", "root params padded", f"{root.unsharded:,} B", root.unsharded, _SOURCE_FSDP),
            Term(Category.temporaries, "reduce-scatter input (kept to the next group's post-backward)",
                 "block trainable grads padded", f"{blk.reduce_input:,} B", blk.reduce_input, _SOURCE_FSDP),
        )
        return RankShare(sb, tl, 0, host, terms, tuple(notes))
    if par.strategy is Strategy.ddp:
        buckets = ddp_bucket_bytes(tensors)
        terms = state_terms(one_states, "replicated on every rank", _SOURCE_DDP) + (Term(Category.gradients, "DDP gradient buckets (gradient_as_bucket_view=False)",
                      "one flat copy of the trainable gradients", f"{buckets:,} B", buckets, _SOURCE_DDP),)
        return RankShare(one_states, assemble(rep, spec.num_layers), buckets, None, terms, tuple(notes))
    sb, plan = zero_states(setup, one_states, tensors, tied=tied_head(spec))
    tl = assemble(zero_replay(rep, setup, plan), spec.num_layers)
    notes.append("ZeRO is modelled from DeepSpeed 0.19's source (the worst rank at each moment), checked against "
                 "its engine on 2 to 8 gloo ranks, not traced (DeepSpeed cannot run on fake tensors)"
                 + ("; bf16/fp16 runs use DeepSpeed's mixed precision (fp32 masters)"
                    if one.regime is Regime.mixed else "")
                 + ("; --regime amp is DeepSpeed's torch_autocast (fp32 weights; nn.Linear gradients reduced in "
                    f"{setup.dtype.value})" if one.regime is Regime.amp else ""))
    stage3 = par.strategy is Strategy.zero3
    if stage3 and setup.method is not Method.full and par.zero_efficient_linear is not False:
        notes[0] = (f"per rank of {what}: activations are one device's (each rank runs its own micro-batch of "
                    f"{setup.batch_size}) and the inputs of the frozen projections: ZeRO-3 runs torch's linear as "
                    "DeepSpeed's LinearFunctionForZeroStage3, which keeps each projection's input for the backward")
    terms = state_terms(sb, f"partitions of 1/{par.world_size}" + ("" if stage3 else " (weights whole below stage 3)"),
                        _SOURCE_ZERO) + (
        Term(Category.gradients, "contiguous gradient bucket (reduce_bucket_size elements; " +
             ("kept from the start)" if stage3 else "during the backward)"),
             ("bucket elements x model dtype bytes" if len(plan.bucket_dtypes) < 2 else
              f"bucket elements x ({' + '.join(map(str, plan.bucket_dtypes))}) B: one bucket per communication "
              "dtype (torch_autocast: nn.Linear gradients in the half dtype, the others in fp32)")
             + (" x 2 (overlap_comm's double buffer)" if par.zero_overlap and not stage3 else ""),
             f"{plan.bucket:,} B", plan.bucket, _SOURCE_ZERO),
        Term(Category.temporaries, "the step: the partition's gradients flattened and cast to fp32 (or the "
             "gradient norm's fp64 copy of one slice), above the end of the backward",
             "partition x (4 + half) B, or 8 B x largest slice", f"{sb.grad_upcast:,} B", sb.grad_upcast,
             _SOURCE_ZERO),
    ) + ((Term(Category.weight_copies, "gathered parameters kept to their backward (max reuse distance)",
               f"{plan.kept_blocks} blocks x {plan.block_bytes:,} B", f"{plan.gathered_kept:,} B",
               plan.gathered_kept, _SOURCE_ZERO),
          Term(Category.temporaries, "a block's fetch: the flat all-gather buffer (and the prefetch)",
               "block + min(block, prefetch bucket)", f"{plan.gather_temp:,} B", plan.gather_temp,
               _SOURCE_ZERO)) if stage3 else ())
    return RankShare(sb, tl, plan.persistent, plan.host or None, terms, tuple(notes))
