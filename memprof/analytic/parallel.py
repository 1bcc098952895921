"""Per-rank memory under data parallelism (pure): FSDP2, DDP and DeepSpeed ZeRO, built on the one-device step.

Every rank runs the one-device step on its own micro-batch, so activations and their temporaries are those of one
device. What changes per rank is where the model states live and what the engine allocates around the step:

- **FSDP2** (torch 2.13 ``torch/distributed/fsdp/_fully_shard``, one group per block plus the root, as
  ``runtime/parallel.wrap_for_strategy`` applies it). Each parameter is split on dim 0 into ``ceil(dim0 / n)``-row
  shards (``_fsdp_param.py``: dim 0 padded to a multiple of n), so parameters, gradients and optimizer states cost
  1/n of the padded bytes per rank, frozen ones included. Around the step (``_fsdp_param_group.py``,
  ``_fsdp_collectives.py``):
  - forward, each block: ``foreach_all_gather`` allocates an output buffer of the block's padded bytes; the copy-out
    allocates the unsharded parameters (the same bytes); in forward the buffer is kept until the next block's
    copy-out (``comm_ctx.all_gather_state``: implicit prefetching) and the root's post-forward frees the last one.
    ``reshard_after_forward`` frees the unsharded parameters after the block (``fsdp``), or keeps them until the
    block's backward (``fsdp-grad-op``). The root group (embeddings, final norm, head) is never resharded after
    forward (``_fsdp_state._lazy_init``).
  - backward, each block: its pre-backward copies out the parameters the previous block prefetched, frees that
    buffer and prefetches the next block's (``_backward_prefetch``); its post-backward reshards, then
    ``foreach_reduce`` allocates a reduce-scatter input of the padded gradient bytes, frees the unsharded
    gradients and allocates the shard output the sharded gradients view. The input is kept until the next
    group's post-backward (``reduce_scatter_max_input_buffers`` = 1); the root's is released at the end.
- **DDP** (torch ``nn/parallel/distributed.py``, ``reducer.cpp``): every state replicated, plus the Reducer's
  gradient buckets (``gradient_as_bucket_view=False``: a flat copy of every trainable gradient), kept for the run.
- **ZeRO** (DeepSpeed 0.19.8 ``runtime/zero/stage_1_and_2.py``, ``stage3.py``, config defaults in ``zero/config.py``;
  ``zero.py`` has the detail): bf16 / fp16 runs are DeepSpeed's mixed precision (half weights, fp32 partitioned
  masters and Adam states); stage 1 partitions optimizer states and masters, stage 2 also gradients (reduced through
  the contiguous bucket as they are made), stage 3 also parameters (frozen ones too), gathered module by module.
  ZeRO cannot run on fake tensors: this part is modelled from the source and checked against DeepSpeed's engine on
  real gloo ranks (benchmarks/validate_zero.py), not traced.

Offloaded states are host (CPU) memory, reported apart (``Estimate.host_bytes``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import (FSDP_STRATEGIES, AdapterVariant, IA3Spec, LoraSpec, Method, Offload,
                      ParallelSpec, RunSetup, Strategy)
from ..errors import ConfigError
from ..spec import ModelSpec
from .compose import FATES, Replay, Segment, vadd, vzero
from .modules import Module, all_module_names, layer_prefix, tied_head
from .params import (LORA_FAMILY, _saved_match, lora_family_tensors, modules_to_save, resolve_ia3_targets,
                     resolve_lora_targets, resolve_ln_targets, trainable_tensors)
from .sim import P
from .states import StateBytes, quantized_bytes, step_counter_bytes, weight_bytes

GRADS, WCOPY, TEMP = FATES.index("gradients"), FATES.index("weight_copies"), FATES.index("temporaries")
ROOT = -1  # the group of tensors outside the blocks


@dataclass(frozen=True)
class RankTensor:
    """One parameter as the engines split it: torch shape (dim0, rest), storage bytes per element, group."""

    dim0: int
    rest: int
    trainable: bool
    elem_bytes: float
    group: int            # block index, or ROOT
    # a parameter of a torch.nn.Linear (the class itself, not a subclass): DeepSpeed's torch_autocast reduces its
    # gradient in the autocast dtype (runtime/torch_autocast.py LOWER_PRECISION_SAFE_MODULES, comm_dtype)
    linear: bool = False

    @property
    def numel(self) -> int:
        return self.dim0 * self.rest

    def shard_numel(self, n: int) -> int:
        return -(-self.dim0 // n) * self.rest

    def nbytes(self, numel: int) -> int:
        return math.ceil(numel * self.elem_bytes)


def _shapes(m: Module) -> list[tuple[int, int]]:
    """Torch shapes (dim0, rest) of a module's weight and bias: nn.Linear (out, in), transformers Conv1D (in, out),
    nn.Embedding (num, dim), norms and biases 1-D."""
    if m.kind == "experts":
        raise ConfigError("MoE expert stacks are not modelled under data parallelism yet; use --trace")
    if m.kind == "norm":
        weight = (m.d_in, 1)
    elif m.kind in ("conv1d", "embedding"):
        weight = (m.d_in, m.d_out)
    else:
        weight = (m.d_out, m.d_in)
    bias = [(m.d_in if m.kind == "norm" else m.d_out, 1)] if m.bias else []
    return [weight] + bias


def _torch_shape(rows: int, cols: int) -> tuple[int, int]:
    """memprof's (rows, cols) of an added tensor as its torch shape: rows == 1 is a 1-D tensor of cols."""
    return (cols, 1) if rows == 1 else (rows, cols)


def rank_tensors(spec: ModelSpec, setup: RunSetup) -> tuple[RankTensor, ...]:
    """Every parameter of the fine-tuned model in registration order (embeddings, blocks, the rest), with its group.

    Base weights are in the run's storage dtype (QLoRA's targets 4-bit); tensors a PEFT method adds are fp32 on a
    half base (params.py); modules_to_save adds a trainable copy beside the frozen original (peft).

    Raises:
        ConfigError: a method whose tensors are not placed here (the trace covers it).
    """
    method, wb = setup.method, weight_bytes(setup)
    prefix = layer_prefix(spec).split("{i}")[0]
    lora = setup.lora or LoraSpec()
    saved = modules_to_save(spec, lora.modules_to_save) if method not in (Method.full, Method.adapter,
                                                                          Method.bitfit) else ()
    chosen = dict(resolve_lora_targets(spec, lora, method)) if method in LORA_FAMILY else {}
    ia3 = {n: ff for n, _, ff in resolve_ia3_targets(spec, setup.ia3 or IA3Spec())} if method is Method.ia3 else {}
    ln = dict(resolve_ln_targets(spec)) if method is Method.ln_tuning else {}
    adapter = setup.adapter
    out: list[RankTensor] = []

    def group_of(name: str) -> int:
        return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else ROOT

    def add(shapes: list[tuple[int, int]], trainable: bool, elem: float, group: int, linear: bool = False) -> None:
        out.extend(RankTensor(d0, rest, trainable, elem, group, linear) for d0, rest in shapes)

    tied, word_embedding = tied_head(spec), True

    current, copies = ROOT, 0
    for name, m in all_module_names(spec):
        if m.role == "head" and tied_head(spec):
            continue
        group = group_of(name)
        if current >= 0 and group != current and method is Method.adapter:
            _adapter_tensors(spec, setup, current, add)  # memprof's adapters register after their block's modules
        current = group
        shapes = _shapes(m)
        train_w = method is Method.full or (m.role == "classifier" and method in (Method.adapter, Method.bitfit)) \
            or (method is Method.adapter and adapter is not None and adapter.train_norms and m.kind == "norm")
        train_b = train_w or method is Method.bitfit or (method in LORA_FAMILY and (
            lora.bias == "all" and not _saved_match(name, saved) or lora.bias == "lora_only" and name in chosen))
        elem = wb
        quantized = method is Method.qlora and m.is_linear and m.role not in ("head", "classifier")
        # an nn.Linear's parameters (QLoRA's Linear4bit is a subclass); a tied head's nn.Linear holds the word
        # embedding, the first embedding registered
        linear = m.kind == "linear" and not quantized
        if m.role == "embed":
            linear, word_embedding = tied and word_embedding, False
        if quantized:
            elem = quantized_bytes(m.weight_params, setup) / m.weight_params
        add(shapes[:1], train_w, elem, group, linear)
        add(shapes[1:], train_b, wb, group, linear)
        if name in chosen:  # peft's LoRA A and B are nn.Linear; the other methods' factors are bare parameters
            add([_torch_shape(r, c) for r, c in lora_family_tensors(method, m, lora)], True, 4, group,
                method in (Method.lora, Method.qlora))
        if name in ia3:
            add([((m.d_in if ia3[name] else m.d_out), 1)], True, 4, group)
        if name in ln:
            add(shapes, True, wb, group)
        if saved and _saved_match(name, saved):
            add(shapes, True, wb, group, m.kind == "linear")
            copies += len(shapes)
    if current >= 0 and method is Method.adapter:
        _adapter_tensors(spec, setup, current, add)
    if method in (Method.prefix, Method.prompt, Method.p_tuning, Method.trainable_tokens):
        own = trainable_tensors(spec, setup)  # the encoder's tensors, then the modules_to_save copies added above
        add([_torch_shape(r, c) for r, c, _ in own[:len(own) - copies]], True, 4, ROOT)
    elif method not in (Method.full, Method.adapter, Method.bitfit, Method.ia3, Method.ln_tuning) \
            and method not in LORA_FAMILY:
        raise ConfigError(f"{method.value} is not modelled under data parallelism yet; use --trace")
    return tuple(out)


def _adapter_tensors(spec: ModelSpec, setup: RunSetup, block: int, add) -> None:  # noqa: ANN001
    """memprof's bottleneck adapters of one block (runtime/adapters.py: down h -> r, up r -> h, fp32)."""
    ad = setup.adapter
    assert ad is not None
    h, r = spec.hidden_size, ad.bottleneck_size(spec.hidden_size)
    sites = 2 if ad.variant is AdapterVariant.houlsby else 1
    add([(r, h), (r, 1), (h, r), (h, 1)] * sites, True, 4, block, True)  # nn.Linear down and up


@dataclass(frozen=True)
class GroupBytes:
    """One FSDP group's bytes on a rank of a shard group of n."""

    unsharded: int        # padded parameters: the all-gather output, and again the unsharded parameters
    reduce_input: int     # padded trainable gradients: the reduce-scatter input
    grad_shard: int       # the reduce-scatter output the sharded gradients view
    copy_in: int = 0      # MixedPrecisionPolicy: the shards cast to param_dtype before the all-gather (foreach copy)


def group_bytes(tensors: tuple[RankTensor, ...], group: int, n: int, param_bytes: int | None = None,
                reduce_bytes: int | None = None) -> GroupBytes:
    """``param_bytes`` / ``reduce_bytes``: a MixedPrecisionPolicy's param_dtype and reduce_dtype sizes (every
    parameter of the group is gathered in param_dtype, gradients reduced in reduce_dtype); None: the stored dtype."""
    ts = [t for t in tensors if t.group == group]
    if param_bytes is None:
        return GroupBytes(
            unsharded=sum(t.nbytes(t.shard_numel(n) * n) for t in ts),
            reduce_input=sum(t.nbytes(t.shard_numel(n) * n) for t in ts if t.trainable),
            grad_shard=sum(t.nbytes(t.shard_numel(n)) for t in ts if t.trainable),
        )
    reduce_bytes = reduce_bytes or param_bytes
    return GroupBytes(
        unsharded=sum(t.shard_numel(n) * n for t in ts) * param_bytes,
        reduce_input=sum(t.shard_numel(n) * n for t in ts if t.trainable) * reduce_bytes,
        grad_shard=sum(t.shard_numel(n) for t in ts if t.trainable) * reduce_bytes,
        copy_in=sum(t.shard_numel(n) for t in ts) * param_bytes if n > 1 else 0,
    )


# ---- FSDP2: the one-device replay with the engine's events around each segment ----------------------------------

def _unit(fate: int, nbytes: int) -> tuple:
    v = list(vzero())
    v[fate] = P(c=nbytes)
    return tuple(v)


def _with_events(seg: Segment, pre: list[tuple[int, int]], post: list[tuple[int, int]]) -> Segment:
    """``seg`` with engine allocations (+) and frees (-) at its start and end; every allocation is a candidate."""
    cur, cands = vzero(), []
    for fate, nbytes in pre:
        cur = vadd(cur, _unit(fate, nbytes))
        if nbytes > 0:
            cands.append(cur)
    pre_net = cur
    mid = [vadd(pre_net, c) for c in seg.cands]
    cur, post_cands = vadd(pre_net, seg.delta), []
    for fate, nbytes in post:
        cur = vadd(cur, _unit(fate, nbytes))
        if nbytes > 0:
            post_cands.append(cur)
    carried = ()
    if seg.carried:
        carried = tuple([vzero()] * len(cands)) + tuple(seg.cand_carried) + tuple([seg.carried] * len(post_cands))
    return dataclasses.replace(seg, delta=cur, cands=tuple(cands + mid + post_cands), cand_carried=carried)


def fsdp_replay(rep: Replay, tensors: tuple[RankTensor, ...], par: ParallelSpec, gloo: bool = False,
                param_bytes: int | None = None, reduce_bytes: int | None = None) -> Replay:
    """The one-device replay as one FSDP2 rank runs it (module docstring). The replay's blocks are the first, one
    middle and the last; all blocks have the same tensors, so block 0's bytes stand for each. ``gloo``: a CPU run,
    whose backend reduce-scatters through a copy of the input, alive for the call (ProcessGroupGloo; the sharded
    trace adds the same buffer, sharded_trace._gloo_reduce_scatter_copy)."""
    n = par.shard_group
    reshard = par.strategy is not Strategy.fsdp_grad_op
    root = group_bytes(tensors, ROOT, n, param_bytes, reduce_bytes)
    blk = group_bytes(tensors, 0, n, param_bytes, reduce_bytes)
    U, R = blk.unsharded, root.unsharded
    # a shard group of one (HSDP with one rank per group) copies shards into the unsharded parameters without an
    # all-gather buffer (FSDPParamGroup.unshard / wait_for_unshard, world_size == 1)
    A, AR = (U, R) if n > 1 else (0, 0)

    def gather(gb: GroupBytes, nbytes: int) -> list[tuple[int, int]]:
        """An all-gather's output; under a MixedPrecisionPolicy the shards' cast copy lives through the copy-in
        (_fsdp_collectives._get_param_all_gather_inputs, foreach copy)."""
        if not nbytes:
            return []
        return [(TEMP, gb.copy_in), (TEMP, nbytes), (TEMP, -gb.copy_in)] if gb.copy_in else [(TEMP, nbytes)]
    layers = rep.layers
    fwd, bwd = [], []

    def host_copy(gb: GroupBytes) -> list[tuple[int, int]]:
        """After the reduce-scatter output: gloo's copy of the input for the call; CPUOffloadPolicy's move of the
        shard to the host."""
        call = [(TEMP, gb.reduce_input), (TEMP, -gb.reduce_input)] if gloo and n > 1 else []
        return call + ([(GRADS, -gb.grad_shard)] if par.offload is Offload.params else [])

    for seg in rep.forward:
        if seg.name == "embed":      # root pre-forward: all-gather (kept) and copy-out of the root
            fwd.append(_with_events(seg, gather(root, AR) + [(WCOPY, R)], []))
        elif seg.name.startswith("layer"):
            prev = AR if seg.name == "layer0" else A
            # wait_for_unshard drops comm_ctx.all_gather_state, but its local ``prev_all_gather_state`` holds the
            # previous buffer until the method returns: after this block's copy-out
            fwd.append(_with_events(seg, gather(blk, A) + [(WCOPY, U), (TEMP, -prev)],
                                    [(WCOPY, -U)] if reshard else []))
        else:                        # head: the root's post-forward frees the last block's kept all-gather buffer;
            # the root reshards too: fully_shard(reshard_after_forward=...) given explicitly (wrap_for_strategy) turns
            # off the root's exception (_fsdp_state._lazy_init, _auto_reshard_after_forward)
            fwd.append(_with_events(seg, [], [(TEMP, -A)] + ([(WCOPY, -R)] if reshard else [])))
    root_grads = sum(s.delta[GRADS][4] for s in rep.backward if s.name in ("b:head", "b:embed"))
    for seg in rep.backward:
        g = seg.delta[GRADS][4]      # the unsharded gradients this segment made (constant bytes)
        if seg.name == "b:head":     # root pre-backward: the root all-gathered again, then the last block prefetched
            regather = gather(root, AR) + [(WCOPY, R), (TEMP, -AR)] if reshard else []
            bwd.append(_with_events(seg, regather + (gather(blk, A) if reshard else []), []))
        elif seg.name.startswith("b:layer"):
            i = int(seg.name[len("b:layer"):])
            first = i == layers - 1  # the first block backward meets: no reduce-scatter input kept yet
            pre = [(WCOPY, U), (TEMP, -A)] + (gather(blk, A) if i > 0 else []) if reshard else []
            post = [(WCOPY, -U)] + ([] if first else [(TEMP, -blk.reduce_input)]) + \
                [(TEMP, blk.reduce_input), (GRADS, -g), (GRADS, blk.grad_shard)] + host_copy(blk)
            bwd.append(_with_events(seg, pre, post))
        else:                        # b:embed, then the root's post-backward in the final callback
            post = [(WCOPY, -R), (TEMP, -blk.reduce_input), (TEMP, root.reduce_input), (GRADS, -root_grads),
                    (GRADS, root.grad_shard)] + host_copy(root) + [(TEMP, -root.reduce_input)]
            bwd.append(_with_events(seg, [], post))
    return dataclasses.replace(rep, forward=tuple(fwd), backward=tuple(bwd))


def sharded_states(spec: ModelSpec, setup: RunSetup, one: StateBytes, tensors: tuple[RankTensor, ...],
                   n: int) -> StateBytes:
    """Model states on one rank of a shard group of n: each tensor's dim-0 shard (padded rows on rank 0).
    Elementwise optimizer states scale with the shard (AdamW, SGD momentum, Lion; Adafactor's factored and the 8-bit
    states are scaled in proportion, an approximation); ``state["step"]`` counters stay one per tensor."""
    train = [t for t in tensors if t.trainable]
    full_t = sum(t.nbytes(t.numel) for t in train)
    shard_t = sum(t.nbytes(t.shard_numel(n)) for t in train)
    ratio = shard_t / full_t if full_t else 0.0
    frozen_enum = sum(t.nbytes(t.numel) for t in tensors if not t.trainable)
    replicated = max(0, one.params_frozen - frozen_enum)  # buffers the engines do not shard (VeRA's projections)
    counters = step_counter_bytes(spec, setup)
    return StateBytes(
        params_trainable=shard_t,
        params_frozen=sum(t.nbytes(t.shard_numel(n)) for t in tensors if not t.trainable) + replicated,
        gradients=shard_t,
        optimizer_states=counters + round((one.optimizer_states - counters) * ratio),
        master_weights=round(one.master_weights * ratio),
        optimizer_temp=_shard_optimizer_temp(one, train, n),
        grad_upcast=round(one.grad_upcast * ratio), grads_freed_at_step=round(one.grads_freed_at_step * ratio),
    )


def _shard_optimizer_temp(one: StateBytes, train: list[RankTensor], n: int) -> int:
    """The optimizer step's temporaries on shards: the one-device value scaled by the largest tensor's shard
    (per-tensor kernels) or by the group total (foreach), whichever the one-device value was built from."""
    if not one.optimizer_temp or not train:
        return 0
    largest = max(train, key=lambda t: t.nbytes(t.numel))
    full_total = sum(t.nbytes(t.numel) for t in train)
    by_total = one.optimizer_temp * sum(t.nbytes(t.shard_numel(n)) for t in train) / full_total
    by_largest = one.optimizer_temp * largest.nbytes(largest.shard_numel(n)) / largest.nbytes(largest.numel)
    return round(max(by_total, by_largest) if one.optimizer_temp >= full_total else by_largest)


def check_parallel(setup: RunSetup) -> None:
    """Combinations memprof does not model under data parallelism yet (one line each).

    Raises:
        ConfigError: gradient accumulation or kept gradients, FSDP optimizer-only offload, FSDP's mixed precision
            with a PEFT method.
    """
    par = setup.parallel
    assert par is not None
    if setup.grads_kept:
        raise ConfigError("gradient accumulation (or zero_grad zeros) under data parallelism is not modelled yet; "
                          "estimate one micro-batch (--grad-accum 1)")
    if setup.sharded_masters and setup.method is not Method.full:
        raise ConfigError("FSDP's mixed precision gathers every parameter in the half dtype, the PEFT method's too, "
                          "while memprof's replay keeps peft's adapters in fp32: modelled for full fine-tuning only; "
                          "trace it (--trace) or use --regime pure or amp")
    if par.strategy in FSDP_STRATEGIES and par.offload is Offload.optimizer:
        raise ConfigError("FSDP2 offloads parameters, gradients and optimizer states together (CPUOffloadPolicy): "
                          "use --offload params")


def ddp_bucket_bytes(tensors: tuple[RankTensor, ...]) -> int:
    """DDP's Reducer buckets: one flat copy of every trainable gradient (reducer.cpp ``initialize_buckets``)."""
    return sum(t.nbytes(t.numel) for t in tensors if t.trainable)
