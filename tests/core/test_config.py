"""RunSetup resolution: defaults < TOML file < overrides, validation, one error listing every problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from memprof.config import AdapterSpec, Dtype, Method, Optimizer, Regime, RunSetup, with_method_defaults
from memprof.resolve import resolve_setup
from memprof.errors import ConfigError


def test_defaults_and_dtype_regimes() -> None:
    s = resolve_setup(None, {})
    assert (s.method, s.batch_size, s.seq_len, s.dtype, s.optimizer) == (Method.full, 1, 512, Dtype.bf16, Optimizer.adamw)
    assert s.effective_regime is Regime.pure
    assert resolve_setup(None, {"dtype": "fp16"}).effective_regime is Regime.amp
    assert resolve_setup(None, {"dtype": "fp32"}).effective_regime is Regime.fp32


def test_precedence_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('method = "lora"\nbatch_size = 8\n[lora]\nr = 16\nalpha = 32\n')
    s = resolve_setup(f, {"batch_size": 4, "lora": {"r": 4}, "seq_len": None})
    assert (s.method, s.batch_size, s.seq_len) == (Method.lora, 4, 512)
    assert (s.lora.r, s.lora.alpha) == (4, 32)


def test_method_options_filled_in() -> None:
    s = resolve_setup(None, {"method": "adapter"})
    assert s.adapter == AdapterSpec() and s.adapter.bottleneck_size(768) == 64
    assert resolve_setup(None, {"method": "adapter", "adapter": {"reduction_factor": 16}}).adapter.bottleneck_size(768) == 48
    assert with_method_defaults(RunSetup(method=Method.qlora)).quant is not None


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as exc:
        resolve_setup(None, {"dtype": "fp8", "optimizer": "adam", "frobnicate": 1})
    msg = str(exc.value)
    assert "dtype 'fp8' is not supported; choose one of: fp32, bf16, fp16" in msg
    assert "optimizer 'adam'" in msg and "unknown option 'frobnicate'" in msg


@pytest.mark.parametrize("overrides,match", [
    ({"batch_size": 0}, "batch size must be between 1"),
    ({"seq_len": -5}, "sequence length must be between 1"),
    ({"batch_size": 2.5}, "batch size must be an integer"),
    ({"method": "lora", "lora": {"r": 0}}, "lora r must be between 1"),
    ({"method": "lora", "lora": {"bias": "some"}}, "lora bias 'some' is not supported"),
    ({"method": "adapter", "adapter": {"bottleneck": 8, "reduction_factor": 4}}, "not both"),
    ({"method": "full", "lora": {"r": 4}}, "lora options do not apply to method 'full'"),
    ({"dtype": "fp32", "regime": "amp"}, "regime amp needs a half dtype"),
    ({"dtype": "bf16", "regime": "fp32"}, "regime fp32 needs --dtype fp32"),
    ({"method": "qlora", "quant": {"quant_type": "int3"}}, "quant type 'int3'"),
    ({"method": "prefix", "prompt": {"num_virtual_tokens": 0}}, "num virtual tokens must be between 1"),
    ({"overheads": {"allocator_reserve_frac": 2}}, "allocator reserve fraction must be in"),
])
def test_bad_values_are_clear(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_setup(None, overrides)


def test_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_setup(tmp_path / "none.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("method = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_setup(bad, {})
