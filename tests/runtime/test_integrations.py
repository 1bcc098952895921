"""Profiling the user's own run (issue 13): a real transformers Trainer with MemprofCallback, a plain loop with
StepProfiler, on CPU with tiny models, padded variable-length batches and gradient accumulation."""

from __future__ import annotations

import dataclasses
import json
import random
import warnings
from pathlib import Path

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from memprof.analytic import estimate  # noqa: E402
from memprof.cli import app  # noqa: E402
from memprof.config import Device, Loop, OptimizerImpl  # noqa: E402
from memprof.integrations import STEP_METRICS, StepProfiler, attach, pad_batch  # noqa: E402
from memprof.runtime.from_model import describe_run, step_setup  # noqa: E402
from memprof.runtime.harness import build_run, run_warmup, tracked_step  # noqa: E402

B, K, S = 4, 2, 40  # per-device batch, accumulation, the longest sequence of every batch


def _model(lora: bool) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4))
    return model


def _dataset(n: int, equal_shapes: bool) -> list[dict]:
    """Variable lengths; with ``equal_shapes`` every batch of B holds one sequence of length S (so every
    micro-batch pads to S), otherwise lengths are random in [8, 48]."""
    rng = random.Random(0)
    if equal_shapes:
        lengths = [S if i % B == 0 else rng.randint(8, S - 1) for i in range(n)]
    else:
        lengths = [rng.randint(8, 48) for _ in range(n)]
    return [{"input_ids": [rng.randrange(3, 256) for _ in range(k)]} for k in lengths]


def _train(tmp_path: Path, lora: bool, equal_shapes: bool, steps: int = 3, **options):  # noqa: ANN003, ANN202
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=B, gradient_accumulation_steps=K,
        max_steps=steps, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        dataloader_drop_last=True)
    trainer = transformers.Trainer(model=_model(lora), args=args, train_dataset=_dataset(B * K * steps, equal_shapes),
                                   data_collator=pad_batch)
    callback = attach(trainer, out=tmp_path / "records", name="tiny", **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, callback


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_trainer_callback_records_every_step_against_its_estimate(tmp_path: Path, lora: bool) -> None:
    trainer, callback = _train(tmp_path, lora, equal_shapes=False)
    records = callback.records
    assert [r.step for r in records] == [1, 2, 3]
    for r in records:
        assert r.micro_batches == K and r.padded and r.batch_size == B
        assert r.real_tokens < r.micro_batches * r.batch_size * r.seq_len  # padding is not counted
        assert set(r.phase_peaks) == {"forward", "backward", "optimizer"} and r.peak_bytes == max(r.phase_peaks.values())
        # the estimate of the step's own micro-batch shapes (tracked on CPU), within the validation's 1%
        assert abs(r.drift_frac) < 0.01, (r.step, r.drift_frac)
        assert r.flops_per_step > 0 and r.tokens_per_s > 0
    # the setup the callback read from the Trainer: its loop, accumulation and fused AdamW
    setup = callback.profiler.setup
    assert setup.loop is Loop.trainer and setup.grad_accum == K
    assert setup.effective_optimizer_impl is OptimizerImpl.fused
    assert setup.method.value == ("lora" if lora else "full")
    # logged through Trainer.log: W&B / TensorBoard / MLflow see the same keys
    logged = [h for h in trainer.state.log_history if "memprof/peak_bytes" in h]
    assert len(logged) == 3 and set(logged[0]) - {"step", "epoch"} <= set(STEP_METRICS)
    # JSONL records, rendered by memprof report --steps
    (path,) = (tmp_path / "records").glob("tiny.rank0.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 3 and all(line["schema"] == "memprof.measurement/1" for line in lines)
    out = CliRunner().invoke(app, ["report", str(path), "--steps", "-f", "json"])
    assert out.exit_code == 0, out.output
    assert [row["step"] for row in json.loads(out.output)] == [1, 2, 3]


def test_trainer_callback_agrees_with_memprof_measure(tmp_path: Path) -> None:
    """Every micro-batch padded to S: a steady Trainer step is the step `memprof measure` runs for the same setup
    (the Trainer loop, K=2, padded, fused AdamW): its tracked peak within 1%."""
    trainer, callback = _train(tmp_path, lora=True, equal_shapes=True, steps=3)
    steady = callback.records[-1]
    assert (steady.batch_size, steady.seq_len) == (B, S)
    spec, setup = callback.profiler.spec, step_setup(callback.profiler.setup, B, S, True)
    run = build_run(spec, setup, "cpu")
    run_warmup(run, setup, "cpu", 1)
    measured = tracked_step(run, setup, "cpu")
    assert abs(steady.peak_bytes - measured.peak_bytes) / measured.peak_bytes < 0.01
    assert steady.estimate_peak_bytes == estimate(spec, setup, tracked=True).peak_bytes


def test_trainer_callback_predicts_then_verifies_the_largest_batch(tmp_path: Path) -> None:
    """fit_check="verify" on a CPU with a GPU budget named: at train start the largest batch the estimate says fits
    at the training set's longest sequence, then real steps at that size in a worker process (issue 13, item 5)."""
    trainer, callback = _train(tmp_path, lora=True, equal_shapes=False, steps=1, fit_check="verify", gpu="0.52GiB")
    check = callback.verified
    longest = max(len(r["input_ids"]) for r in _dataset(B * K, equal_shapes=False))
    setup = dataclasses.replace(step_setup(callback.profiler.setup, 1, longest, True), device=Device.cuda)
    spec = callback.profiler.spec
    budget = 0.52 * 2**30
    # the prediction is the estimate's for a CUDA device of that size: its batch fits, one more sequence does not
    b = callback.predicted_max_batch
    assert b == check.predicted and b > B
    assert estimate(spec, dataclasses.replace(setup, batch_size=b)).device.device_total_bytes <= budget
    assert estimate(spec, dataclasses.replace(setup, batch_size=b + 1)).device.device_total_bytes > budget
    # then confirmed by a real CPU step at that size, in its own process
    assert check.dimension == "batch_size" and check.device == "cpu" and check.attempts[0].size == b
    assert check.confirmed is not None and check.attempts[-1].status == "ok"
    assert check.attempts[-1].device_total_bytes <= budget
    assert [r.step for r in callback.records] == [1]  # and training went on


def test_step_profiler_in_a_plain_loop() -> None:
    """A plain loop: the optimizer's own step hook marks the optimizer phase; the first step (no optimizer
    state yet) is compared with the first-step estimate, the others with the steady one."""
    model = _model(lora=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    profiler = StepProfiler(model, optimizer)
    data = _dataset(3 * B, equal_shapes=False)
    for i in range(3):
        batch = pad_batch(data[i * B:(i + 1) * B])
        with profiler.step():
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    profiler.close()
    assert profiler.setup.loop is Loop.torch and profiler.setup.effective_optimizer_impl is OptimizerImpl.for_loop
    for r in profiler.records:
        assert r.phase_peaks["optimizer"] > 0 and abs(r.drift_frac) < 0.01, (r.step, r.drift_frac)


def test_warns_once_when_the_run_exceeds_its_estimate() -> None:
    """A loop that keeps the model output (logits) alive, profiled as if it did not: the peak exceeds the
    estimate, and memprof says so once."""
    model = _model(lora=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    profiler = StepProfiler(model, optimizer, warn_margin=0.01)
    batch = pad_batch(_dataset(B, equal_shapes=True))
    kept = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with profiler.step():
                outputs = model(**batch)
                kept[:] = [outputs]
                outputs.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    profiler.close()
    mine = [w for w in caught if "above memprof's estimate" in str(w.message)]
    assert len(mine) == 1
    # told the truth, it agrees again
    told = StepProfiler(model, optimizer, overrides={"keep_outputs": True})
    for _ in range(2):
        with told.step():
            outputs = model(**batch)
            kept[:] = [outputs]
            outputs.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    told.close()
    assert abs(told.records[-1].drift_frac) < 0.01


def test_describe_run_reads_peft_and_training_arguments(tmp_path: Path) -> None:
    model = _model(lora=False)
    lora = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                                      target_modules=["q_proj", "k_proj", "v_proj"]))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), bf16=True, gradient_accumulation_steps=4,
                                          gradient_checkpointing=False, use_cpu=True, report_to=[])
    spec, setup, notes = describe_run(lora, torch.optim.AdamW(lora.parameters(), fused=True), args)
    assert spec.model_type == "llama" and setup.lora.r == 16 and setup.lora.alpha == 32
    assert setup.lora.targets == ("k_proj", "q_proj", "v_proj")
    assert setup.regime.value == "amp" and setup.dtype.value == "bf16"  # fp32 weights under bf16 autocast
    assert setup.grad_accum == 4 and setup.loop is Loop.trainer and setup.effective_optimizer_impl is OptimizerImpl.fused
    loha = peft.get_peft_model(_model(lora=False), peft.LoHaConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    _, none, notes = describe_run(loha)
    assert none is None and "not in memprof's analytic model" in notes[0]


def test_trainer_defaults_are_the_installed_transformers() -> None:
    """memprof's Trainer loop (config.Loop.trainer) states the Trainer's defaults; here they are read back from
    the installed transformers, so a release that changes one fails this test (and the drift check)."""
    args = transformers.TrainingArguments(output_dir="/tmp/memprof-defaults", report_to=[])
    assert args.optim.value == "adamw_torch_fused"  # torch >= 2.8 (training_args.py) -> OptimizerImpl.fused
    assert args.use_cache is False                  # Trainer sets model.config.use_cache from it
    assert args.max_grad_norm == 1.0                # gradients clipped before the step (run_step's trainer loop)
    from memprof.config import RunSetup

    assert RunSetup(loop=Loop.trainer).effective_optimizer_impl is OptimizerImpl.fused
    assert RunSetup(loop=Loop.trainer).use_cache is False
