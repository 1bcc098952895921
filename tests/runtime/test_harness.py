"""The in-process harness on CPU: every method on a tiny model of each family, checked for sanity."""

from __future__ import annotations

import functools

import pytest
import torch

from refusals import skip_if_refused
from tiny_configs import tiny_spec
from memprof.config import AdapterSpec, Device, Dtype, Method, PromptLearningSpec, QuantSpec, RunSetup, with_method_defaults
from memprof.errors import ConfigError, DeviceUnavailableError
from memprof.analytic.flops import step_flops
from memprof.analytic.params import method_params
from memprof.runtime import harness
from memprof.runtime.harness import is_oom, run_measurement
from memprof.records import Measurement

FAMILIES = ("bert", "gpt2", "llama")
METHODS = (Method.full, Method.lora, Method.adapter, Method.bitfit, Method.ia3, Method.prefix, Method.prompt)
B, S = 2, 16
TIMED = 3


def setup_for(method: Method, **kw: object) -> RunSetup:
    options: dict[str, object] = {}
    if method is Method.adapter:
        options["adapter"] = AdapterSpec(bottleneck=8)
    if method in (Method.prefix, Method.prompt):
        options["prompt"] = PromptLearningSpec(num_virtual_tokens=4)
    fields = {"batch_size": B, "seq_len": S, "dtype": Dtype.fp32, "device": Device.cpu, **options, **kw}
    return with_method_defaults(RunSetup(method=method, **fields))


@functools.cache
def measured(family: str, method: Method) -> Measurement:
    return run_measurement(tiny_spec(family), setup_for(method), warmup_steps=1, timed_steps=TIMED)


CASES = [(f, m) for f in FAMILIES for m in METHODS if not (f == "llama" and m is Method.bitfit)]


@pytest.mark.parametrize(("family", "method"), CASES, ids=[f"{f}-{m.value}" for f, m in CASES])
def test_record_is_sane(family: str, method: Method) -> None:
    spec, setup = tiny_spec(family), setup_for(method)
    skip_if_refused(spec, setup, lambda: run_measurement(spec, setup, warmup_steps=1, timed_steps=1))
    m = measured(family, method)
    counts = method_params(spec, setup)
    assert m.status == "ok" and m.device == "cpu"
    assert (m.trainable_params, m.total_params) == (counts.trainable, counts.total)
    # fp32: every parameter is 4 bytes and all of them are alive at the peak
    assert m.peak_bytes >= 4 * m.total_params
    bd = m.breakdown
    assert bd.total_bytes == m.tracker_peak_bytes == m.peak_bytes  # CPU: the tracker's peak is the peak
    assert bd.params_trainable == 4 * m.trainable_params
    assert bd.params_frozen >= 4 * (m.total_params - m.trainable_params)  # + buffers
    # AdamW: two fp32 moments per trainable parameter (+ a 4-byte step counter per tensor)
    assert 8 * m.trainable_params <= bd.optimizer_states <= 8 * m.trainable_params + 4 * 1024
    assert bd.inputs == 8 * B * S + (8 * B if spec.task.value == "seq-cls" else 0)  # int64 ids (+ labels)
    assert m.peak_phase in ("forward", "backward", "optimizer")
    assert 4 * m.total_params <= m.steady_bytes < m.peak_bytes
    assert len(m.step_times_s) == TIMED and all(t > 0 for t in m.step_times_s)
    assert m.step_time_p10_s <= m.step_time_median_s <= m.step_time_p90_s
    assert m.tokens_per_s == pytest.approx(B * S / m.step_time_median_s)
    assert m.samples_per_s == pytest.approx(B / m.step_time_median_s)
    assert m.flops_per_step == step_flops(spec, setup).total_flops
    assert m.mfu is None and m.reserved_bytes is None and m.energy_per_step_j is None  # CUDA/NVML only
    assert m.rss_peak_bytes > 0
    assert m.env.torch_version == torch.__version__ and m.env.cpu_threads == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_peaks_below_full(family: str) -> None:
    full = measured(family, Method.full).peak_bytes
    cheaper = [Method.lora, Method.adapter] + ([Method.bitfit] if family != "llama" else [])
    for method in cheaper:
        assert measured(family, method).peak_bytes < full, method.value


def test_bitfit_on_llama_says_why() -> None:
    with pytest.raises(ConfigError, match="BitFit trains nothing"):
        run_measurement(tiny_spec("llama"), setup_for(Method.bitfit), warmup_steps=1, timed_steps=1)


def test_progress_reports_every_phase() -> None:
    calls: list[tuple[str, int, int]] = []
    run_measurement(tiny_spec("gpt2"), setup_for(Method.lora), warmup_steps=2, timed_steps=2,
                    progress=lambda *a: calls.append(a))
    assert calls == [("build", 0, 1), ("build", 1, 1), ("warmup", 1, 2), ("warmup", 2, 2), ("timed", 1, 2),
                     ("timed", 2, 2), ("breakdown", 0, 1), ("breakdown", 1, 1)]


def test_cpu_without_breakdown_has_no_peak() -> None:
    m = run_measurement(tiny_spec("gpt2"), setup_for(Method.lora), warmup_steps=1, timed_steps=1, breakdown=False)
    assert m.status == "ok" and m.peak_bytes is None and m.breakdown is None
    assert any("not measured" in n for n in m.extra["notes"])


def test_checkpointing_keeps_fewer_activations() -> None:
    spec = tiny_spec("llama", num_hidden_layers=4)
    plain = run_measurement(spec, setup_for(Method.full), warmup_steps=1, timed_steps=1)
    ckpt = run_measurement(spec, setup_for(Method.full, grad_checkpointing=True), warmup_steps=1, timed_steps=1)
    assert ckpt.status == "ok"
    assert ckpt.trainable_params == plain.trainable_params
    assert ckpt.peak_bytes < plain.peak_bytes


def test_oom_is_a_result(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*_a: object, **_k: object) -> list[float]:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(harness, "run_timed", no_memory)
    m = run_measurement(tiny_spec("gpt2"), setup_for(Method.lora), warmup_steps=1, timed_steps=1)
    assert m.status == "oom" and "during timed" in m.message and "can't allocate" in m.message
    assert m.peak_bytes is None and m.env is not None


def test_other_errors_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object, **_k: object) -> list[float]:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(harness, "run_timed", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_measurement(tiny_spec("gpt2"), setup_for(Method.lora), warmup_steps=1, timed_steps=1)


def test_is_oom() -> None:
    assert is_oom(MemoryError())
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert not is_oom(RuntimeError("expected scalar type Float"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_cuda_without_cuda_is_refused() -> None:
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        run_measurement(tiny_spec("gpt2"), setup_for(Method.lora, device=Device.cuda))


def test_qlora_on_cpu_is_refused() -> None:
    setup = with_method_defaults(RunSetup(method=Method.qlora, batch_size=B, seq_len=S, dtype=Dtype.bf16,
                                          device=Device.cpu, quant=QuantSpec()))
    with pytest.raises(DeviceUnavailableError, match="QLoRA"):
        run_measurement(tiny_spec("llama"), setup)


def test_step_counts_are_checked() -> None:
    with pytest.raises(ConfigError, match=">= 1"):
        run_measurement(tiny_spec("gpt2"), setup_for(Method.lora), warmup_steps=0)
