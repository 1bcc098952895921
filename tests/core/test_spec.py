"""ModelSpec resolution: presets and hub ids, config files, --params synthesis, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memprof.errors import ConfigError, UnsupportedModelError
from memprof.analytic.params import count_params
from memprof.hub import resolve_spec
from memprof.spec import LLAMA_SHAPES, Family, Task, synthesize_from_params


@pytest.mark.parametrize("name", ["roberta-base", "FacebookAI/roberta-base", "ROBERTA-BASE"])
def test_preset_names_and_hub_ids(name: str) -> None:
    spec, note = resolve_spec(name)
    assert spec.name == "FacebookAI/roberta-base" and spec.source == "preset" and note is None
    assert (spec.family, spec.task, spec.num_labels) == (Family.bert, Task.seq_cls, 2)


def test_required_presets_exist() -> None:
    # issue 2's list of presets with their parameter counts: published base-model counts (bert-base-uncased
    # 109,482,240; gpt2 124,439,808; Llama-3.2-1B 1.24B, ...) plus the task head memprof puts on top
    # (encoders: seq-cls with 2 labels, e.g. BERT 768 * 2 + 2 = 1,538; decoders: causal-LM head)
    expected = {"bert-base-uncased": 109_482_240 + 1_538, "bert-large-uncased": 335_143_938, "roberta-base": 124_647_170,
                "roberta-large": 355_361_794, "allenai/scibert_scivocab_uncased": 109_920_002,
                "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "meta-llama/Llama-2-7b-hf": 6_738_415_616,
                "Llama-3.2-1B": 1_235_814_400, "Llama-3.2-3B": 3_212_749_824, "Llama-3.1-8B": 8_030_261_248,
                "Llama-3.1-70B": 70_553_706_496,
                "Mistral-7B-v0.1": 7_241_732_096, "Qwen2.5-0.5B": 494_032_768, "Qwen2.5-1.5B": 1_543_714_304,
                "Qwen2.5-7B": 7_615_616_512, "gemma-2-2b": 2_614_341_888, "gemma-3-1b-pt": 999_885_952}
    for name, params in expected.items():
        spec, _ = resolve_spec(name)
        assert count_params(spec) == params, name


def test_local_config_file_and_directory(tmp_path: Path) -> None:
    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "head_dim": 96}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for where in (tmp_path, tmp_path / "config.json"):
        spec, _ = resolve_spec(str(where))
        assert spec.source == "file" and spec.head_dim == 96 and spec.q_dim == 384 and spec.kv_dim == 192


def test_bad_configs(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type": "bert", "hidden_size": 64')
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_spec(str(bad))
    t5 = tmp_path / "t5.json"
    t5.write_text('{"model_type": "t5", "d_model": 512}')
    with pytest.raises(UnsupportedModelError, match="model_type 't5' is outside the analytic families; supported: "
                                                     "bert, gemma"):
        resolve_spec(str(t5))
    missing = tmp_path / "m.json"
    missing.write_text('{"model_type": "llama", "hidden_size": 64}')
    with pytest.raises(ConfigError, match="none of the keys num_attention_heads"):
        resolve_spec(str(missing))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_spec(str(tmp_path / "nope.json"))


def test_unknown_name_offline_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnsupportedModelError, match="not a preset, a local file or in the hub cache.*known presets"):
        resolve_spec("someone/some-model")


@pytest.mark.parametrize("n", [5e7, 1.3e8, 3e8, 7e8, 1e9, 3e9, 7e9, 1.3e10, 3.3e10, 7e10, 4e11, 1e12])
def test_params_synthesis_lands_within_2_percent(n: float) -> None:
    spec, ref = synthesize_from_params(n)
    assert abs(count_params(spec) - n) / n <= 0.02
    assert ref in {row[0] for row in LLAMA_SHAPES}
    assert spec.family is Family.llama and spec.source == "params"


def test_params_3e9_uses_the_llama_3_2_3b_shape() -> None:
    spec, note = resolve_spec(None, params=3e9)
    # Llama-3.2-3B shape: embeddings 128256*3072 + final norm 3072 = 394,005,504 outside the blocks (tied head);
    # per block q,o 2*3072^2 + k,v 2*3072*1024 + MLP 3*3072*8192 + 2 norms*3072 = 100,669,440;
    # (3e9 - 394,005,504) / 100,669,440 = 25.9 -> 26 blocks -> 3,011,410,944 (0.4% from 3e9)
    assert (spec.hidden_size, spec.num_layers, spec.num_kv_heads, spec.intermediate_size) == (3072, 26, 8, 8192)
    assert count_params(spec) == 394_005_504 + 26 * 100_669_440
    assert "Llama-3.2-3B" in note and "layers=26" in note


@pytest.mark.parametrize("n", [1e3, 0, -5, 1e13, float("inf")])
def test_absurd_params(n: float) -> None:
    with pytest.raises(ConfigError, match="--params must be"):
        resolve_spec(None, params=n)
