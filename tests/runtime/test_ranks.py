"""`memprof measure --nproc N`: real 2-rank gloo runs on CPU (FSDP2 through the Python API, DDP through the CLI),
a rank that fails and a job that hangs (recorded rows, no rank left running), and the checks made before any
process starts. Each launch imports the torch stack in two ranks (10-20 s on 2 cores), so the 2-rank runs are
module fixtures shared by the tests that read them."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from memprof.cli import app
from memprof.config import Device, Dtype, Loop, Method, Offload, ParallelSpec, Regime, RunSetup, Strategy
from memprof.errors import ConfigError, DependencyMissingError, DeviceUnavailableError
from memprof.hub import load_spec_any
from memprof.records import Measurement
from memprof.runtime import ranks
from memprof.runtime.rank_worker import FAULT_ENV
from memprof.runtime.ranks import RankedRun, check_ranks, deepspeed_config, measure_ranks, parallel_overrides
from tiny_configs import GPT2, tiny_spec

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
GPT2_ODD = {**GPT2, "vocab_size": 101}  # an odd dim 0: FSDP2 pads the embedding's shards to ceil(101 / 2) rows
CPU2 = {"batch_size": 2, "seq_len": 16, "dtype": Dtype.fp32, "device": Device.cpu}
TOKEN_ENV = "MEMPROF_TEST_RANKS_TOKEN"


def _setup(strategy: str, **overrides: object) -> RunSetup:
    return RunSetup(**{**CPU2, **overrides}, parallel=ParallelSpec(world_size=2, strategy=strategy))


def _left_running(token: str) -> list[int]:
    """Processes (other than this one) whose environment carries ``token``: a rank or torchrun left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if token.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RankedRun, Path]:
    out = tmp_path_factory.mktemp("fsdp")
    run = measure_ranks(tiny_spec("gpt2", vocab_size=101), _setup("fsdp"), out_dir=out, name="runs", timed_steps=2,
                        cpu_threads=1, timeout_s=150)
    return run, out / "runs.jsonl"


@pytest.fixture(scope="module")
def ddp_cli(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    folder = tmp_path_factory.mktemp("ddp")
    config = folder / "config.json"
    config.write_text(json.dumps(GPT2_ODD))
    r = CliRunner().invoke(app, ["measure", str(config), "--nproc", "2", "--strategy", "ddp", "--device", "cpu",
                                 "-b", "2", "-s", "16", "--dtype", "fp32", "--steps", "2", "--threads", "1",
                                 "--timeout", "150", "--out", str(folder), "--name", "runs", "-f", "json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output), config


# ---- real 2-rank runs --------------------------------------------------------------------------------------------
def test_fsdp_two_ranks_give_a_row_each_and_the_job_max(fsdp_run: tuple[RankedRun, Path]) -> None:
    run, path = fsdp_run
    assert [m.rank for m in run.ranks] == [0, 1] and run.job.rank is None and run.job.world_size == 2
    for m in run.rows:
        assert m.status == "ok", m.message
        assert m.peak_bytes > 0 and m.peak_bytes == m.breakdown.total_bytes
        assert "strategy=fsdp world_size=2" in m.setup_row["loop_options"]
    assert run.job.peak_bytes == max(m.peak_bytes for m in run.ranks)
    assert run.job.unobserved_peak_bytes == max(m.unobserved_peak_bytes for m in run.ranks) > 0
    assert run.job.extra["rank_peaks_bytes"] == [m.peak_bytes for m in run.ranks]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["measurement"]["rank"] for r in records] == [0, 1, None]  # the job's row last: compare keeps it
    assert all(r["setup"]["parallel"]["strategy"] == "fsdp" for r in records)


def test_fsdp_rank_holds_its_shard_of_the_parameters(fsdp_run: tuple[RankedRun, Path]) -> None:
    from memprof.runtime.build import build_base_model

    # FSDP2 (_fsdp_param.py, _init_sharded_param) splits dim 0 into world-size chunks and pads each rank's to the
    # first chunk's rows, ceil(dim0 / 2): a (101, 32) embedding is 51 rows on both ranks; fp32 = 4 bytes each
    model = build_base_model(tiny_spec("gpt2", vocab_size=101), _setup("fsdp"), "meta")
    shard_bytes = sum(4 * math.ceil(p.shape[0] / 2) * math.prod(p.shape[1:]) for p in model.parameters())
    full_bytes = sum(4 * p.numel() for p in model.parameters())
    run, _ = fsdp_run
    for m in run.ranks:
        assert m.breakdown.params_trainable == shard_bytes < full_bytes, m.rank
        assert m.total_params == sum(p.numel() for p in model.parameters())  # the model's count, not the shard's


def test_ddp_through_the_cli_replicates_the_parameters(ddp_cli: tuple[list[dict], Path]) -> None:
    rows, config = ddp_cli
    assert [r["rank"] for r in rows] == [0, 1, None] and all(r["world_size"] == 2 for r in rows)
    full_bytes = 4 * rows[0]["total_params"]  # fp32: every rank holds all of them
    for row in rows:
        assert row["status"] == "ok" and row["peak_bytes"] > 0 and row["loop_options"] == "strategy=ddp world_size=2"
        assert row["params_trainable_bytes"] == full_bytes, row["rank"]
    assert rows[2]["peak_bytes"] == max(rows[0]["peak_bytes"], rows[1]["peak_bytes"])
    records = [json.loads(line) for line in (config.parent / "runs.jsonl").read_text().splitlines()]
    assert [r["measurement"]["rank"] for r in records] == [0, 1, None]


TRACE_TOLERANCE = 0.01  # issue 12's bar: the traced per-rank peak within 1% of the real rank's


def test_fsdp_trace_matches_each_measured_rank(fsdp_run: tuple[RankedRun, Path]) -> None:
    """Each rank's tracker peak against the trace. gloo reduce-scatters from a copy of its input that its worker
    thread releases, now and then after the step has gone on (seen in about 1 run in 10 here, one rank reading 1-6%
    higher): a run that misses is measured once more, as benchmarks/validate_parallel.py does, and both readings
    are in the assertion message. A second miss fails."""
    from memprof.runtime.trace import trace

    est = trace(tiny_spec("gpt2", vocab_size=101), _setup("fsdp"))

    def misses(ranks: tuple) -> list[tuple[int | None, int]]:
        return [(m.rank, m.peak_bytes) for m in ranks
                if abs(est.peak_bytes - m.peak_bytes) > TRACE_TOLERANCE * m.peak_bytes]

    first = misses(fsdp_run[0].ranks)
    if first:
        again = measure_ranks(tiny_spec("gpt2", vocab_size=101), _setup("fsdp"), out_dir=None, timed_steps=2,
                              cpu_threads=1, timeout_s=150)
        assert not misses(again.ranks), (est.peak_bytes, first, misses(again.ranks))


def test_ddp_trace_matches_each_measured_rank(ddp_cli: tuple[list[dict], Path]) -> None:
    from memprof.runtime.trace import trace

    rows, config = ddp_cli
    est = trace(load_spec_any(str(config)), _setup("ddp"))
    for row in rows[:2]:
        assert abs(est.peak_bytes - row["peak_bytes"]) <= TRACE_TOLERANCE * row["peak_bytes"], (
            row["rank"], est.peak_bytes, row["peak_bytes"])


# ---- failures: recorded rows, nothing left running -----------------------------------------------------------
def test_a_failing_rank_is_a_recorded_row_and_stops_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = uuid.uuid4().hex
    monkeypatch.setenv(TOKEN_ENV, token)
    monkeypatch.setenv(FAULT_ENV, "1:raise")  # rank 1 raises right after joining the group
    run = measure_ranks(tiny_spec("gpt2"), _setup("ddp"), out_dir=tmp_path, name="runs", timeout_s=150,
                        cpu_threads=1)
    assert run.ranks[1].status == "error" and "injected fault in rank 1" in run.ranks[1].message
    assert run.ranks[0].status == "error" and "rank 0 ended without a result" in run.ranks[0].message
    assert run.job.status == "error" and "rank 1: error: RuntimeError: injected fault in rank 1" in run.job.message
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3
    assert _left_running(token) == []


def test_a_hanging_job_times_out_and_no_rank_outlives_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = uuid.uuid4().hex
    monkeypatch.setenv(TOKEN_ENV, token)
    monkeypatch.setenv(FAULT_ENV, "0:hang")  # rank 0 sleeps; rank 1 waits for it in DDP's first broadcast
    run = measure_ranks(tiny_spec("gpt2"), _setup("ddp"), out_dir=None, timeout_s=30, cpu_threads=1)
    assert [m.status for m in run.rows] == ["timeout", "timeout", "timeout"], [m.message for m in run.rows]
    assert "timed out after 30 s" in run.ranks[0].message
    assert _left_running(token) == []


# ---- refused before any process starts ------------------------------------------------------------------------
@pytest.mark.skipif(HAS_DEEPSPEED, reason="DeepSpeed is installed: ZeRO is measurable here")
def test_zero_without_deepspeed_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(GPT2))
    r = CliRunner().invoke(app, ["measure", str(config), "--nproc", "2", "--strategy", "zero3", "--out", str(tmp_path)])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: measuring ZeRO needs DeepSpeed: pip install 'memprof[deepspeed]'")
    assert "memprof estimate --strategy zero3 works without it" in r.output


@pytest.mark.parametrize(("args", "message"), [
    (["--nproc", "2", "--world-size", "4"], "--world-size 4 differs from --nproc 2"),
    (["--strategy", "fsdp"], "--strategy needs --nproc N with N > 1"),
    (["--nproc", "2", "--strategy", "fsdp", "--offload", "params"], "offload params with fsdp is not measured"),
    (["--nproc", "2", "--nodes", "2"], "--nodes 2 is for estimates"),
    (["--nproc", "2", "--strategy", "tp"], "strategy 'tp' is not supported"),
])
def test_invalid_rank_options_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(GPT2))
    r = CliRunner().invoke(app, ["measure", str(config), "--device", "cpu", "-s", "16", *args, "--out", str(tmp_path)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and message in r.output, r.output


def test_fewer_gpus_than_ranks_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceUnavailableError, match="--nproc 2 needs 2 GPUs, one per rank; this machine has 1"):
        check_ranks(_setup("fsdp", device=Device.cuda))


def test_nproc_one_is_the_single_device_run() -> None:
    assert parallel_overrides(nproc=1) == {} and parallel_overrides() == {}
    assert parallel_overrides(nproc=2) == {"world_size": 2}
    assert parallel_overrides(nproc=2, strategy="fsdp", world_size=2) == {"world_size": 2, "strategy": "fsdp"}
    with pytest.raises(ConfigError, match="--nproc must be >= 1"):
        parallel_overrides(nproc=0)
    with pytest.raises(ConfigError):
        ranks.measure_ranks(tiny_spec("gpt2"), RunSetup(**CPU2), out_dir=None)


def test_job_row_is_the_highest_rank_at_the_slowest_rank_s_step() -> None:
    base = {"spec_name": "m", "setup_row": {}, "device": "cpu"}
    fast = Measurement(status="ok", peak_bytes=10, step_time_median_s=1.0, samples_per_s=2.0, rank=0, **base)
    slow = Measurement(status="ok", peak_bytes=12, step_time_median_s=2.0, samples_per_s=1.0, rank=1, **base)
    job = ranks.job_row([fast, slow], base)
    assert job.rank is None and job.world_size == 2 and job.peak_bytes == 12 and job.extra["peak_rank"] == 1
    assert job.step_time_median_s == 2.0 and job.samples_per_s == pytest.approx(2.0)  # 2 ranks x 2 samples / 2 s
    oom = dataclasses.replace(slow, status="oom", message="out of memory during forward: OutOfMemoryError")
    failed = ranks.job_row([fast, oom], base)
    assert failed.status == "oom" and failed.message == "rank 1: oom: out of memory during forward: OutOfMemoryError"


def test_torchrun_command() -> None:
    argv = ranks.torchrun_argv(2, Path("/tmp/job.json"))
    assert argv[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "0",
                        "-m", "memprof.runtime.rank_worker", "/tmp/job.json"]


# ---- DeepSpeed ---------------------------------------------------------------------------------------------------
def test_deepspeed_config_follows_the_setup() -> None:
    setup = RunSetup(batch_size=4, dtype=Dtype.bf16, regime=Regime.mixed, device=Device.cuda, grad_accum=2,
                     loop=Loop.trainer, parallel=ParallelSpec(world_size=8, strategy=Strategy.zero3,
                                                              offload=Offload.params))
    config = deepspeed_config(setup)
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                           "offload_param": {"device": "cpu", "pin_memory": True}}
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 1.0 and config["optimizer"]["type"] == "AdamW"
    zero1 = deepspeed_config(RunSetup(dtype=Dtype.fp32, parallel=ParallelSpec(world_size=2, strategy="zero1")))
    assert zero1["zero_optimization"] == {"stage": 1} and "bf16" not in zero1 and "fp16" not in zero1
    with pytest.raises(ConfigError, match="no pure half regime"):
        deepspeed_config(RunSetup(dtype=Dtype.bf16, parallel=ParallelSpec(world_size=2, strategy="zero2")))
    # --regime amp: DeepSpeed's torch_autocast (fp32 weights; runtime/torch_autocast.py), not its bf16 / fp16
    amp = deepspeed_config(RunSetup(dtype=Dtype.fp16, regime=Regime.amp,
                                    parallel=ParallelSpec(world_size=2, strategy="zero2")))
    assert amp["torch_autocast"] == {"enabled": True, "dtype": "float16"} and "fp16" not in amp and "bf16" not in amp


def test_deepspeed_config_carries_the_bucket_sizes() -> None:
    """--zero-bucket / --zero-prefetch / --zero-persistence are DeepSpeed's zero_optimization keys (config.py)."""
    setup = RunSetup(dtype=Dtype.fp32, parallel=ParallelSpec(world_size=2, strategy="zero3", zero_bucket=36864,
                                                             zero_prefetch=33177, zero_persistence=1920))
    assert deepspeed_config(setup)["zero_optimization"] == {
        "stage": 3, "reduce_bucket_size": 36864, "stage3_prefetch_bucket_size": 33177,
        "stage3_param_persistence_threshold": 1920}
    overlap = RunSetup(dtype=Dtype.fp32, parallel=ParallelSpec(world_size=2, strategy="zero1", zero_overlap=False))
    assert deepspeed_config(overlap)["zero_optimization"] == {"stage": 1, "overlap_comm": False}
    linear = RunSetup(dtype=Dtype.fp32, parallel=ParallelSpec(world_size=2, strategy="zero3",
                                                              zero_efficient_linear=False))
    assert deepspeed_config(linear)["zero_optimization"] == {"stage": 3, "memory_efficient_linear": False}


def test_zero_checks_before_any_rank_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ranks.importlib.util, "find_spec", lambda name: object())  # as if DeepSpeed were installed
    check_ranks(_setup("zero2"))  # gloo on a CPU: DeepSpeed's CPU accelerator runs it
    with pytest.raises(ConfigError, match="offload optimizer on a CPU moves nothing"):
        check_ranks(RunSetup(**CPU2, parallel=ParallelSpec(world_size=2, strategy="zero2", offload="optimizer")))
    monkeypatch.setattr(ranks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DependencyMissingError, match="measuring ZeRO needs DeepSpeed"):
        check_ranks(_setup("zero2"))


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs DeepSpeed (pip install 'memprof[deepspeed]'); CI installs no "
                                               "extras, benchmarks/validate_zero.py runs it")
@pytest.mark.parametrize(("strategy", "family", "method", "precision"), [
    ("zero1", "gpt2", "full", "fp32"), ("zero2", "gpt2", "full", "fp32"), ("zero3", "gpt2", "full", "fp32"),
    ("zero3", "llama", "lora", "fp32"), ("zero2", "gpt2", "full", "amp"), ("zero3", "llama", "lora", "amp")])
def test_zero_two_gloo_ranks_against_the_estimate(strategy: str, family: str, method: str, precision: str,
                                                  tmp_path: Path) -> None:
    """DeepSpeed's engine on 2 gloo ranks (its CPU accelerator): each rank's allocator-level peak plus the storages
    alive before the step, against the per-rank estimate with the same bucket sizes (tiny widths: buckets of
    hidden² elements, HF Trainer's "auto"). LLaMA LoRA under ZeRO-3: DeepSpeed's linear keeps the frozen projections'
    inputs, and releases the first block's frozen q/k/v after their forward. amp: DeepSpeed's torch_autocast (fp32
    weights; a bf16 bucket for nn.Linear gradients beside the fp32 one)."""
    from memprof.analytic import estimate
    from memprof.resolve import resolve_setup

    dtype = {"fp32": {"dtype": "fp32"}, "amp": {"dtype": "bf16", "regime": "amp"}}[precision]
    setup = resolve_setup(None, {"batch_size": 2, "seq_len": 16, **dtype, "device": "cpu", "method": method,
                                 "world_size": 2, "strategy": strategy, "zero_bucket": 32 * 32,  # width 32
                                 **({"zero_prefetch": 921, "zero_persistence": 320} if strategy == "zero3" else {})})
    spec = tiny_spec(family)
    est = estimate(spec, setup).peak_bytes
    readings = []
    for _ in range(2):  # gloo frees some buffers from a worker thread, now and then late: one more run on a miss
        run = measure_ranks(spec, setup, out_dir=tmp_path, timed_steps=1, timeout_s=600)
        assert all(m.status == "ok" for m in run.rows), [m.message for m in run.rows]
        assert run.job.peak_bytes == max(m.peak_bytes for m in run.ranks)
        readings.append(run.job.peak_bytes)
        if abs(est - run.job.peak_bytes) / run.job.peak_bytes < 0.02:
            break
    assert abs(est - readings[-1]) / readings[-1] < 0.02, (est, readings)


@pytest.mark.skipif(not HAS_DEEPSPEED or torch.cuda.device_count() < 2,
                    reason="needs DeepSpeed (pip install 'memprof[deepspeed]') and 2 GPUs")
def test_zero3_two_ranks_on_gpus(tmp_path: Path) -> None:  # pragma: no cover - not run in CI
    setup = RunSetup(batch_size=2, seq_len=16, dtype=Dtype.bf16, regime=Regime.mixed, device=Device.cuda,
                     method=Method.full, parallel=ParallelSpec(world_size=2, strategy="zero3"))
    run = measure_ranks(tiny_spec("gpt2"), setup, out_dir=tmp_path, timed_steps=2, timeout_s=300)
    assert all(m.status == "ok" and m.peak_bytes > 0 for m in run.rows), [m.message for m in run.rows]
