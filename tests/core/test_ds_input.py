"""--deepspeed FILE (ds_input.py): a DeepSpeed config mapped onto the run flags, "auto" filled as HF Trainer fills it,
what the ZeRO model does not follow refused in one line, and the flags winning over the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memprof.cli import app
from memprof.ds_input import deepspeed_flags
from memprof.errors import ConfigError

runner = CliRunner()

# transformers' docs, "DeepSpeed" > "ZeRO-3 example" (every size "auto")
HF_ZERO3 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"},
                          "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                          "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def test_hf_zero3_example_fills_auto_from_the_width() -> None:
    # by hand, width 768 (GPT-2): 768^2 = 589,824; 0.9 x that = 530,841.6 -> 530,841; 10 x 768 = 7,680
    assert deepspeed_flags(HF_ZERO3, 768) == {"strategy": "zero3", "zero_bucket": 589_824, "zero_prefetch": 530_841,
                                              "zero_persistence": 7_680, "zero_overlap": True}


def test_numbers_offload_precision_and_micro_batch() -> None:
    cfg = {"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2, "reduce_bucket_size": 2e8, "offload_optimizer": {"device": "cpu"}}}
    assert deepspeed_flags(cfg, 4096) == {"strategy": "zero2", "zero_bucket": 200_000_000, "offload": "optimizer",
                                          "dtype": "bf16", "regime": "mixed", "batch_size": 4, "grad_accum": 1}
    # no precision section: DeepSpeed trains in fp32; stage-3 sizes in a stage-2 config are DeepSpeed's to ignore
    assert deepspeed_flags({"zero_optimization": {"stage": 1, "stage3_prefetch_bucket_size": 5}}, 8) == {
        "strategy": "zero1", "dtype": "fp32"}
    assert deepspeed_flags({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, 8)["offload"] \
        == "params"


@pytest.mark.parametrize(("zero", "extra", "message"), [
    ({"stage": 0}, {}, "stage 0 is not modelled"),
    ({}, {}, "no zero_optimization.stage"),
    ({"stage": 3, "offload_param": {"device": "nvme"}}, {}, "nvme\" is not modelled"),
    ({"stage": 2, "offload_param": {"device": "cpu"}}, {}, "offload_param needs zero_optimization.stage 3"),
    ({"stage": 3, "zero_hpz_partition_size": 8}, {}, "hpZ"),
    ({"stage": 3, "zero_quantized_weights": True}, {}, "ZeRO++"),
    ({"stage": 2, "contiguous_gradients": False}, {}, "contiguous_gradients false"),
    ({"stage": 3, "memory_efficient_linear": "no"}, {}, "memory_efficient_linear must be true or false"),
    ({"stage": 3, "sub_group_size": 1e8}, {}, "sub_group_size 100000000.0 is not modelled"),
    ({"stage": 3, "reduce_bucket_size": "big"}, {}, "reduce_bucket_size must be a number"),
    ({"stage": 2}, {"torch_autocast": {"enabled": True, "lower_precision_safe_modules": ["torch.nn.Embedding"]}},
     "lower_precision_safe_modules other than DeepSpeed's default"),
    ({"stage": 2}, {"torch_autocast": {"enabled": True, "dtype": "float8"}}, "bfloat16 or float16, not 'float8'"),
    ({"stage": 2}, {"torch_autocast": {"enabled": True}, "bf16": {"enabled": True}}, "torch_autocast and bf16/fp16"),
    ({"stage": 2}, {"optimizer": {"type": "Lion"}}, "optimizer 'Lion' is not modelled"),
    ({"stage": 2}, {"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both enabled"),
    ({"stage": 2}, {"train_micro_batch_size_per_gpu": 0}, "positive integer"),
])
def test_what_the_model_does_not_follow_is_one_line(zero: dict, extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        deepspeed_flags({"zero_optimization": zero, **extra} if zero or not extra else extra, 64)


def _write(tmp_path: Path, cfg: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_cli_estimate_reads_the_file_under_the_flags(tmp_path: Path) -> None:
    """The file's values equal the same flags given by hand; a flag given beside the file wins."""
    ds = _write(tmp_path, HF_ZERO3)
    common = ["estimate", "gpt2", "--world-size", "4", "--seq-len", "256", "--format", "json"]
    by_file = runner.invoke(app, common + ["--deepspeed", ds])
    by_hand = runner.invoke(app, common + ["--strategy", "zero3", "--zero-bucket", "589824", "--zero-prefetch",
                                           "530841", "--zero-persistence", "7680", "--zero-overlap"])
    assert by_file.exit_code == 0 and by_hand.exit_code == 0, by_file.output + by_hand.output
    assert json.loads(by_file.output)["estimate"] == json.loads(by_hand.output)["estimate"]
    flag_wins = runner.invoke(app, common + ["--deepspeed", ds, "--zero-bucket", "1000"])
    peak = json.loads(by_file.output)["estimate"]["peak_bytes"]
    # the default-less bucket: 589,824 bf16 elements from the start (stage 3) against 1,000
    assert peak - json.loads(flag_wins.output)["estimate"]["peak_bytes"] == (589_824 - 1_000) * 2


@pytest.mark.parametrize(("args", "message"), [
    (["estimate", "gpt2", "--deepspeed", "{missing}"], "does not exist"),
    (["estimate", "gpt2", "--deepspeed", "{bad}"], "zero_optimization.stage 0 is not modelled"),
    (["measure", "gpt2", "--deepspeed", "{good}"], "--deepspeed needs --nproc N"),
])
def test_cli_bad_deepspeed_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    paths = {"missing": str(tmp_path / "nope.json"), "bad": _write(tmp_path, {"zero_optimization": {"stage": 0}})}
    paths["good"] = str(tmp_path / "good.json")
    Path(paths["good"]).write_text(json.dumps(HF_ZERO3))
    result = runner.invoke(app, [a.format(**paths) for a in args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 2, result.output


def test_torch_autocast_is_the_amp_regime() -> None:
    """DeepSpeed's torch_autocast (runtime/torch_autocast.py): fp32 weights, the forward under torch.autocast in its
    dtype; without a dtype, torch.autocast's own default for the device, so --dtype decides."""
    flags = deepspeed_flags({"zero_optimization": {"stage": 3}, "torch_autocast": {"enabled": True,
                                                                                 "dtype": "bfloat16"}}, 64)
    assert (flags["regime"], flags["dtype"]) == ("amp", "bf16")
    flags = deepspeed_flags({"zero_optimization": {"stage": 2}, "torch_autocast": {"enabled": True}}, 64)
    assert flags["regime"] == "amp" and "dtype" not in flags
    off = deepspeed_flags({"zero_optimization": {"stage": 2}, "torch_autocast": {"enabled": False}}, 64)
    assert "regime" not in off


def test_memory_efficient_linear_is_read_at_stage_3() -> None:
    """zero_optimization.memory_efficient_linear (ZeRO-3's, default true): false is --no-zero-efficient-linear;
    below stage 3 DeepSpeed never reads it, nor does memprof."""
    assert deepspeed_flags({"zero_optimization": {"stage": 3, "memory_efficient_linear": False}}, 64)[
        "zero_efficient_linear"] is False
    assert "zero_efficient_linear" not in deepspeed_flags({"zero_optimization": {"stage": 2,
                                                                                "memory_efficient_linear": False}}, 64)


def test_cli_autocast_and_linear_keys_equal_their_flags(tmp_path: Path) -> None:
    """torch_autocast and memory_efficient_linear in the file equal --dtype bf16 --regime amp and
    --no-zero-efficient-linear by hand. Under autocast the two linears keep different things: ZeRO-3's keeps the fp32
    input of every projection, torch's the half copies (and, for a frozen weight such as GPT-2's tied head, its half
    copy for the input's gradient: here 50,257 x 768 x 2 B), so the default is smaller by that copy less the fp32
    inputs ZeRO-3's linear keeps beyond torch's half ones (under a tenth of it at b=1, s=256)."""
    cfg = dict(HF_ZERO3, torch_autocast={"enabled": True, "dtype": "bfloat16"}, bf16={"enabled": False})
    cfg["zero_optimization"] = dict(HF_ZERO3["zero_optimization"], memory_efficient_linear=False)
    ds = _write(tmp_path, cfg)
    common = ["estimate", "gpt2", "--world-size", "4", "--seq-len", "256", "--method", "lora", "--format", "json"]
    by_file = runner.invoke(app, common + ["--deepspeed", ds])
    hand = common + ["--strategy", "zero3", "--zero-bucket", "589824", "--zero-prefetch", "530841",
                     "--zero-persistence", "7680", "--zero-overlap", "--dtype", "bf16", "--regime", "amp"]
    by_hand = runner.invoke(app, hand + ["--no-zero-efficient-linear"])
    default = runner.invoke(app, hand)
    assert all(r.exit_code == 0 for r in (by_file, by_hand, default)), by_file.output + by_hand.output
    assert json.loads(by_file.output)["estimate"] == json.loads(by_hand.output)["estimate"]
    off, on = (json.loads(r.output)["estimate"]["peak_bytes"] for r in (by_hand, default))
    assert off - on >= 50_257 * 768 * 2 * 0.9
