"""Per-rank model states under data parallelism (analytic/parallel.py, ranks.py, zero.py) against independent
counts: torch's own parameter shapes on a meta model, hand arithmetic, and DeepSpeed's published estimator formulas.
The per-rank peaks against the sharded trace are in tests/runtime/test_sharded_trace.py and estimates/validation.md.
"""

from __future__ import annotations

import math

import pytest

from memprof.analytic import estimate
from memprof.analytic.parallel import rank_tensors, sharded_states
from memprof.analytic.ranks import one_device_setup, rank_share
from memprof.analytic.states import state_bytes
from memprof.analytic.parallel import RankTensor
from memprof.analytic.zero import REDUCE_BUCKET, partition_grads
from memprof.config import ParallelSpec
from memprof.errors import ConfigError
from memprof.hub import resolve_spec
from memprof.resolve import resolve_setup
from tests.tiny_configs import tiny_spec

METHODS = ("full", "lora", "adapter", "bitfit", "ia3", "prompt", "ln-tuning", "qlora")


def _setup(method: str = "full", dtype: str = "fp32", **par: object):
    over: dict[str, object] = {"method": method, "dtype": dtype, "device": "cpu", "batch_size": 2, "seq_len": 16}
    over.update(par)
    return resolve_setup(overrides=over)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_rank_tensors_hold_every_weight_once(family: str, method: str) -> None:
    """The per-tensor list (torch shapes, groups) sums to the same trainable and frozen bytes as the one-device
    states (params.py counts modules, not tensors: two enumerations)."""
    spec, setup = tiny_spec(family), _setup(method, "bf16")
    try:
        one = state_bytes(spec, setup)
    except ConfigError:
        pytest.skip(f"{method} does not apply to {family}")
    tensors = rank_tensors(spec, setup)
    assert sum(t.nbytes(t.numel) for t in tensors if t.trainable) == one.params_trainable
    frozen = sum(t.nbytes(t.numel) for t in tensors if not t.trainable)
    if method == "qlora":  # 4-bit weights: block constants rounded up per tensor here, over the model in params.py
        quantized_tensors = sum(1 for t in tensors if t.elem_bytes < 1)
        assert abs(frozen - one.params_frozen) <= 5 * quantized_tensors
    else:
        assert frozen == one.params_frozen


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("world", [2, 4, 8])
def test_fsdp_shards_match_torch_shapes(family: str, world: int) -> None:
    """Per-rank parameter bytes = sum over the model's parameters (as transformers builds them, on meta) of
    ceil(dim0 / n) x (numel / dim0) x 4 B: FSDP2 shards dim 0, padded to a multiple of n
    (torch/distributed/fsdp/_fully_shard/_fsdp_param.py)."""
    torch = pytest.importorskip("torch")
    from memprof.runtime.build import build_base_model

    spec, setup = tiny_spec(family), _setup("full", world_size=world, strategy="fsdp")
    model = build_base_model(spec, setup.on_one_device(), "meta")
    seen: set[int] = set()
    expected = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        dim0 = p.shape[0]
        expected += math.ceil(dim0 / world) * (p.numel() // dim0) * 4
    share = rank_share(spec, setup, state_bytes(spec, one_device_setup(setup)), tracked=False)
    assert share.states.params_trainable == expected
    assert share.states.gradients == expected
    assert torch is not None


def test_fsdp_hand_arithmetic_tiny_llama() -> None:
    """Tiny LLaMA (h=32, I=64, 4 heads of 8, 2 kv heads, V=100, 2 layers, untied), full fp32 at n=8:
    embed 100x32 -> ceil(100/8)=13 rows x 32; per block q 32x32 (4 rows), k 16x32 (2), v 16x32 (2), o 32x32 (4),
    gate 64x32 (8), up 64x32 (8), down 32x64 (4 rows x 64), 2 norms of 32 (4 each); final norm 32 (4);
    lm_head 100x32 (13 rows)."""
    spec, setup = tiny_spec("llama"), _setup("full", world_size=8, strategy="fsdp")
    block = (4 * 32 + 2 * 32 + 2 * 32 + 4 * 32 + 8 * 32 + 8 * 32 + 4 * 64 + 4 + 4) * 4
    rank = (13 * 32 + 2 * block // 4 + 4 + 13 * 32) * 4
    assert block == 4640 and rank == 12624
    share = rank_share(spec, setup, state_bytes(spec, one_device_setup(setup)), tracked=False)
    assert share.states.params_trainable == rank
    # AdamW: exp_avg + exp_avg_sq per shard element, plus one 4-byte step counter per tensor (CPU)
    tensors = 1 + 2 * 9 + 1 + 1
    assert share.states.optimizer_states == 2 * rank + 4 * tensors


def test_fsdp_mixed_precision_keeps_fp32_shards() -> None:
    """FSDP2's mixed precision (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) over fp32 parameters):
    the fp32 shards are the masters, so a rank holds the fp32 case's shards, states and gradients (tiny LLaMA at n=8:
    12,624 B of shards, hand arithmetic in test_fsdp_hand_arithmetic_tiny_llama) and no separate master copy; the
    blocks are gathered in bf16 (half the fp32 gather)."""
    spec = tiny_spec("llama")
    mixed = _setup("full", "bf16", regime="mixed", world_size=8, strategy="fsdp")
    share = rank_share(spec, mixed, state_bytes(spec, one_device_setup(mixed)), tracked=False)
    assert share.states.params_trainable == 12624 and share.states.gradients == 12624
    assert share.states.master_weights == 0
    assert share.states.optimizer_states == 2 * 12624 + 4 * 21
    fp32 = _setup("full", world_size=8, strategy="fsdp")
    gathered = {t.name: t.bytes for t in rank_share(spec, mixed, state_bytes(spec, one_device_setup(mixed)),
                                                      tracked=False).terms}
    gathered32 = {t.name: t.bytes for t in rank_share(spec, fp32, state_bytes(spec, one_device_setup(fp32)),
                                                        tracked=False).terms}
    block = "unsharded block (FSDP all-gather copy-out)"
    assert gathered[block] * 2 == gathered32[block]


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp-grad-op", "zero3"])
def test_full_finetuning_per_rank_peak_falls_with_world_size(strategy: str) -> None:
    spec = resolve_spec("meta-llama/Llama-3.1-8B")[0]
    peaks = [estimate(spec, resolve_setup(overrides={"dtype": "bf16", "world_size": n, "strategy": strategy}))
             .peak_bytes for n in (2, 4, 8, 16)]
    assert peaks == sorted(peaks, reverse=True)


def test_ddp_is_one_device_plus_buckets() -> None:
    """DDP replicates everything; its Reducer adds one flat copy of the trainable gradients (its buckets)."""
    spec = tiny_spec("gpt2")
    for method in ("full", "lora"):
        one = estimate(spec, _setup(method))
        ddp = estimate(spec, _setup(method, world_size=4, strategy="ddp"))
        assert ddp.peak_bytes - one.peak_bytes == one.trainable_params * 4
        assert ddp.peak.gradients - one.peak.gradients == one.trainable_params * 4


def test_hsdp_shards_within_the_group() -> None:
    """HSDP over 8 ranks in 2 nodes shards like FSDP over the 4 ranks of a node."""
    spec = tiny_spec("llama")
    hsdp = estimate(spec, _setup("full", world_size=8, strategy="hsdp", nodes=2))
    fsdp4 = estimate(spec, _setup("full", world_size=4, strategy="fsdp"))
    assert hsdp.peak_bytes == fsdp4.peak_bytes


def test_lora_frozen_base_is_sharded_under_fsdp_and_replicated_under_ddp_and_zero2() -> None:
    """What makes PEFT + sharding differ: the frozen base is sharded by FSDP and ZeRO-3 only."""
    spec = resolve_spec("meta-llama/Llama-3.1-8B")[0]
    one = state_bytes(spec, _setup("lora", "bf16"))
    for strategy, divided in (("fsdp", True), ("zero3", True), ("ddp", False), ("zero2", False)):
        setup = _setup("lora", "bf16", world_size=8, strategy=strategy)
        share = rank_share(spec, setup, state_bytes(spec, one_device_setup(setup)), tracked=False)
        if divided:
            assert share.states.params_frozen < one.params_frozen / 7
        else:
            assert share.states.params_frozen == one.params_frozen


# ---- DeepSpeed's own estimators (deepspeed/runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs,
# stage3.py estimate_zero3_model_states_mem_needs), written here as the reference: full fine-tuning, fp16/bf16 -----

def ds_zero2_gpu(total_params: int, gpus: int, cpu_offload: bool) -> int:
    return 2 * total_params if cpu_offload else 4 * total_params + int(16 * total_params / gpus)


def ds_zero3_gpu(total_params: int, largest_layer_params: int, gpus: int, cpu_offload: bool,
                 cpu_offload_params: bool) -> int:
    largest = 4 * largest_layer_params
    if cpu_offload:
        return largest if cpu_offload_params else largest + int(2 * total_params / gpus)
    return largest + int(18 * total_params / gpus)


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_zero_model_states_against_deepspeeds_estimators(gpus: int) -> None:
    """Full fine-tuning of Llama-3.1-8B in bf16. Where memprof and DeepSpeed's estimators count the same things they
    agree to rounding; they differ in exactly the gradient terms, which DeepSpeed's functions simplify:
    - ZeRO-2: DeepSpeed counts 2P of half gradients on every rank; stage 2 copies each gradient into the contiguous
      bucket as it is made and keeps only its partition (memprof: 2P/n partition + the 5e8-element bucket);
    - ZeRO-3: DeepSpeed's 18P/n has no half gradient partition; stage3.py keeps one (grad_partitions_flat_buffer,
      2P/n), and memprof counts it; its 4 x largest-layer term is memprof's gathered block instead.
    Everything else (half weights, fp32 masters, Adam states, fp32 gradients of the partition) matches."""
    spec = resolve_spec("meta-llama/Llama-3.1-8B")[0]
    P = spec_total = estimate(spec, _setup("full", "bf16")).total_params
    assert P == spec_total

    def states(strategy: str, offload: str = "none"):  # noqa: ANN202
        setup = resolve_setup(overrides={"dtype": "bf16", "world_size": gpus, "strategy": strategy,
                                         "offload": offload})
        return rank_share(spec, setup, state_bytes(spec, one_device_setup(setup)), tracked=False)

    z2 = states("zero2").states
    ds2 = ds_zero2_gpu(P, gpus, cpu_offload=False)
    half_grads_ds = 2 * P
    # the fp32 gradient of the partition (made at step()) is the size of the fp32 master partition
    ours_without_grads = z2.params_trainable + z2.optimizer_states + 2 * z2.master_weights
    assert ours_without_grads == pytest.approx(ds2 - half_grads_ds, rel=1e-6)
    # grads_in_partition: the rank's partition, plus the rest of a parameter straddling its edge (counted whole)
    largest = max(t.numel for t in rank_tensors(spec, _setup("full", "bf16")))
    assert 2 * P / gpus <= z2.gradients <= 2 * P / gpus + 2 * 2 * largest
    # at the step: that buffer, the flattened bf16 partition and its fp32 cast (or the norm's fp64 slice)
    assert z2.gradients + z2.grad_upcast >= z2.gradients + z2.master_weights + z2.master_weights // 2

    # stage 3 keeps parameters under stage3_param_persistence_threshold (1e5 elements: the norms) whole on each rank
    whole = sum(t.numel * 2 for t in rank_tensors(spec, _setup("full", "bf16")) if t.numel < 100_000)
    z3 = states("zero3").states
    ds3_without_layer = ds_zero3_gpu(P, 0, gpus, False, False)
    ours3 = z3.params_trainable + z3.optimizer_states + 2 * z3.master_weights
    assert abs(ours3 - ds3_without_layer) <= whole + 64
    assert z3.gradients == pytest.approx(2 * P / gpus, rel=2e-3)

    z2o = states("zero2", "optimizer").states
    assert z2o.params_trainable + z2o.params_frozen + z2o.optimizer_states + z2o.master_weights \
        == pytest.approx(ds_zero2_gpu(P, gpus, cpu_offload=True), abs=2 * 2 * gpus)  # flat buffer padded to 2n
    z3o = states("zero3", "optimizer").states
    assert abs(z3o.params_trainable + z3o.optimizer_states + z3o.master_weights
               - ds_zero3_gpu(P, 0, gpus, True, False)) <= whole + 64
    z3p = states("zero3", "params")
    assert z3p.states.params_trainable + z3p.states.optimizer_states == pytest.approx(0, abs=2e6)
    assert z3p.host_bytes is not None and z3p.host_bytes > 16 * P / gpus


def test_zero_bucket_is_deepspeeds_default_size() -> None:
    """reduce_bucket_size = 5e8 elements of the half dtype, whatever the model (stage_1_and_2.py backward)."""
    spec = tiny_spec("gpt2")
    one = estimate(spec, _setup("full", "bf16"))
    z2 = estimate(spec, _setup("full", "bf16", world_size=2, strategy="zero2"))
    assert z2.peak.gradients >= REDUCE_BUCKET * 2
    assert one.peak.gradients < REDUCE_BUCKET


def test_zero_partition_gradients_count_a_straddling_parameter_whole() -> None:
    """stage_1_and_2.py: the flat buffer is padded to a multiple of 2n; grads_in_partition holds every parameter
    that overlaps the rank's range whole. By hand, 3 tensors of 10, 7 and 5 elements (22), n = 2: padded to 24,
    S = 12; rank 0's range [0, 12) touches the first two (10 + 7 = 17, largest slice 10), rank 1's [12, 24) the
    last two (7 + 5 = 12, largest slice 5). Stage 1 walks them in that order: rank 0's range starts in tensor 0,
    rank 1's in tensor 1 (the straddling one)."""
    train = [RankTensor(10, 1, True, 4, -1), RankTensor(7, 1, True, 4, 0), RankTensor(5, 1, True, 4, -1)]
    parts = partition_grads(train, 2)
    assert (parts.s, parts.g, parts.big, parts.first) == (12, [17, 12], [10, 5], [0, 1])  # + each range's first
    assert parts.last == [1, 2]  # ... and last tensor: stage 2 allocates a rank's buffer when the backward reaches it


def test_zero3_fp32_masters_are_a_copy_of_the_partitions() -> None:
    """stage3.py _create_fp32_partitions shares the partition as the master only when its device equals
    ``self.device``, a string; torch.device never equals a string, so an fp32 run keeps a copy (measured: the engine's
    live storages hold two partitions)."""
    import torch

    assert torch.device("cpu") != "cpu" and torch.device("cuda", 0) != "cuda:0"
    spec = tiny_spec("gpt2")
    setup = _setup("full", "fp32", world_size=2, strategy="zero3")
    z3 = rank_share(spec, setup, state_bytes(spec, one_device_setup(setup)), tracked=False).states
    assert z3.master_weights == 4 * sum(-(-t.numel // 2) for t in rank_tensors(spec, setup) if t.trainable)


def test_zero_bucket_option_sets_the_bucket() -> None:
    """--zero-bucket N: N elements of the model dtype, in the backward's gradient peak (stage 2) or from the start
    (stage 3); HF Trainer's "auto" (hidden²) buckets are far below DeepSpeed's 5e8 default."""
    spec = tiny_spec("gpt2")
    big = estimate(spec, _setup("full", "bf16", world_size=2, strategy="zero2"))
    small = estimate(spec, _setup("full", "bf16", world_size=2, strategy="zero2", zero_bucket=32 * 32))
    assert big.peak.gradients >= REDUCE_BUCKET * 2 > small.peak_bytes  # a small model's peak is its bucket
    assert 32 * 32 * 2 <= small.peak.gradients  # the bucket, the partition gradients and what the segment made
    z3 = estimate(spec, _setup("full", "bf16", world_size=2, strategy="zero3", zero_bucket=1024))
    assert z3.steady_bytes - estimate(spec, _setup("full", "bf16", world_size=2, strategy="zero3",
                                                   zero_bucket=2048)).steady_bytes == -1024 * 2


@pytest.mark.parametrize("overrides, message", [
    ({"world_size": 2, "strategy": "fsdp", "zero_bucket": 1000}, "applies to --strategy zero1 / zero2 / zero3"),
    ({"world_size": 2, "strategy": "zero2", "zero_prefetch": 1000}, "applies to --strategy zero3 only"),
    ({"world_size": 2, "strategy": "zero3", "zero_bucket": 0}, "between 1 and"),
    ({"world_size": 2, "strategy": "zero3", "zero_persistence": 1.5}, "must be an integer"),
    ({"world_size": 2, "strategy": "zero2", "zero_efficient_linear": False}, "applies to --strategy zero3 only"),
    ({"world_size": 2, "strategy": "zero3", "zero_efficient_linear": "off"}, "must be true or false"),
])
def test_bad_zero_options_are_one_line(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _setup(**overrides)


@pytest.mark.parametrize("overrides, message", [
    ({"world_size": 4, "strategy": "fsdp", "grad_accum": 2}, "gradient accumulation"),
    ({"world_size": 4, "strategy": "fsdp", "offload": "optimizer"}, "CPUOffloadPolicy"),
    ({"world_size": 4, "strategy": "fsdp", "method": "lora", "dtype": "bf16", "regime": "mixed"},
     "full fine-tuning only"),
])
def test_unmodelled_combinations_are_one_line(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        estimate(tiny_spec("llama"), _setup(**overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"world_size": 6, "nodes": 4}, "multiple of nodes"),
    ({"world_size": 4, "strategy": "ddp", "offload": "params"}, "sharded parameters"),
    ({"world_size": 4, "strategy": "fsdp", "shard_size": 2}, "hsdp only"),
    ({"world_size": 8, "strategy": "hsdp", "shard_size": 3}, "does not divide"),
    ({"world_size": 4, "strategy": "zero4"}, "choose one of"),
])
def test_bad_parallel_options_are_one_line(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_setup(overrides=overrides)


def test_sharded_states_keep_unsharded_buffers_whole() -> None:
    """VeRA's shared projections are buffers, not parameters: FSDP does not shard them (every rank holds them)."""
    from memprof.analytic.params import vera_projection_params

    spec = tiny_spec("llama")
    setup = _setup("vera", world_size=4, strategy="fsdp")
    one = state_bytes(spec, setup.on_one_device())
    tensors = rank_tensors(spec, setup.on_one_device())
    ranked = sharded_states(spec, setup.on_one_device(), one, tensors, 4)
    frozen_shards = sum(t.nbytes(t.shard_numel(4)) for t in tensors if not t.trainable)
    assert ranked.params_frozen == frozen_shards + 4 * vera_projection_params(spec, setup.lora)
    assert ParallelSpec(world_size=4, strategy="fsdp").shard_group == 4


def test_deepspeed_linear_keeps_a_frozen_weights_input() -> None:
    """ZeRO-3's memory_efficient_linear (zero/linear.py LinearFunctionForZeroStage3) saves its input whatever needs
    a gradient; torch's linear keeps x only for the weight's gradient. By hand: x of 3 features needing a gradient,
    a frozen 3 -> 2 weight, fp32, x dropped by the script: torch keeps y (2 x 4 B per row), DeepSpeed y and x
    (2 x 4 + 3 x 4 = 20 B per row)."""
    from memprof.analytic.sim import Graph, P

    live = {}
    for ds in (False, True):
        g = Graph(device="cpu", ds_linear=ds)
        w = g.param(6, 2, "fp32", False, "w")
        x = g.new(P(bs=3), 3, "fp32", "x")
        x.rg = True  # as if made from something trainable
        g.linear(x, w, 2, "y")
        g.drop(x)
        live[ds] = g.live[0]
    assert live == {False: 8, True: 20}


def _zero3_replays(method: str, efficient_linear: bool | None = None):  # noqa: ANN202
    import dataclasses

    from memprof.analytic.compose import replay, structural

    spec = tiny_spec("llama")
    one = structural(resolve_setup(None, {"method": method, "batch_size": 2, "seq_len": 16, "device": "cpu",
                                          "dtype": "fp32"}))
    z3 = dataclasses.replace(one, parallel=ParallelSpec(world_size=2, strategy="zero3",
                                                        zero_efficient_linear=efficient_linear))
    return replay(spec, one), replay(spec, z3)


def test_zero3_saves_the_inputs_of_frozen_linears() -> None:
    """LoRA on q/v of tiny LLaMA (h 32, intermediate 64), fp32: under ZeRO-3 each block also keeps the inputs of its
    frozen MLP projections, the post-attention norm's output (b*s x 32 x 4 B) and act * up (b*s x 64 x 4 B), and the
    head keeps the final norm's output (b*s x 32 x 4 B); nothing else changes (measured on DeepSpeed's engine:
    estimates/validation.md part I, the LLaMA LoRA rows)."""
    plain, z3 = _zero3_replays("lora")
    before = {(seg, label): nbytes for seg, label, _, nbytes in plain.saved_terms}
    extra = {(seg, label): nbytes[0] for seg, label, _, nbytes in z3.saved_terms if (seg, label) not in before}
    assert extra == {(f"layer{i}", label): width * 4 for i in (0, 1)
                     for label, width in (("post_attention_layernorm out", 32), ("act * up", 64))} | {
        ("head", "final norm out"): 32 * 4}
    full_plain, full_z3 = _zero3_replays("full")
    assert full_plain.saved_terms == full_z3.saved_terms  # every weight trains: torch keeps those inputs already
    # memory_efficient_linear off (--no-zero-efficient-linear): torch's own linear, nothing extra kept
    _, off = _zero3_replays("lora", efficient_linear=False)
    assert off.saved_terms == plain.saved_terms


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_zero3_releases_the_first_blocks_frozen_projections(method: str) -> None:
    """A frozen module whose input needs no gradient (the first block's q/k/v under PEFT: its input comes from frozen
    embeddings) has no backward; DeepSpeed's coordinator releases it after its forward. The adapter's site (o_proj)
    takes part in the backward through the adapter's forward hook. Elements: input norm 32, q 32 x 32, k and v
    32 x 16 (2 KV heads of 8); the embeddings 100 x 32."""
    _, z3 = _zero3_replays(method)
    assert sorted(z3.idle_params) == sorted([("embed", 3200, "fp32"), ("layer0", 32, "fp32"),
                                             ("layer0", 1024, "fp32"), ("layer0", 512, "fp32"),
                                             ("layer0", 512, "fp32")])
    assert _zero3_replays("full")[1].idle_params == ()


def test_zero_overlap_doubles_the_bucket_and_makes_stage_1_reduce_in_the_hooks() -> None:
    """overlap_comm (stage_1_and_2.py setup_buckets): a second bucket of reduce_bucket_size elements beside the first,
    so by hand +1,024 x 2 B at a backward peak with the bucket alive (tiny GPT-2, bf16, bucket 1,024); stage 1 then
    reduces in the gradient hooks as stage 2 does (process_gradients; measured on DeepSpeed's engine: the same peak,
    estimates/validation.md part I, the overlap rows)."""
    spec = tiny_spec("gpt2")

    def peak(strategy: str, overlap: bool | None) -> int:
        return estimate(spec, _setup("full", "bf16", world_size=2, strategy=strategy, zero_bucket=1024,
                                     zero_overlap=overlap)).peak_bytes

    assert peak("zero2", True) - peak("zero2", None) == 1024 * 2
    assert peak("zero2", False) == peak("zero2", None)  # DeepSpeed's default below stage 3 is off
    assert peak("zero1", True) == peak("zero2", True) != peak("zero1", None)
    assert peak("zero3", True) == peak("zero3", False)  # stage 3's single bucket either way
    with pytest.raises(ConfigError, match="--zero-overlap applies to --strategy zero1 / zero2 / zero3 only"):
        _setup("full", "bf16", world_size=2, strategy="fsdp", zero_overlap=True)


@pytest.mark.parametrize("model", ["bert-base-uncased", "gpt2", "Qwen2.5-0.5B", "gemma-2-2b", "OLMoE-1B-7B-0924",
                                   "Phi-3-mini-4k-instruct"])
def test_zero3_releases_nothing_a_backward_needs(model: str) -> None:
    """Full fine-tuning: every module's output needs a gradient, so no parameter is released after its forward; with
    adapters only the embeddings' and the first block's frozen modules before its first adapter are (Gemma's norm
    weights reach their op through 1 + w, MoE experts through their own ops: they count as read)."""
    import dataclasses

    from memprof.analytic.compose import replay, structural

    spec = resolve_spec(model)[0]
    for method in ("full", "adapter"):
        setup = _setup(method, "bf16", world_size=2, strategy="zero3")
        z3 = dataclasses.replace(structural(one_device_setup(setup)), parallel=setup.parallel)
        idle = {seg for seg, _, _ in replay(spec, z3).idle_params}
        assert idle <= ({"embed", "layer0"} if method == "adapter" else set()), (method, idle)


# ---- ZeRO under torch_autocast (--regime amp) -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", ["full", "lora", "adapter", "ia3", "qlora"])
def test_linear_flags_follow_deepspeeds_autocast_rule(family: str, method: str) -> None:
    """DeepSpeed's torch_autocast reduces a gradient in the autocast dtype when its parameter belongs to a module whose
    class is exactly torch.nn.Linear (runtime/torch_autocast.py init_autocast_params: ``module.__class__ in
    LOWER_PRECISION_SAFE_MODULES``, then ``module.parameters(recurse=False)``): that rule run on the real model with
    the real method, built on meta, gives the same trainable (numel, linear) multiset as rank_tensors. GPT-2's Conv1D
    and QLoRA's Linear4bit are not nn.Linear; a tied head's nn.Linear holds the word embedding."""
    torch = pytest.importorskip("torch")
    from collections import Counter

    from memprof.runtime.build import apply_method, build_base_model

    spec, setup = tiny_spec(family), _setup(method, "bf16", regime="amp")
    try:
        tensors = rank_tensors(spec, setup)
    except ConfigError:
        pytest.skip(f"{method} is not placed per tensor")
    try:
        model = apply_method(build_base_model(spec, setup, "meta"), spec, setup)
    except Exception as e:  # noqa: BLE001 - bitsandbytes' 4-bit layers need their package
        pytest.skip(f"{method} on meta: {e}")
    linear = {id(p) for m in model.modules() if m.__class__ is torch.nn.Linear for p in m.parameters(recurse=False)}
    seen: dict[int, object] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    real = Counter((p.numel(), id(p) in linear) for p in seen.values() if p.requires_grad)
    ours = Counter((t.numel, t.linear) for t in tensors if t.trainable)
    assert ours == real


def test_zero_autocast_buckets_one_per_communication_dtype() -> None:
    """Under torch_autocast each communication dtype has its own bucket of reduce_bucket_size elements
    (stage_1_and_2.py / stage3.py ``ipg_buckets[comm_dtype]``). Stage 3 holds its bucket from the start, so between
    steps (bucket 1,024): tiny GPT-2 full trains Conv1D and norm weights (fp32 bucket) and the tied embedding, the
    head's nn.Linear (a bf16 bucket too): 1,024 x (4 + 2) B against the fp32 run's 1,024 x 4 B, +2,048 B with every
    other state equal (fp32 weights, gradients, masters and Adam states); tiny LLaMA LoRA trains only nn.Linear
    (lora_A / lora_B): one bf16 bucket, -2,048 B."""
    for family, method, diff in (("gpt2", "full", 1024 * 2), ("llama", "lora", -1024 * 2)):
        spec = tiny_spec(family)

        def steady(dtype: str, **kw: object) -> int:
            return estimate(spec, _setup(method, dtype, world_size=2, strategy="zero3", zero_bucket=1024,
                                         **kw)).steady_bytes

        assert steady("bf16", regime="amp") - steady("fp32") == diff, family


def test_zero3_autocast_keeps_fp32_inputs_and_caches_no_weight() -> None:
    """ZeRO-3's linear under autocast (zero/linear.py): LinearFunctionForZeroStage3 is called with the fp32 input
    and parameter and saves those; its matmul reads ``weight.t()``, a view, which autocast's cache skips. Tiny LLaMA
    full fine-tuning, b*s = 32 tokens: each block keeps its input norm's output once in fp32 (32 x 32 x 4 B) where
    torch's autocast linear keeps q's, k's and v's half copies (3 x 32 x 32 x 2 B), and no half weight copy is
    carried through the forward."""
    import dataclasses

    from memprof.analytic.compose import replay, structural

    spec = tiny_spec("llama")
    one = structural(resolve_setup(None, {"method": "full", "batch_size": 2, "seq_len": 16, "device": "cpu",
                                          "dtype": "bf16", "regime": "amp"}))
    plain, z3 = replay(spec, one), replay(spec, dataclasses.replace(one, parallel=ParallelSpec(
        world_size=2, strategy="zero3")))

    def kept(rep, seg: str, label: str) -> int:  # noqa: ANN001
        return sum(n[0] * 32 for s, lab, _, n in rep.saved_terms if s == seg and lab == label)

    assert kept(z3, "layer0", "input_layernorm out") == 32 * 32 * 4
    assert sum(kept(plain, "layer0", f"self_attn.{p}_proj (autocast half copy)") for p in "qkv") == 3 * 32 * 32 * 2
    assert not any("weight copy" in lab for _, lab, _, _ in z3.saved_terms)
    assert any("weight copy" in lab for _, lab, _, _ in plain.saved_terms)
