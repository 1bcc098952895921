"""DeepSpeed ZeRO stages 1-3 per rank (pure), modelled from DeepSpeed 0.19.8's source with its default config and
checked against DeepSpeed's engine run on two gloo ranks (estimates/validation.md, part I).

Sources (``deepspeed/runtime/zero/``; Z12 = stage_1_and_2.py, Z3 = stage3.py, ZC = config.py):

- Defaults (ZC): reduce_bucket_size 5e8 elements, contiguous_gradients True, overlap_comm True for stage 3 only,
  stage3_param_persistence_threshold 1e5, stage3_prefetch_bucket_size 5e7, stage3_max_reuse_distance 1e9.
  "AdamW" is DeepSpeed's FusedAdam on CPU and CUDA alike: in place, its two fp32 states per partition element.
  bf16 / fp16 runs cast every parameter (adapters too) to the half dtype and keep fp32 masters (engine.py
  ``_configure_distributed_model``).
- Stages 1 and 2 (DeepSpeedZeroOptimizer). The trainable parameters become views of one flat buffer padded to a
  multiple of 2n elements (F; ``flatten_dense_tensors_aligned``), whole on every rank; each rank's partition is
  S = F / n. The fp32 master partition is a copy (``.clone()``) even in an fp32 run. Frozen parameters are
  untouched: whole on every rank. Backward: the first gradient hook allocates the contiguous bucket of
  reduce_bucket_size elements in the model dtype (``setup_buckets``), freed at the end of the backward
  (``_release_ipg_buffers``); ``overlap_comm`` (off by default) allocates a second one beside it, to reduce one while
  the other fills, and makes stage 1 reduce in the gradient hooks as stage 2 does (``process_gradients``). Each
  flush flattens the bucket into a copy (``allreduce_bucket``:
  ``torch.cat``) and all-reduces it; the rank's first flush holding gradients of its range allocates
  ``grads_in_partition`` of G_r elements: every parameter overlapping the rank's range, counted whole
  (``copy_grads_in_partition``), alive into the step. Stage 2 reduces in the gradient hooks, so the last rank
  (which owns the last parameters, the first to get gradients) allocates it at the first flush, while activations
  are alive; stage 1 keeps every gradient through the backward and reduces after it, in parameter order, so rank 0
  allocates it while nearly all gradients are still there. Step: the gradient norm casts each gradient slice of the
  partition to fp64, one at a time (``get_grad_norm_direct``); the partition's gradients are flattened (S elements)
  and cast to fp32 (the same tensor in an fp32 run, a new one in bf16), ``grads_in_partition`` is freed, Adam runs,
  and the updated partitions are all-gathered into the flat buffer (in place with NCCL; gloo allocates an output-size
  copy, ProcessGroupGloo).
- Stage 3 (DeepSpeedZeroOptimizer_Stage3). Every parameter, frozen ones included, is partitioned into
  ceil(numel / n) elements per rank; the fp32 masters are a copy of the trainable partitions (in an fp32 run too:
  measured, see ``zero_states``); the gradient partition buffer (``grad_partitions_flat_buffer``, the model dtype) and
  the one contiguous bucket exist from the start. Parameters of up to the persistence threshold are kept gathered.
  Gathering (``partitioned_param_coordinator``): from the second step on, a parameter stays gathered from its
  forward use to its backward use while its next use is within stage3_max_reuse_distance elements of fetched
  parameters, so the last blocks' parameters (the whole model when it has under about 5e8 parameters) are gathered
  at the end of the forward and released through the backward; each fetch allocates a flat all-gather buffer of
  the module's parameters beside their gathered storage (gloo: one more output-size copy). A module whose output
  needs no gradient (under PEFT, the first block's frozen projections of the frozen embeddings' output) registers
  no backward hook, so its parameters have no later use and are released after its forward
  (``Replay.idle_params``). zero.Init also replaces ``torch.nn.functional.linear`` with
  ``LinearFunctionForZeroStage3`` (linear.py; ``memory_efficient_linear``, on by default), which saves its input
  whatever needs a gradient: a frozen projection keeps the input torch's linear would not (``sim.Graph.ds_linear``;
  GPT-2's Conv1D does not call it). Measured: LLaMA LoRA +2.5% per rank from these inputs at the peak.
- torch_autocast (``--regime amp``; runtime/torch_autocast.py): the weights stay fp32 and the forward runs under
  torch.autocast, so the replay is the one-device AMP step with the model dtype fp32 throughout the engine (masters a
  copy, as in an fp32 run). The parameters of each exact ``torch.nn.Linear`` get ``comm_dtype`` = the autocast dtype:
  their gradients are copied into a bucket of that dtype, the others into an fp32 one (``ipg_buckets[comm_dtype]``,
  each of reduce_bucket_size elements); a gradient reduced alone is cast to its communication dtype beside its fp32
  storage (``allreduce_bucket``; stage 3 ``__avg_scatter_grads``). Under ZeRO-3 the linear is
  ``LinearFunctionForZeroStage3`` called with the fp32 input and weight: it keeps those, and its matmul's half copies
  (of ``weight.t()``, a view autocast does not cache) are temporaries (``sim.Graph.linear`` ``x_saved``,
  ``Ctx.weight_for_matmul``).
- Offloading the optimizer moves the masters, the states and the fp32 gradients to the host.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from ..config import Device, Offload, Regime, RunSetup, Strategy
from .compose import Replay
from .parallel import GRADS, ROOT, TEMP, WCOPY, RankTensor, _with_events
from .sim import BYTES
from .states import StateBytes

REDUCE_BUCKET = 500_000_000      # reduce_bucket_size (elements)
PREFETCH_BUCKET = 50_000_000     # stage3_prefetch_bucket_size (elements)
PERSISTENCE = 100_000            # stage3_param_persistence_threshold (elements)
MAX_REUSE = 1_000_000_000        # stage3_max_reuse_distance (elements)
SUB_GROUP = 1_000_000_000        # sub_group_size (elements): stage 3 steps its partition one sub-group at a time
NORM_BYTES = 8                   # the gradient norm's fp64 copy of one slice (zero/utils.get_norm_dtype)


@dataclasses.dataclass(frozen=True)
class ZeroPlan:
    """What a ZeRO rank allocates beyond the one-device step (bytes unless named; the worst rank's at each moment)."""

    bucket: int                  # the contiguous gradient bucket (stages 1/2: during the backward; stage 3: always)
    flush_elems: int             # elements flattened at a flush (a full bucket, or every gradient when they fit one)
    h: int                       # bytes per element of the model dtype
    p_t: int                     # trainable elements
    # the largest trainable tensor made in the head's, a block's and the embeddings' backward, (elements, bytes per
    # element of its communication dtype): one larger than the bucket is flushed alone, whole
    oversized: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    bucket_dtypes: tuple[int, ...]  # bytes per element of each bucket (one per communication dtype)
    host: int                    # offloaded states in host memory, per rank
    gloo: bool                   # gloo (CPU) copies an all-gather's output and a reduce-scatter's input
    # stages 1/2
    grad_end: int = 0            # the largest partition gradient buffer, alive from the end of the backward
    grad_early: int = 0          # stage 1: the worst rank's buffer, allocated in the post-backward walk
    walked: int = 0              # stage 1: the gradients freed into the bucket when the worst rank allocates it
    touches: tuple[tuple[str, int], ...] = ()  # stage 2: per rank, where the backward first reaches its range
                                               # (head | last | first | embed) and its buffer
    # stage 3
    persistent: int = 0          # engine buffers alive through the whole step: the bucket and the grad partition
    gathered_kept: int = 0       # parameters kept gathered from forward to backward (reuse distance)
    gather_temp: int = 0         # a block's fetch: the flat all-gather buffer (largest module and prefetch)
    block_bytes: int = 0         # one block's gathered parameters
    root_bytes: int = 0          # the embeddings gathered
    head_bytes: int = 0          # the modules after the blocks (final norm, head) gathered for the head
    embed_kept: bool = False     # the embeddings train, so stay gathered to their backward
    tied_bytes: int = 0          # a tied head's embedding, gathered from the embeddings to the head's backward
    kept_blocks: int = 0         # blocks kept gathered to their backward
    depth: int = 0               # the model's blocks
    persistence: int = 0         # parameters of up to this many elements stay gathered
    tied_grad: int = 0           # a tied, trainable embedding's gradient (the head's share of it): autograd hands it
                                 # to AccumulateGrad, and so to the engine's hook, only after the embeddings' backward

    @property
    def comm(self) -> int:
        """Bytes per element of the bucket a flush flattens: the largest communication dtype (torch_autocast), else
        the model dtype."""
        return max(self.bucket_dtypes, default=self.h)


def _half(setup: RunSetup) -> int:
    return 2 if setup.dtype.value in ("bf16", "fp16") else 4


class Partitions(NamedTuple):
    """Stages 1/2, per rank (every rank, or the first and last when there are many)."""

    s: int              # the partition: the flat buffer (padded to a multiple of 2n) / n
    g: list[int]        # grads_in_partition: every parameter overlapping the range, whole
    big: list[int]      # the largest slice of the range (one parameter's part)
    first: list[int]    # the index of the first parameter overlapping the range
    last: list[int]     # the index of the last one


def partition_grads(train: list[RankTensor], n: int) -> Partitions:
    """The flat buffer padded to a multiple of 2n (Z12 ``flatten_dense_tensors_aligned``, alignment 2 x dp size),
    ``grads_in_partition`` counting whole every parameter that overlaps the rank's range (Z12
    ``copy_grads_in_partition``), the slices as ``get_flat_partition`` cuts them."""
    p_t = sum(t.numel for t in train)
    s = -(-p_t // (2 * n)) * 2
    ranks = range(n) if n <= 4096 else (0, n - 1)
    starts, pos = [], 0
    for t in train:
        starts.append(pos)
        pos += t.numel
    out = Partitions(s, [], [], [], [])
    for r in ranks:
        lo, hi = r * s, (r + 1) * s
        over = [(k, a, a + t.numel) for k, (a, t) in enumerate(zip(starts, train)) if a < hi and a + t.numel > lo]
        out.g.append(sum(b - a for _, a, b in over))
        out.big.append(max((min(b, hi) - max(a, lo) for _, a, b in over), default=0))
        out.first.append(over[0][0] if over else len(train))
        out.last.append(over[-1][0] if over else len(train) - 1)
    return out


def _touches(train: list[RankTensor], last: list[int], first_block: int, blocks: list[int]) -> list[str]:
    """Stage 2: for each rank, where the backward first makes a gradient of its range: that of the last parameter
    overlapping it (``Partitions.last``; the backward runs the registration order backwards). ``head`` (the modules
    after the blocks), ``last`` (the last block, or a middle one: placed there, earlier), ``first`` (block 0),
    ``embed`` (the modules before the blocks)."""
    out = []
    for i in last:
        t = train[i]
        if t.group == ROOT:
            out.append("embed" if i < first_block else "head")
        else:
            out.append("first" if t.group == blocks[0] and len(blocks) > 1 else "last")
    return out


def zero_states(setup: RunSetup, one: StateBytes, tensors: tuple[RankTensor, ...], tied: bool = False
                ) -> tuple[StateBytes, ZeroPlan]:
    """Per-rank model states and engine buffers of ``setup.parallel.strategy`` (a ZeRO stage) from the one-device
    states of the same run in DeepSpeed's precision (``mixed`` for a half dtype); ``tied``: the head is the input
    embedding (registered once, with the embeddings)."""
    par = setup.parallel
    assert par is not None
    # torch_autocast (--regime amp): fp32 weights; each trainable nn.Linear's gradient is reduced in the autocast
    # dtype, through a bucket of its own (torch_autocast.py init_autocast_params sets comm_dtype; stage_1_and_2.py
    # and stage3.py keep ipg_buckets[comm_dtype], each of reduce_bucket_size elements)
    amp = setup.regime is Regime.amp
    n, h = par.world_size, 4 if amp else _half(setup)
    stage = {Strategy.zero1: 1, Strategy.zero2: 2, Strategy.zero3: 3}[par.strategy]
    gloo = setup.device is Device.cpu
    mixed = h == 2

    def comm(t: RankTensor) -> int:
        return _half(setup) if amp and t.linear else h

    reduce_bucket = par.zero_bucket if par.zero_bucket is not None else REDUCE_BUCKET
    prefetch = par.zero_prefetch if par.zero_prefetch is not None else PREFETCH_BUCKET
    persistence = par.zero_persistence if par.zero_persistence is not None else PERSISTENCE
    train = [t for t in tensors if t.trainable]
    p_t = sum(t.numel for t in train)
    offload_opt = par.offload is not Offload.none
    offload_params = par.offload is Offload.params

    def stored(t: RankTensor) -> float:  # bytes per element: the model dtype, or QLoRA's 4-bit weights, kept packed
        return t.elem_bytes if t.elem_bytes < 1 else h

    def state_bytes(elems: int) -> int:  # the optimizer's states for ``elems`` partition elements
        return round(one.optimizer_states * elems / p_t) if p_t else 0

    frozen = round(sum(t.numel * stored(t) for t in tensors if not t.trainable))
    blocks = sorted({t.group for t in tensors if t.group != ROOT})
    first_block = next((i for i, t in enumerate(tensors) if t.group != ROOT), len(tensors))
    # a parameter larger than the bucket skips it and is flushed alone: the flush flattens a copy of its gradient
    # (stage_1_and_2.py allreduce_bucket; stage 3 reduce_scatter_coalesced's torch.cat)

    def largest(ts: list[RankTensor]) -> tuple[int, int]:
        return max(((t.numel, comm(t)) for t in ts if t.trainable), default=(0, h))

    oversized = (largest([t for t in tensors[first_block:] if t.group == ROOT]),
                 largest([t for t in tensors if t.group == (blocks[0] if blocks else ROOT) and t.group != ROOT]),
                 largest(list(tensors[:first_block])))
    # overlap_comm (off by default below stage 3) double-buffers the bucket (stage_1_and_2.py setup_buckets); stage
    # 3's single bucket is the same either way
    buckets = 2 if stage < 3 and par.zero_overlap else 1
    comms = {comm(t) for t in train}
    bucket = buckets * reduce_bucket * sum(comms) if p_t else 0
    flush = min(reduce_bucket, p_t)
    common = {"flush_elems": flush, "h": h, "p_t": p_t, "oversized": oversized, "bucket_dtypes": tuple(sorted(comms)),
              "gloo": gloo}
    # a tied head's gradient of the embedding waits in autograd's input buffer of the embedding's AccumulateGrad
    # until the embeddings' backward adds theirs (one node, run once): the hook sees one gradient, at the end
    word = tensors[0] if tied and tensors and tensors[0].trainable else None
    tied_grad = word.numel * h if word is not None else 0
    if stage < 3:
        parts = partition_grads(train, n) if p_t else Partitions(0, [0], [0], [0], [0])
        s, g, big, ends = parts.s, parts.g, parts.big, parts.first
        masters, states = 4 * s, state_bytes(s)
        upcast = 4 * s + (h * s if mixed else 0)     # the flattened partition and its fp32 cast (one tensor in fp32)
        step = max(g[i] * h + max(upcast, NORM_BYTES * big[i]) for i in range(len(g)))
        if gloo:  # the all-gather of the updated partitions into the flat buffer, after the gradients are freed
            step = max(step, s * n * h)
        grad_end = max(g) * h
        # stage 1 reduces after the backward, walking the parameters in flat order: rank r allocates its buffer at
        # the flush holding the first parameter of its range, while every gradient not yet copied into the bucket is
        # alive (those walked before it, unless larger than the bucket: reduced from their own storage, kept to the
        # end of the walk); the worst rank has the largest buffer less the gradients freed by then
        walked = [sum(t.numel for t in train[:k] if t.numel <= reduce_bucket) for k in ends]
        worst = max(range(len(g)), key=lambda i: g[i] - walked[i])
        early = g[worst] * h
        stage1_walked = walked[worst] * h
        train_first_block = next((i for i, t in enumerate(train) if t.group != ROOT), len(train))
        # overlap_comm makes stage 1 reduce in the gradient hooks as stage 2 does (stage_1_and_2.py process_gradients),
        # freeing the same gradients: measured, the same peak as stage 2
        hooks = stage == 2 or bool(par.zero_overlap)
        touches = tuple(zip(_touches(train, parts.last, train_first_block, blocks), (x * h for x in g))) \
            if hooks and p_t else ()
        host = masters + states + 4 * s if offload_opt else 0
        sb = StateBytes(
            params_trainable=s * n * h, params_frozen=frozen,
            gradients=grad_end, optimizer_states=0 if offload_opt else states,
            master_weights=0 if offload_opt else masters, optimizer_temp=0,
            grad_upcast=0 if offload_opt else step - grad_end, grads_freed_at_step=0)
        return sb, ZeroPlan(bucket=bucket, host=host, grad_end=grad_end, grad_early=early, walked=stage1_walked,
                            touches=touches, tied_grad=tied_grad, **common)
    # stage 3
    def split(t: RankTensor) -> bool:  # partitioned and gathered around its use (the persistence threshold)
        return t.numel > persistence

    def part(t: RankTensor) -> int:
        return -(-t.numel // n)

    t_part = sum(part(t) for t in train)
    r_part = round(sum(part(t) * stored(t) for t in tensors if not t.trainable))
    # persistent parameters: kept gathered beside their partitions (stage3.py _post_step gathers them again)
    small_t = round(sum(t.numel * stored(t) for t in train if not split(t)))
    small_f = round(sum(t.numel * stored(t) for t in tensors if not t.trainable and not split(t)))
    # a separate fp32 copy even in an fp32 run: _create_fp32_partitions shares the tensor only when its device
    # equals self.device, a string (current_device_name()), and a torch.device never equals a string
    masters = 4 * t_part
    states = state_bytes(t_part)
    grad_buffer = t_part * h                       # grad_partitions_flat_buffer, from initialisation
    # the step, one sub-group at a time (stage3.py step: _prepare_sub_group ... _release_sub_group): its flattened
    # gradients and their fp32 cast; or the norm's fp64 copy of one partition
    sub = min(t_part, SUB_GROUP)
    upcast = max(4 * sub + (h * sub if mixed else 0), NORM_BYTES * max((part(t) for t in train), default=0))
    per_block = {b: round(sum(t.numel * stored(t) for t in tensors if t.group == b and split(t))) for b in blocks}
    block_elems = {b: sum(t.numel for t in tensors if t.group == b and split(t)) for b in blocks}
    # the root's tensors in registration order: the embeddings before the first block, the rest after the last
    embed_side = [t for t in tensors[:first_block] if split(t)]
    head_side = [t for t in tensors[first_block:] if t.group == ROOT and split(t)]
    root_bytes = round(sum(t.numel * stored(t) for t in embed_side))
    # a frozen embedding's output needs no gradient: no backward hook, released after its forward (the coordinator
    # sees no later use)
    embed_kept = any(t.trainable for t in embed_side)
    head_bytes = round(sum(t.numel * stored(t) for t in head_side))
    # a tied head uses the embedding again within the reuse distance: it stays gathered from the embeddings'
    # forward to the head's backward (tied_bytes), the other embeddings are released after their forward
    tied_bytes = round(embed_side[0].numel * stored(embed_side[0])) if tied and embed_side else 0
    # a block stays gathered from its forward to its backward when the parameters fetched in between (the later
    # blocks, forward and backward) are within the reuse distance (partitioned_param_coordinator
    # __params_to_release); with equal blocks that is the last k blocks
    elems = block_elems.get(blocks[0], 0) if blocks else 0
    kept = 0
    if elems:
        while kept < len(blocks) and 2 * kept * elems <= MAX_REUSE:
            kept += 1
    block = per_block.get(blocks[0], 0) if blocks else 0
    # a fetch (partition_parameters _all_gather_dtype): modules are fetched one at a time (each submodule's
    # pre-forward / pre-backward hook) with the next prefetched up to the prefetch bucket, into a flat buffer of about
    # the largest module and the prefetch, beside gloo's output-size copy during the collective; the parameters'
    # own storage is made from it while it is still held (``_fetch``)
    largest = max((round(t.numel * stored(t)) for t in tensors if t.group == (blocks[0] if blocks else ROOT)
                   and split(t)), default=0)
    gather_temp = min(block, largest + prefetch * h)
    host = masters + states + 4 * t_part if offload_opt else 0
    params_t = round(sum(part(t) * stored(t) for t in train)) + small_t
    if offload_params:
        host += params_t + r_part
        params_t, r_part = 0, 0
    sb = StateBytes(params_trainable=params_t, params_frozen=r_part + small_f, gradients=grad_buffer,
                    optimizer_states=0 if offload_opt else states, master_weights=0 if offload_opt else masters,
                    optimizer_temp=0, grad_upcast=0 if offload_opt else upcast, grads_freed_at_step=0)
    return sb, ZeroPlan(bucket=bucket, host=host, persistent=bucket + grad_buffer,
                        gathered_kept=kept * block, gather_temp=gather_temp, block_bytes=block, root_bytes=root_bytes,
                        head_bytes=head_bytes, embed_kept=embed_kept, tied_bytes=tied_bytes, kept_blocks=kept,
                        depth=len(blocks), persistence=persistence, tied_grad=tied_grad, **common)


def _handed(rep: Replay, plan: ZeroPlan) -> list[int]:
    """Per backward segment, the gradient bytes it hands to the engine's hooks: what it makes, with a tied head's
    share of the embedding's gradient moved from the head to the embeddings (``ZeroPlan.tied_grad``)."""
    out = [seg.delta[GRADS][4] for seg in rep.backward]
    if plan.tied_grad and len(out) > 1 and rep.backward[0].name == "b:head" and rep.backward[-1].name == "b:embed":
        moved = min(plan.tied_grad, out[0])
        out[0] -= moved
        out[-1] += moved
    return out


def zero_replay(rep: Replay, setup: RunSetup, plan: ZeroPlan) -> Replay:
    """The one-device replay as a ZeRO rank runs it (the worst rank at each moment; module docstring)."""
    par = setup.parallel
    assert par is not None
    if par.strategy is Strategy.zero3:
        return _stage3_replay(rep, plan)
    stage1 = par.strategy is Strategy.zero1 and not par.zero_overlap  # overlap_comm: reduced in the hooks (stage 2)
    h, flush = plan.h, plan.flush_elems
    fwd, bwd = list(rep.forward), []
    # stage 2: the first flush is where the gradients made so far (last parameters first) pass the bucket. The
    # replay has segments, not hooks: the flush is placed at the start of the segment where it falls when it falls
    # in the segment's first half (a block's first weight gradients: its peak comes after), else at its end; a
    # flush past the last block (a segment repeated at depth) is placed at the last block's end (earlier: higher)
    made, first, early = 0, len(rep.backward) - 1, False
    handed = _handed(rep, plan)
    if not stage1 and plan.p_t > flush:
        for i, seg in enumerate(rep.backward[:2]):
            g_elems = handed[i] // h if h else 0
            if made + g_elems >= flush:
                first, early = i, g_elems > 0 and (flush - made) < g_elems / 2
                break
            made += g_elems
        else:
            first = min(1, len(rep.backward) - 1)
    flushed = False
    # each rank's gradient buffer is allocated at its first flush: where the backward reaches its range, not
    # before the first flush; the worst rank at each moment is the largest buffer allocated so far (an envelope)
    n_seg = len(rep.backward)
    where = {"head": 0, "last": min(1, n_seg - 1), "first": max(n_seg - 2, 0), "embed": n_seg - 1}
    if plan.p_t <= flush:  # one flush, at the end of the backward
        at = [(n_seg - 1, False, g_r) for _, g_r in plan.touches]
    else:
        at = []
        for key, g_r in plan.touches:
            i = max(where[key], first)
            pre_ok = rep.backward[i].name.startswith("b:layer") and (i != first or early)
            at.append((i, pre_ok, g_r))
    envelope = 0

    def grow(i: int, side: int) -> list[tuple[int, int]]:  # side 0: the segment's start, 1: its end
        nonlocal envelope
        top = max([envelope] + [g_r for j, at_start, g_r in at if (j, 0 if at_start else 1) <= (i, side)])
        out = [(GRADS, top - envelope)] if top > envelope else []
        envelope = top
        return out

    # the bucket is allocated by the first gradient hook (setup_buckets): in the first segment that makes gradients
    opens = next((i for i, seg in enumerate(rep.backward) if seg.delta[GRADS][4]), 0)
    for i, seg in enumerate(rep.backward):
        g = handed[i]
        # in that segment, after its gradients: its peak (the loss's backward, in the head) comes before them
        pre: list[tuple[int, int]] = []
        post: list[tuple[int, int]] = [(GRADS, plan.bucket)] if i == opens and plan.bucket else []
        last = i == n_seg - 1
        if not stage1:
            post.append((GRADS, -g))                      # each gradient leaves for the bucket as it is made
            if i == first:
                flushed = True
            if flushed:
                f = _flush_bytes(plan, seg.name)
                (pre if i == first and early else post).extend([(TEMP, f), (TEMP, -f)])
            pre += grow(i, 0)
            post += grow(i, 1)
            if last:
                post += [(GRADS, plan.grad_end - envelope)] if plan.grad_end > envelope else []
                post.append((GRADS, -plan.bucket))
        elif last:  # stage 1: reduce after the backward, rank 0 first, its gradients still all there
            total = sum(s.delta[GRADS][4] for s in rep.backward)
            moved = min(plan.walked, total)
            fill = min(flush * plan.comm, total)
            post += [(GRADS, -moved), (TEMP, fill), (TEMP, -fill), (GRADS, plan.grad_early),
                     (GRADS, -(total - moved)), (GRADS, plan.grad_end - plan.grad_early), (GRADS, -plan.bucket)]
        bwd.append(_with_events(seg, pre, post))
    return dataclasses.replace(rep, forward=tuple(fwd), backward=tuple(bwd))


def _flush(plan: ZeroPlan, name: str) -> tuple[int, int, bool]:
    """What a flush in backward segment ``name`` reduces: (elements, bytes per element of the communication dtype,
    alone). A bucket's worth, or the segment's largest gradient when it is larger than the bucket (reduced alone,
    from its own storage in the model dtype)."""
    big, c = plan.oversized[0 if name == "b:head" else 2 if name == "b:embed" else 1]
    if big > plan.flush_elems:
        return big, c, True
    return plan.flush_elems, plan.comm, False


def _flush_bytes(plan: ZeroPlan, name: str) -> int:
    """Stages 1/2: the copy a flush flattens (allreduce_bucket's ``self.flatten``), in the bucket's dtype; a gradient
    reduced alone is flattened in the model dtype and, under torch_autocast, cast to its communication dtype beside
    that (``tensor.to(communication_data_type)``)."""
    elems, c, alone = _flush(plan, name)
    return elems * (plan.h + (c if c != plan.h else 0)) if alone else elems * c


def _fetch(plan: ZeroPlan, gathered: int, flat: int | None) -> list[tuple[int, int]]:
    """A stage-3 fetch: the flat buffer (and gloo's copy while the collective runs), then the parameters' storage,
    then the flat buffer freed. ``flat`` None: a module of one parameter (an embedding, a tied head), gathered into
    its own storage (partition_parameters ``_all_gather_sequential``), with gloo's copy beside it."""
    if flat is None:
        return [(WCOPY, gathered)] + ([(TEMP, gathered), (TEMP, -gathered)] if plan.gloo else [])
    copy = [(TEMP, flat), (TEMP, -flat)] if plan.gloo else []
    return [(TEMP, flat), *copy, (WCOPY, gathered), (TEMP, -flat)]


def _stage3_replay(rep: Replay, plan: ZeroPlan) -> Replay:
    """Stage 3: the persistent buffers are states; each block's fetch allocates its flat buffer beside the gathered
    parameters; the last ``kept_blocks`` blocks stay gathered to their backward, the others are released after their
    forward and fetched again for their backward; each segment's gradients leave for the partition buffer."""
    fwd, bwd = [], []
    layers = [s for s in rep.forward if s.name.startswith("layer")]
    # the replay's layer segments are the first, a middle one (repeated to depth) and the last block: when every
    # block stays gathered, all of them keep theirs; otherwise the last keeps its own, and the other kept blocks
    # (the ones before it, inside the repeated middle) are one lump gathered at the end of the forward and released
    # with the last block's backward (later blocks re-fetch their own)
    all_kept = plan.kept_blocks >= plan.depth
    last_layers = {s.name for s in layers} if all_kept else ({layers[-1].name} if plan.kept_blocks else set())
    lump = 0 if all_kept else max(plan.kept_blocks - 1, 0) * plan.block_bytes
    # a frozen module whose input needs no gradient (the first block's projections under PEFT) gets no backward
    # hook, so the coordinator sees no later use and releases it after its forward (release_sub_module,
    # __params_to_release): a block keeps, and fetches for its backward, its other parameters
    idle: dict[str, int] = {}
    for name, numel, dtype in rep.idle_params:
        if name.startswith("layer") and numel > plan.persistence:
            idle[name] = idle.get(name, 0) + round(numel * BYTES[dtype])
    for seg in rep.forward:
        if seg.name.startswith("layer"):
            gathered = plan.block_bytes
            keep = seg.name in last_layers
            pre = _fetch(plan, gathered, plan.gather_temp)
            released = idle.get(seg.name, 0) if keep else gathered  # a kept block: its idle modules only
            post = [(WCOPY, -released)] if released or not keep else []
            if lump and seg.name == layers[-1].name:
                post.append((WCOPY, lump))
            fwd.append(_with_events(seg, pre, post))
        elif seg.name == "head":
            b = plan.head_bytes
            fwd.append(_with_events(seg, _fetch(plan, b, None) if b else [], []))
        else:  # the embeddings
            b = plan.root_bytes
            pre = _fetch(plan, b, None) if b else []
            fwd.append(_with_events(seg, pre, [] if plan.embed_kept or not b else [(WCOPY, -(b - plan.tied_bytes))]))
    for seg, g in zip(rep.backward, _handed(rep, plan)):
        pre, post = [], [(GRADS, -g)]
        if seg.name.startswith("b:layer"):
            own = plan.block_bytes - idle.get(seg.name[2:], 0)
            if seg.name[2:] not in last_layers:
                pre = _fetch(plan, own, plan.gather_temp)
            post.append((WCOPY, -own - (lump if seg.name[2:] == layers[-1].name else 0)))
        elif seg.name == "b:head" and (plan.head_bytes or plan.tied_bytes):
            post.append((WCOPY, -plan.head_bytes - (0 if plan.embed_kept else plan.tied_bytes)))
        elif seg.name == "b:embed" and plan.embed_kept and plan.root_bytes:
            post.append((WCOPY, -plan.root_bytes))
        # a flush: reduce_scatter_coalesced's torch.cat of the bucket (skipped for one tensor larger than the
        # bucket), and gloo reduce-scatters from a clone of its input
        # (__avg_scatter_grads: a gradient reduced alone is first cast to its communication dtype when that differs)
        elems, c, alone = _flush(plan, seg.name)
        f = elems * c
        f = (0 if alone and c == plan.h else f) + (f if plan.gloo else 0)
        post = [(TEMP, f), (TEMP, -f)] + post
        bwd.append(_with_events(seg, pre, post))
    return dataclasses.replace(rep, forward=tuple(fwd), backward=tuple(bwd))
