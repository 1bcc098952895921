"""DeepSpeed ZeRO stages 1-3 per rank (pure), modelled from DeepSpeed's source with its default config.

DeepSpeed is not traced (its engine cannot run on fake tensors) and not measured here (no GPU, and its CPU path
needs oneCCL): this is the one part of memprof's data-parallel answer that rests on reading the engine alone.
Sources (deepspeed master, ``deepspeed/runtime/zero/``):

- ``config.py`` DeepSpeedZeroConfig: reduce_bucket_size 5e8 elements, contiguous_gradients True, overlap_comm
  True for stage 3 only, stage3_param_persistence_threshold 1e5, stage3_prefetch_bucket_size 5e7,
  stage3_max_live_parameters 1e9.
- ``stage_1_and_2.py`` DeepSpeedZeroOptimizer: the half weights are flattened and kept whole on every rank; each
  rank holds an fp32 copy of its partition (``single_partition_of_fp32_groups``) and the optimizer's states for
  it; ``backward`` allocates the contiguous bucket ``ipg_buffer`` (reduce_bucket_size elements of the half dtype,
  two with overlap_comm) before each backward; stage 2 copies each gradient into it as it is produced and keeps
  the rank's partition (``grads_in_partition``); stage 1 reduces after the backward, from the full gradients.
  ``step`` makes the fp32 gradient of the partition. Parameters outside the optimizer (frozen) are not
  partitioned.
- ``stage3.py`` DeepSpeedZeroOptimizer_Stage3: parameters are partitioned too (frozen ones included: zero.Init
  partitions every module parameter), except those under the persistence threshold; a flat gradient partition
  buffer and the contiguous bucket exist from the start; parameters are gathered module by module before use.
  memprof counts one block gathered plus the prefetch of the next, up to stage3_prefetch_bucket_size elements.
- Mixed precision: DeepSpeed's bf16 / fp16 (the ``mixed`` regime: half weights and gradients, fp32 masters and
  Adam states). Offloading the optimizer moves the masters, the states and the fp32 gradients to the host.
"""

from __future__ import annotations

import dataclasses

from ..config import Offload, RunSetup, Strategy
from .compose import Replay
from .parallel import GRADS, ROOT, WCOPY, RankTensor, _with_events
from .states import StateBytes

REDUCE_BUCKET = 500_000_000      # reduce_bucket_size (elements)
PREFETCH_BUCKET = 50_000_000     # stage3_prefetch_bucket_size (elements)
PERSISTENCE = 100_000            # stage3_param_persistence_threshold (elements)


@dataclasses.dataclass(frozen=True)
class ZeroPlan:
    """What a ZeRO rank holds beyond the one-device step (bytes)."""

    bucket: int            # the contiguous gradient bucket(s)
    grad_partition: int    # the rank's half-precision gradient partition
    gathered_block: int    # stage 3: one block's gathered parameters plus the prefetched next
    gathered_root: int     # stage 3: the embeddings / head gathered for their own segments
    host: int              # offloaded states in host memory, per rank


def _half(setup: RunSetup) -> int:
    return 2 if setup.dtype.value in ("bf16", "fp16") else 4


def zero_states(setup: RunSetup, one: StateBytes, tensors: tuple[RankTensor, ...]) -> tuple[StateBytes, ZeroPlan]:
    """Per-rank model states and engine buffers of ``setup.parallel.strategy`` (a ZeRO stage) from the one-device
    states of the same run in DeepSpeed's precision (``mixed`` for a half dtype)."""
    par = setup.parallel
    assert par is not None
    n, h = par.world_size, _half(setup)
    stage = {Strategy.zero1: 1, Strategy.zero2: 2, Strategy.zero3: 3}[par.strategy]
    train = [t for t in tensors if t.trainable]
    p_t = sum(t.numel for t in train)

    def split(t: RankTensor) -> bool:  # stage 3 partitions all but the small parameters (persistence threshold)
        return stage == 3 and t.numel >= PERSISTENCE

    partitioned = [t for t in tensors if split(t)]
    whole = [t for t in tensors if not split(t)]

    def stored(t: RankTensor) -> float:  # bytes per element: half, or QLoRA's 4-bit weights, which stay packed
        return t.elem_bytes if t.elem_bytes < 1 else h

    def on_rank(ts: list[RankTensor], trainable: bool) -> int:
        return round(sum((-(-t.numel // n) if split(t) else t.numel) * stored(t) for t in ts
                         if t.trainable == trainable))

    masters = 4 * -(-p_t // n)                   # fp32 partition (also in fp32 runs: a separate copy)
    states = -(-(one.optimizer_states) // n)      # fp32 Adam states of the partition
    grad_fp32 = 4 * -(-p_t // n)                 # made at step()
    offload_opt = par.offload is not Offload.none
    offload_params = par.offload is Offload.params
    grad_partition = h * -(-p_t // n)
    # one bucket: stage 1/2 allocate a second only with overlap_comm, whose default is off below stage 3; stage 3
    # keeps one flat bucket (__ipg_bucket_flat_buffer). The whole reduce_bucket_size is allocated, whatever the model.
    bucket = REDUCE_BUCKET * h if p_t else 0
    blocks = {t.group for t in tensors if t.group != ROOT}
    block_bytes = round(sum(t.numel * stored(t) for t in partitioned if t.group == min(blocks, default=0))) \
        if stage == 3 else 0
    root_bytes = round(sum(t.numel * stored(t) for t in partitioned if t.group == ROOT)) if stage == 3 else 0
    gathered_block = block_bytes + min(block_bytes, PREFETCH_BUCKET * h) if block_bytes else 0
    params_t, params_f = on_rank(tensors, True), on_rank(tensors, False)
    host = (masters + states + grad_fp32 if offload_opt else 0) + (params_t + params_f if offload_params else 0)
    if offload_params:
        params_t = round(sum(t.numel * stored(t) for t in whole if t.trainable))
        params_f = round(sum(t.numel * stored(t) for t in whole if not t.trainable))
    sb = StateBytes(
        params_trainable=params_t, params_frozen=params_f,
        gradients=0 if offload_opt else grad_partition,
        optimizer_states=0 if offload_opt else states, master_weights=0 if offload_opt else masters,
        optimizer_temp=0, grad_upcast=0 if offload_opt else grad_fp32, grads_freed_at_step=0,
    )
    return sb, ZeroPlan(bucket, grad_partition, gathered_block, root_bytes, host)


def zero_replay(rep: Replay, setup: RunSetup, plan: ZeroPlan) -> Replay:
    """The one-device replay as a ZeRO rank runs it: stage 2/3 gradients leave for the bucket as they are made
    (each segment's gradients are dropped at its end, the partition is already counted in the states); stage 1
    keeps them to the end of the backward; stage 3 gathers each block (and the root modules) around its use."""
    par = setup.parallel
    assert par is not None
    stage3 = par.strategy is Strategy.zero3
    fwd, bwd = [], []
    for seg in rep.forward:
        gathered = plan.gathered_block if seg.name.startswith("layer") else plan.gathered_root
        ev = [(WCOPY, gathered)] if stage3 and gathered else []
        fwd.append(_with_events(seg, ev, [(WCOPY, -b) for _, b in ev]))
    total = sum(s.delta[GRADS][4] for s in rep.backward)
    for seg in rep.backward:
        gathered = plan.gathered_block if seg.name.startswith("b:layer") else plan.gathered_root
        ev = [(WCOPY, gathered)] if stage3 and gathered else []
        post = [(WCOPY, -b) for _, b in ev]
        if par.strategy is not Strategy.zero1:
            post.append((GRADS, -seg.delta[GRADS][4]))
        elif seg.name == "b:embed":
            post.append((GRADS, -total))
        bwd.append(_with_events(seg, ev, post))
    return dataclasses.replace(rep, forward=tuple(fwd), backward=tuple(bwd))
