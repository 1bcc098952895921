"""The per-rank traced estimate under data parallelism (runtime/sharded_trace.py): rank 0 of N on torch's fake
process group, checked against hand arithmetic of FSDP2's padded shards, against the single-device trace (DDP), and
between strategies. The tiny LLaMA (tests/tiny_configs.py): h=32, 2 blocks, q/o 32x32, k/v 16x32 (2 KV heads of
8), gate/up 64x32, down 32x64, two RMSNorms of 32 per block, a final norm, embedding and untied head 100x32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tiny_configs import LLAMA, tiny_spec  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from memprof.cli import app  # noqa: E402
from memprof.errors import UnsupportedModelError  # noqa: E402
from memprof.records import Estimate, MemoryBreakdown  # noqa: E402
from memprof.resolve import resolve_setup  # noqa: E402
from memprof.runtime.trace import trace  # noqa: E402

FP32 = 4


def _setup(world_size: int = 1, strategy: str = "fsdp", **options: object):  # noqa: ANN202
    parallel = {"world_size": world_size, "strategy": strategy} if world_size > 1 else {}
    return resolve_setup(None, {"batch_size": 2, "seq_len": 16, "dtype": "fp32", "device": "cpu", **parallel,
                                **options})


@functools.cache
def _traced(world_size: int = 1, strategy: str = "fsdp", **options: object) -> Estimate:
    """The tiny LLaMA's trace (b=2, s=16, fp32 on CPU unless ``options`` say otherwise), once per setup."""
    return trace(tiny_spec("llama"), _setup(world_size, strategy, **options))


def _phases(est: Estimate) -> dict[str, MemoryBreakdown]:
    return {phase.value: bd for phase, bd in est.phase_peaks}


def rows(dim0: int, n: int) -> int:
    """Rows of a parameter rank 0 holds: FSDP2 pads dim 0 to a multiple of n and gives each rank an equal chunk."""
    return -(-dim0 // n)


def llama_shards(n: int) -> list[int]:
    """Elements of each tiny-LLaMA parameter's shard on rank 0 of n, by FSDP group: the root (embedding, final norm,
    head), then each block."""
    block = [rows(32, n) * 32, rows(16, n) * 32, rows(16, n) * 32, rows(32, n) * 32,  # q, k, v, o
             rows(64, n) * 32, rows(64, n) * 32, rows(32, n) * 64,                    # gate, up, down
             rows(32, n), rows(32, n)]                                               # two RMSNorms
    return [rows(100, n) * 32, rows(32, n), rows(100, n) * 32, *block, *block]


@pytest.mark.parametrize("n", [2, 3, 8])
def test_fsdp_rank_holds_padded_shards_of_weights_gradients_and_adam_states(n: int) -> None:
    est = _traced(n)
    optimizer = _phases(est)["optimizer"]  # weights, their gradients and both Adam moments are all alive here
    # n=1: 2 x 3,200 (embedding, head) + 32 (final norm) + 2 x 9,280 (blocks) = 24,992 elements, 99,968 bytes;
    # n=3: 2 x 34 x 32 + 11 + 2 x (11x32 + 6x32 + 6x32 + 11x32 + 22x32 + 22x32 + 11x64 + 11 + 11) = 8,631 elements
    shard_bytes = sum(llama_shards(n)) * FP32
    assert optimizer.params_trainable == shard_bytes
    assert optimizer.gradients == shard_bytes          # views of each group's reduce-scatter output
    assert optimizer.optimizer_states == 2 * shard_bytes  # exp_avg, exp_avg_sq: DTensors of the same shards
    assert est.total_params == est.trainable_params == 24_992  # the whole model's, not the rank's
    assert "rank 0 of fsdp x" in est.notes[-1]


def test_fsdp_gathers_the_root_and_one_block_at_a_time() -> None:
    # reshard_after_forward: each block's padded unsharded weights exist only while it runs (FSDP2 resizes their
    # storage, which the tracker follows); the root's stay gathered from its forward to its backward. n=3 pads:
    # root (102x32 embedding, 33 norm, 102x32 head), block (33+18+18+33+66+66 rows x 32, 33x64, 33 + 33).
    est = _traced(3)
    root = (102 * 32 + 33 + 102 * 32) * FP32
    block = ((33 + 18 + 18 + 33 + 66 + 66) * 32 + 33 * 64 + 33 + 33) * FP32
    assert _phases(est)["forward"].weight_copies == root + block
    assert _phases(est)["backward"].weight_copies == root + block
    assert _phases(est)["optimizer"].weight_copies == 0  # all resharded after the backward
    grad_op = _traced(3, "fsdp-grad-op")
    assert _phases(grad_op)["forward"].weight_copies == root + 2 * block  # kept from forward to backward


def test_cuda_target_rounds_each_shard_to_512_bytes() -> None:
    est = _traced(4, device="cuda")
    optimizer = _phases(est)["optimizer"]

    def blocks(nbytes: int) -> int:
        return -(-nbytes // 512) * 512

    shards = llama_shards(4)
    # one storage per parameter shard (and per Adam moment); one reduce-scatter output per FSDP group for gradients
    assert optimizer.params_trainable == sum(blocks(e * FP32) for e in shards)
    assert optimizer.optimizer_states == 2 * sum(blocks(e * FP32) for e in shards)
    groups = [shards[:3], shards[3:12], shards[12:]]
    assert optimizer.gradients == sum(blocks(sum(g) * FP32) for g in groups)
    assert all(v % 512 == 0 for bd in _phases(est).values() for v in bd.as_dict().values())


def test_more_ranks_hold_less_and_grad_op_keeps_blocks_gathered() -> None:
    one = _traced()
    fsdp = {n: _traced(n) for n in (2, 4, 8)}
    assert one.steady_bytes > fsdp[2].steady_bytes > fsdp[4].steady_bytes > fsdp[8].steady_bytes
    assert one.peak_bytes > fsdp[2].peak_bytes > fsdp[4].peak_bytes > fsdp[8].peak_bytes
    grad_op = _traced(4, "fsdp-grad-op")
    for phase in ("forward", "backward"):
        assert _phases(grad_op)[phase].total_bytes >= _phases(fsdp[4])[phase].total_bytes
    assert _phases(grad_op)["forward"].total_bytes > _phases(fsdp[4])["forward"].total_bytes
    assert grad_op.steady_bytes == fsdp[4].steady_bytes  # the same shards between steps


def test_hsdp_rank_holds_what_fsdp_over_its_shard_group_holds() -> None:
    # 4 ranks on 2 nodes: shard over the node's 2 ranks, replicate across nodes (the all-reduce is in place)
    hsdp, fsdp = _traced(4, "hsdp", nodes=2), _traced(2)
    assert _phases(hsdp) == _phases(fsdp) and hsdp.steady_bytes == fsdp.steady_bytes


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ddp_is_the_single_device_step_plus_its_gradient_buckets(method: str) -> None:
    single, ddp = _traced(method=method), _traced(2, "ddp", method=method)
    # the Reducer's buckets hold one more copy of every trainable gradient (fp32), from construction on
    bucket_bytes = single.trainable_params * FP32
    assert ddp.steady_bytes == single.steady_bytes + bucket_bytes
    for phase, bd in _phases(single).items():
        expected = dataclasses.replace(bd, gradients=bd.gradients + bucket_bytes)
        assert _phases(ddp)[phase] == expected


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_zero_is_refused_in_one_line(strategy: str) -> None:
    with pytest.raises(UnsupportedModelError) as exc:
        trace(tiny_spec("llama"), _setup(4, strategy))
    message = str(exc.value)
    assert "\n" not in message and "DeepSpeed" in message and "analytic estimate" in message


def test_fsdp_mixed_regime_keeps_fp32_shards_and_no_master_copy() -> None:
    """FSDP's mixed precision (parallel.wrap_for_strategy: MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32) over a model built in fp32): between steps a rank holds exactly what the fp32 run holds (fp32
    shards, fp32 AdamW states), no master copy, and it gathers its blocks in bf16 (less than the fp32 run)."""
    mixed, fp32 = _traced(8, dtype="bf16", regime="mixed"), _traced(8)
    assert mixed.steady_bytes == fp32.steady_bytes
    assert all(bd.master_weights == 0 for _, bd in mixed.phase_peaks)
    assert mixed.peak.params_trainable == fp32.peak.params_trainable
    assert mixed.peak.weight_copies < fp32.peak.weight_copies


def test_deeper_model_is_extrapolated_exactly_under_fsdp() -> None:
    # per rank every block adds its shards and nothing else (one block is gathered at a time): affine in depth
    spec = tiny_spec("llama", num_hidden_layers=4)
    setup = _setup(4, device="cuda")
    auto, full = trace(spec, setup), trace(spec, setup, layers="full")
    assert "depths 2 and 3, extrapolated to 4" in auto.notes[0]
    assert _phases(auto) == _phases(full) and auto.steady_bytes == full.steady_bytes


def test_estimate_trace_per_rank_from_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA))
    r = CliRunner().invoke(app, ["estimate", str(config), "--trace", "--world-size", "4", "--strategy", "fsdp",
                                 "-b", "2", "-s", "16", "--dtype", "fp32", "--device", "cpu", "-f", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["estimate"]["kind"] == "traced"
    assert doc["estimate"]["peak_bytes"] == _traced(4).peak_bytes
