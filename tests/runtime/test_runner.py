"""Isolation and persistence: JSON round trips, atomic JSONL, and worker processes that succeed, run out of
memory, time out or crash, each recorded as one valid line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_configs import tiny_spec
from memprof.config import (AdapterSpec, AdapterVariant, AttnImpl, Device, Dtype, IA3Spec, LoraSpec, Method,
                            Optimizer, Overheads, ParallelSpec, PromptLearningSpec, QuantSpec, Regime, RunSetup, Strategy,
                            with_method_defaults)
from memprof.errors import ConfigError
from memprof.hub import resolve_spec
from memprof.records import EnvInfo, Measurement, MemoryBreakdown
from memprof.runtime import runner
from memprof.runtime.runner import (append_jsonl, default_name, measure, measurement_from_dict, measurement_to_dict,
                                    read_measurements, setup_from_json, setup_to_json, spec_from_json, spec_to_json)

CPU = {"batch_size": 2, "seq_len": 16, "dtype": Dtype.fp32, "device": Device.cpu}


# ---- JSON round trips ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", [
    RunSetup(),
    with_method_defaults(RunSetup(method=Method.lora, lora=LoraSpec(r=16, targets=("q_proj", "k_proj"), bias="all"))),
    with_method_defaults(RunSetup(method=Method.qlora, quant=QuantSpec(quant_type="fp4", blocksize=128))),
    RunSetup(method=Method.adapter, adapter=AdapterSpec(variant=AdapterVariant.pfeiffer, bottleneck=None,
                                                        reduction_factor=16, train_norms=True)),
    RunSetup(method=Method.ia3, ia3=IA3Spec(targets=("k", "v"), feedforward=("v",))),
    RunSetup(method=Method.prefix, prompt=PromptLearningSpec(num_virtual_tokens=7, projection=True)),
    RunSetup(dtype=Dtype.fp16, regime=Regime.mixed, optimizer=Optimizer.adamw_8bit, attn_impl=AttnImpl.eager,
             grad_checkpointing=True, dropout=False, overheads=Overheads(cuda_context_bytes=1, allocator_reserve_frac=0.5)),
    RunSetup(parallel=ParallelSpec(world_size=4, strategy=Strategy.zero3, zero_bucket=4096, zero_prefetch=3686,
                                   zero_persistence=640)),
    RunSetup(parallel=ParallelSpec(world_size=2, strategy=Strategy.zero2, zero_overlap=True)),
], ids=["default", "lora", "qlora", "pfeiffer", "ia3", "prefix", "mixed", "zero3-buckets", "zero2-overlap"])
def test_setup_round_trip(setup: RunSetup) -> None:
    data = setup_to_json(setup)
    assert setup_from_json(json.loads(json.dumps(data))) == setup


_options = st.one_of(
    st.builds(lambda r, t: (Method.lora, {"lora": LoraSpec(r=r, targets=t)}), st.integers(1, 64),
              st.none() | st.lists(st.sampled_from(["q_proj", "v_proj", "query"]), min_size=1, max_size=2).map(tuple)),
    st.builds(lambda b: (Method.adapter, {"adapter": AdapterSpec(bottleneck=b)}), st.integers(1, 128)),
    st.builds(lambda n: (Method.prompt, {"prompt": PromptLearningSpec(num_virtual_tokens=n)}), st.integers(1, 50)),
    st.just((Method.full, {})), st.just((Method.bitfit, {})),
)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 1 << 20), s=st.integers(1, 1 << 22), dtype=st.sampled_from(list(Dtype)),
       opt=st.sampled_from(list(Optimizer)), attn=st.sampled_from(list(AttnImpl)), dev=st.sampled_from(list(Device)),
       ckpt=st.booleans(), method_options=_options)
def test_setup_round_trip_property(b, s, dtype, opt, attn, dev, ckpt, method_options) -> None:  # noqa: ANN001
    method, options = method_options
    setup = RunSetup(method=method, batch_size=b, seq_len=s, dtype=dtype, optimizer=opt, attn_impl=attn, device=dev,
                     grad_checkpointing=ckpt, **options)
    assert setup_from_json(json.loads(json.dumps(setup_to_json(setup)))) == setup


def test_setup_from_json_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="unknown setup option"):
        setup_from_json({"batch": 2})
    with pytest.raises(ConfigError, match="invalid setup"):
        setup_from_json({"dtype": "fp8"})
    with pytest.raises(ConfigError, match="unknown option"):
        setup_from_json({"method": "lora", "lora": {"rank": 4}})
    with pytest.raises(ConfigError, match="batch size"):
        setup_from_json({"batch_size": 0})


@pytest.mark.parametrize("spec", [tiny_spec("bert"), tiny_spec("gpt2"), tiny_spec("llama"),
                                  resolve_spec("roberta-base")[0], resolve_spec(params=1e9)[0]],
                         ids=["bert", "gpt2", "llama", "preset", "params"])
def test_spec_round_trip(spec) -> None:  # noqa: ANN001
    back = spec_from_json(json.loads(json.dumps(spec_to_json(spec))))
    assert back == spec and back.hf_config == spec.hf_config and back.source == spec.source


def test_measurement_round_trip() -> None:
    m = Measurement(spec_name="x", setup_row={"method": "lora"}, status="ok", device="cpu", peak_bytes=10,
                    breakdown=MemoryBreakdown(params_frozen=6, activations=4), step_times_s=(0.1, 0.2),
                    env=EnvInfo(memprof_version="0.1.0", python_version="3.11"), extra={"notes": ["n"]})
    assert measurement_from_dict(json.loads(json.dumps(measurement_to_dict(m)))) == m


def test_default_name() -> None:
    assert default_name(resolve_spec("roberta-base")[0]) == "FacebookAI_roberta-base"
    assert default_name(tiny_spec("gpt2")) == "tiny-gpt2"


# ---- JSONL ------------------------------------------------------------------------------------------------------
def test_truncated_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"n": 1})
    append_jsonl(path, {"n": 2, "pad": "x" * 100})
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # an interrupted write: the second record loses its tail
    with pytest.warns(UserWarning, match="truncated last line"):
        assert read_measurements(path) == [{"n": 1}]
    append_jsonl(path, {"n": 3})  # the next record starts on a line of its own
    with pytest.warns(UserWarning, match="invalid line 2"):
        assert read_measurements(path) == [{"n": 1}, {"n": 3}]


# ---- worker processes -------------------------------------------------------------------------------------------
def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_isolated_run_records_provenance(tmp_path: Path) -> None:
    spec, setup = tiny_spec("bert"), with_method_defaults(RunSetup(method=Method.lora, **CPU))
    phases: list[str] = []
    m = measure(spec, setup, out_dir=tmp_path, timed_steps=2, warmup_steps=1, cpu_threads=1,
                progress=lambda phase, step, total: phases.append(phase))
    assert m.status == "ok", m.message
    assert m.peak_bytes == m.breakdown.total_bytes and m.trainable_params == 2114
    assert phases[0] == "start" and phases[-1] == "breakdown" and "timed" in phases
    (record,) = _lines(tmp_path / "tiny-bert.jsonl")
    assert record["schema"] == runner.SCHEMA
    assert setup_from_json(record["setup"]) == setup and spec_from_json(record["spec"]) == spec
    assert measurement_from_dict(record["measurement"]) == m
    assert record["measurement"]["env"]["torch_version"] and record["measurement"]["env"]["cpu_threads"] == 1


def test_out_of_memory_is_recorded(tmp_path: Path) -> None:
    # a 4M x 64 fp32 embedding is 1 GiB; the worker may map only 256 MiB more than it has after imports
    spec = tiny_spec("bert", vocab_size=4_000_000, hidden_size=64, num_hidden_layers=1)
    setup = RunSetup(method=Method.full, **CPU)
    m = measure(spec, setup, out_dir=tmp_path, name="runs", memory_limit_bytes=256 * 2**20, cpu_threads=1)
    assert m.status == "oom" and "out of memory" in m.message, m.message
    (record,) = _lines(tmp_path / "runs.jsonl")
    assert record["measurement"]["status"] == "oom"


def test_timeout_is_recorded(tmp_path: Path) -> None:
    setup = RunSetup(method=Method.full, **CPU)
    m = measure(tiny_spec("gpt2"), setup, out_dir=tmp_path, name="runs", timeout_s=3, timed_steps=1_000_000)
    assert m.status == "timeout" and "timed out after 3 s" in m.message
    (record,) = _lines(tmp_path / "runs.jsonl")
    assert record["measurement"]["status"] == "timeout" and record["setup"]["device"] == "cpu"


def test_crash_in_the_model_is_recorded(tmp_path: Path) -> None:
    spec = tiny_spec("llama", hidden_act="no_such_activation")  # transformers fails while building
    m = measure(spec, RunSetup(method=Method.full, **CPU), out_dir=tmp_path, name="runs", cpu_threads=1)
    assert m.status == "error" and "no_such_activation" in m.message
    assert m.env is not None  # the worker reported where it ran before failing
    assert len(_lines(tmp_path / "runs.jsonl")) == 1


@pytest.mark.parametrize(("code", "expected"), [
    ("import sys; sys.stderr.write('boom\\n'); sys.exit(3)", "exited with status 3 without a result\nboom"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "killed by SIGSEGV"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "OOM killer"),
])
def test_dead_worker_becomes_an_error(code: str, expected: str) -> None:
    out = runner._run_child([sys.executable, "-c", code], {}, timeout_s=30, progress=None)
    assert out["status"] == "error" and expected in out["message"]


def test_in_process_mode(tmp_path: Path) -> None:
    setup = RunSetup(method=Method.lora, **CPU)
    with pytest.raises(ConfigError, match="isolate=True"):
        measure(tiny_spec("gpt2"), setup, isolate=False, timeout_s=5)
    m = measure(tiny_spec("gpt2"), setup, isolate=False, out_dir=tmp_path, warmup_steps=1, timed_steps=1)
    assert m.status == "ok"
    (record,) = read_measurements(tmp_path / "tiny-gpt2.jsonl")
    assert measurement_from_dict(record["measurement"]) == m


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="wait4's ru_maxrss in KiB")
@pytest.mark.parametrize(("available_mib", "status", "words"), [
    (96, "oom", "likely out of memory: worker killed by SIGKILL"),
    (64 * 1024, "error", "far from the limit: probably killed by someone else"),
], ids=["near the limit", "far from it"])
def test_a_sigkilled_worker_is_an_oom_when_its_rss_says_so(available_mib: int, status: str, words: str) -> None:
    """SIGKILL is what the kernel OOM killer sends: a worker that had touched 80 MiB of 96 MiB available is
    recorded as an OOM with that evidence; one that used a sliver of 64 GiB is an error, said as such."""
    code = "import os, signal; b = bytearray(80 * 2**20); os.kill(os.getpid(), signal.SIGKILL)"
    out = runner._run_child([sys.executable, "-c", code], {}, timeout_s=30, progress=None,
                            available_bytes=available_mib * 2**20)
    assert out["status"] == status and words in out["message"], out
    assert "peak RSS" in out["message"] and f"of {available_mib / 1024:.2f} GiB available" in out["message"]
