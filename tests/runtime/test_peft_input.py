"""peft configs as input (issue 11): a saved adapter directory, a config file or object, mapped onto the
analytic model: the same trainable count as peft's own, the same estimate as the equivalent flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import memprof  # noqa: E402
from memprof.cli import app  # noqa: E402
from memprof.errors import ConfigError  # noqa: E402
from memprof.resolve import resolve_setup  # noqa: E402
from memprof.runtime.build import build_base_model  # noqa: E402
from tiny_configs import LLAMA, tiny_spec  # noqa: E402

runner = CliRunner()


def _peft_count(config) -> tuple[int, int]:  # noqa: ANN001
    spec = tiny_spec("llama")
    with torch.device("meta"):
        model = build_base_model(spec, resolve_setup(None, {"dtype": "fp32"}), "meta")
    return peft.get_peft_model(model, config).get_nb_trainable_parameters()


CONFIGS = {
    "lora": peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                      "o_proj"]),
    "lora-regex": peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=r".*\.(gate|up)_proj"),
    "lora-all-linear": peft.LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear", lora_dropout=0.1),
    "rslora": peft.LoraConfig(task_type="CAUSAL_LM", r=8, use_rslora=True),
    "ia3": peft.IA3Config(task_type="CAUSAL_LM"),
    "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
    "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
}
FLAGS = {
    "lora": ["--method", "lora", "--lora-r", "16", "--lora-alpha", "32", "--lora-targets", "q_proj,k_proj,v_proj,o_proj"],
    "lora-regex": ["--method", "lora", "--lora-r", "4", "--lora-targets", "gate_proj,up_proj"],
    "lora-all-linear": ["--method", "lora", "--lora-r", "8", "--lora-targets", "all-linear", "--lora-dropout", "0.1"],
    "rslora": ["--method", "lora", "--lora-r", "8"],
    "ia3": ["--method", "ia3"],
    "prompt": ["--method", "prompt", "--virtual-tokens", "10"],
    "prefix": ["--method", "prefix", "--virtual-tokens", "6"],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_saved_adapter_directory_is_the_equivalent_flags(tmp_path: Path, name: str) -> None:
    config = CONFIGS[name]
    config.save_pretrained(str(tmp_path / "adapter"))
    model = tmp_path / "config.json"
    model.write_text(json.dumps(LLAMA))
    common = [str(model), "-b", "2", "-s", "32", "-f", "json"]
    from_dir = runner.invoke(app, ["estimate", *common, "--peft-config", str(tmp_path / "adapter")])
    from_flags = runner.invoke(app, ["estimate", *common, *FLAGS[name]])
    assert from_dir.exit_code == 0 and from_flags.exit_code == 0, (from_dir.output, from_flags.output)
    a, b = json.loads(from_dir.output)["estimate"], json.loads(from_flags.output)["estimate"]
    assert a["peak_bytes"] == b["peak_bytes"] and a["method"] == b["method"]
    trainable, _total = _peft_count(config)
    assert a["trainable_params"] == trainable  # peft's own count


def test_the_api_takes_a_config_object() -> None:
    est = memprof.estimate(tiny_spec("llama"), peft_config=CONFIGS["lora"], batch_size=2, seq_len=32)
    assert est.setup.lora.r == 16 and est.trainable_params == _peft_count(CONFIGS["lora"])[0]
    tr = memprof.trace(tiny_spec("llama"), peft_config=CONFIGS["lora"], batch_size=2, seq_len=32, device="cpu",
                       dtype="fp32")
    assert tr.setup.lora.r == 16 and tr.trainable_params == est.trainable_params


def test_a_dora_config_is_modelled_with_peft_s_count() -> None:
    """use_dora=true: LoRA plus one trainable magnitude per output feature of each target, as peft counts it."""
    dora = peft.LoraConfig(task_type="CAUSAL_LM", r=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    est = memprof.estimate(tiny_spec("llama"), peft_config=dora, batch_size=2, seq_len=16)
    assert est.setup.lora.dora and est.trainable_params == _peft_count(dora)[0]


def test_what_the_analytic_model_does_not_cover_is_refused_and_traced(tmp_path: Path) -> None:
    subset = peft.LoraConfig(task_type="CAUSAL_LM", r=8, layers_to_transform=[0])
    subset.save_pretrained(str(tmp_path / "subset"))
    with pytest.raises(ConfigError, match="layers_to_transform .* use --trace"):
        memprof.estimate(tiny_spec("llama"), peft_config=subset)
    r = runner.invoke(app, ["trace", "Llama-3.2-1B", "--peft-config", str(tmp_path / "subset"), "-b", "1", "-s", "16",
                            "--layers", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["estimate", "gpt2", "--peft-config", str(tmp_path)])
    assert r.exit_code == 2 and "is a directory without adapter_config.json" in r.output


MORE = {
    "adalora": peft.AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, total_step=50, target_modules=["q_proj", "k_proj"]),
    "vera": peft.VeraConfig(task_type="CAUSAL_LM", r=32, target_modules=["q_proj", "v_proj"]),
    "loha": peft.LoHaConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "lokr": peft.LoKrConfig(task_type="CAUSAL_LM", r=2, alpha=8, target_modules=["q_proj", "o_proj"]),
    "ln-tuning": peft.LNTuningConfig(task_type="CAUSAL_LM"),
    "p-tuning": peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, encoder_hidden_size=48),
    "trainable-tokens": peft.TrainableTokensConfig(task_type="CAUSAL_LM", token_indices=[1, 5, 9, 11]),
}


@pytest.mark.parametrize("method", list(MORE))
def test_more_methods_from_their_peft_configs(method: str, tmp_path: Path) -> None:
    """A saved config of each newly modelled method is the matching flags, with peft's own trainable count."""
    config = MORE[method]
    config.save_pretrained(str(tmp_path))
    est = memprof.estimate(tiny_spec("llama"), peft_config=str(tmp_path), batch_size=2, seq_len=16)
    assert est.setup.method.value == method
    assert est.trainable_params == _peft_count(config)[0]


def test_more_methods_options_the_model_does_not_follow_are_refused() -> None:
    for config in (peft.LoHaConfig(task_type="CAUSAL_LM", rank_dropout=0.1),
                   peft.LoKrConfig(task_type="CAUSAL_LM", decompose_both=True),
                   peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                            encoder_reparameterization_type="LSTM")):
        with pytest.raises(ConfigError, match="use --trace"):
            memprof.estimate(tiny_spec("llama"), peft_config=config)
