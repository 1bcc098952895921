"""Issue 16 item 5: models whose traced step failed or lied where the real step runs or fails. Each traces with
peft's own trainable count and the real CPU step's tracked peak (to the byte), or fails in one line where the
real step fails: T5 seq-cls (its head pools each example's <eos>: unique_consecutive and a boolean-mask index),
DeBERTa-v2 seq-cls (``(labels >= 0).nonzero()``), MoE experts in fp32 (grouped_mm's meta kernel is bf16-only),
ModernBERT prompt tuning in bf16 (a float32 mask times bf16 hidden states reaches a bf16 linear)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tiny_configs import DEBERTA_V2, MIXTRAL, MODERNBERT, OLMOE, QWEN2_MOE, T5  # noqa: E402
from memprof.errors import ConfigError  # noqa: E402
from memprof.hub import load_spec_any  # noqa: E402
from memprof.resolve import resolve_setup  # noqa: E402
from memprof.spec import Task  # noqa: E402


def _spec(cfg: dict, tmp_path: Path, task: Task | None = None):  # noqa: ANN202
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return load_spec_any(str(path), task=task)


def _traced_and_run(spec, setup) -> tuple:  # noqa: ANN001
    from memprof.runtime.harness import run_measurement
    from memprof.runtime.trace import trace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = trace(spec, setup)
        real = run_measurement(spec, setup, warmup_steps=1, timed_steps=1)
    assert real.status == "ok"
    return est, real


CASES = {  # name -> (config, task, options): each traces and equals a real CPU step
    "t5-seq-cls": (T5, Task.seq_cls, {"method": "lora"}),
    "deberta-v2-eager": (DEBERTA_V2, Task.seq_cls, {"method": "lora", "attn_impl": "eager"}),
    "mixtral-fp32": (MIXTRAL, None, {"method": "full"}),
    "qwen2-moe-fp32": (QWEN2_MOE, None, {"method": "full"}),
    "olmoe-fp32": (OLMOE, None, {"method": "full"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_traces_equal_to_a_real_cpu_step(name: str, tmp_path: Path) -> None:
    cfg, task, options = CASES[name]
    spec = _spec(cfg, tmp_path, task)
    setup = resolve_setup(None, {"batch_size": 2, "seq_len": 16, "dtype": "fp32", "device": "cpu", **options})
    est, real = _traced_and_run(spec, setup)
    assert (est.peak_bytes, est.trainable_params) == (real.peak_bytes, real.trainable_params)
    if setup.method.value != "full":  # peft's own count
        from memprof.runtime.catalogue import peft_trainable
        from memprof.runtime.build import peft_config_for

        assert est.trainable_params == peft_trainable(spec, setup, peft_config_for(spec, setup))


def test_t5_padded_batch_ends_each_example_with_its_eos(tmp_path: Path) -> None:
    # T5ForSequenceClassification pools the last <eos> of each example: memprof's batch holds exactly one per
    # row, at the last real token, so padded rows of unequal length still trace and run
    spec = _spec(T5, tmp_path, Task.seq_cls)
    setup = resolve_setup(None, {"method": "lora", "batch_size": 3, "seq_len": 16, "dtype": "fp32",
                                 "device": "cpu", "padded": True})
    from memprof.runtime.build import synthetic_batch

    batch = synthetic_batch(spec, setup, "cpu")
    eos = (batch["input_ids"] == T5["eos_token_id"]).long()
    assert eos.sum(1).tolist() == [1, 1, 1]
    assert eos.argmax(1).tolist() == (batch["attention_mask"].sum(1) - 1).tolist()
    est, real = _traced_and_run(spec, setup)
    assert est.peak_bytes == real.peak_bytes


def test_moe_fp32_traces_as_fake_cuda(tmp_path: Path) -> None:
    from memprof.runtime.trace import trace

    est = trace(_spec(MIXTRAL, tmp_path), resolve_setup(None, {"method": "full", "batch_size": 2, "seq_len": 16,
                                                               "dtype": "fp32", "device": "cuda"}))
    assert est.peak_bytes > 4 * 4 * est.trainable_params  # weights, gradients and two AdamW moments in fp32


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_modernbert_bf16_prompt_tuning_fails_in_one_line_where_the_run_fails(tmp_path: Path, device: str) -> None:
    # peft prepends a float32 mask of ones for the virtual tokens; ModernBERT's mean pooling multiplies the bf16
    # hidden states by it (float32 result) and feeds its bf16 head: the CPU step raises "expected m1 and m2 to have
    # the same dtype", and so must the trace instead of a number
    from memprof.runtime.harness import run_measurement
    from memprof.runtime.trace import trace

    spec = _spec(MODERNBERT | {"classifier_pooling": "mean"}, tmp_path, Task.seq_cls)
    setup = resolve_setup(None, {"method": "prompt", "prompt": {"num_virtual_tokens": 4}, "batch_size": 2,
                                 "seq_len": 16, "dtype": "bf16", "device": device, "padded": True})
    with pytest.raises(ConfigError, match="fails in the run: linear of a torch.float32 tensor by a torch.bfloat16") \
            as info:
        trace(spec, setup)
    assert "\n" not in str(info.value)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="same dtype"):
            run_measurement(spec, setup, warmup_steps=1, timed_steps=1)


def test_modernbert_cls_pooling_prompt_tuning_still_traces(tmp_path: Path) -> None:
    spec = _spec(MODERNBERT, tmp_path, Task.seq_cls)
    setup = resolve_setup(None, {"method": "prompt", "prompt": {"num_virtual_tokens": 4}, "batch_size": 2,
                                 "seq_len": 16, "dtype": "bf16", "device": "cpu", "padded": True})
    est, real = _traced_and_run(spec, setup)
    assert est.peak_bytes == real.peak_bytes


def test_the_analytic_estimate_refuses_an_architecture_it_does_not_describe(tmp_path: Path) -> None:
    """measure renders the estimate beside a measurement where one exists; outside the analytic families the
    estimate is one typed refusal (it was a KeyError traceback after the measurement)."""
    from memprof.analytic import estimate
    from memprof.errors import UnsupportedModelError

    spec = _spec(MODERNBERT, tmp_path, Task.seq_cls)
    with pytest.raises(UnsupportedModelError, match="memprof trace"):
        estimate(spec, resolve_setup(None, {"batch_size": 2, "seq_len": 16}))
