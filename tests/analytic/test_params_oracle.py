"""Parameter counts against the oracle: the model transformers builds on the meta device, with peft applied.

Every preset is checked for full fine-tuning and default LoRA; one preset per family variant is checked for
every method and its option variants. Counts must match exactly.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from memprof.resolve import resolve_setup  # noqa: E402
from memprof.errors import ConfigError  # noqa: E402
from memprof.analytic.params import count_params, method_params, trainable_tensors  # noqa: E402
from memprof.hub import resolve_spec  # noqa: E402
from memprof.runtime.build import apply_method, build_base_model, count_trainable  # noqa: E402
from memprof.presets import find_preset, preset_names  # noqa: E402
from memprof.spec import FAMILY_OF_MODEL_TYPE, Task  # noqa: E402

transformers.logging.set_verbosity_error()
# the presets the analytic model describes (vit-base-patch16-224 is traced only: tests/runtime/test_image_cls.py)
ANALYTIC_PRESETS = [n for n in preset_names() if find_preset(n)[1]["model_type"] in FAMILY_OF_MODEL_TYPE]

VARIANTS = {  # one preset per family variant
    "bert-base-uncased": None, "roberta-base": None, "gpt2": None, "Llama-3.2-1B": None, "Qwen2.5-0.5B": None,
    "gemma-2b": None, "Phi-3-mini-4k-instruct": None,
}
CASES = [
    ("full", {}), ("lora", {}), ("lora", {"lora": {"targets": "all-linear", "r": 16}}),
    ("lora", {"lora": {"bias": "all"}}), ("lora", {"lora": {"bias": "lora_only", "targets": "all-linear"}}),
    ("qlora", {"lora": {"targets": "all-linear"}}), ("adapter", {}),
    ("adapter", {"adapter": {"variant": "pfeiffer", "train_norms": True, "reduction_factor": 16}}),
    ("bitfit", {}), ("ia3", {}), ("prefix", {}), ("prefix", {"prompt": {"projection": True}}), ("prompt", {}),
    ("adalora", {}), ("adalora", {"dtype": "fp32", "lora": {"targets": "all-linear", "r": 4}}), ("vera", {}),
    ("vera", {"lora": {"targets": "all-linear", "r": 16}}), ("loha", {}), ("loha", {"lora": {"r": 4}}),
    ("lokr", {}), ("lokr", {"lora": {"targets": "all-linear", "r": 2}}), ("ln-tuning", {}), ("p-tuning", {}),
    ("p-tuning", {"prompt": {"projection_hidden": 48}}), ("trainable-tokens", {"trainable_tokens": {"count": 7}}),
]


def _oracle(spec, setup) -> tuple[int, int]:  # noqa: ANN001
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_method(build_base_model(spec, setup, "meta"), spec, setup)
    return count_trainable(model)


def _check(spec, setup) -> None:  # noqa: ANN001
    try:
        counts = method_params(spec, setup)
    except ConfigError as mine:
        # both sides must refuse (e.g. peft has no default targets for phi3, BitFit on a bias-free model)
        with pytest.raises(ConfigError):
            _oracle(spec, setup)
        assert str(mine)
        return
    trainable, total = _oracle(spec, setup)
    assert (counts.trainable, counts.total) == (trainable, total)
    assert sum(r * c for r, c, _ in trainable_tensors(spec, setup)) == counts.trainable
    assert sum(n for _, n in counts.components) == counts.total


@pytest.mark.parametrize("name", ANALYTIC_PRESETS)
def test_every_preset_base_count_matches_meta_model(name: str) -> None:
    spec, _ = resolve_spec(name)
    setup = resolve_setup(None, {})
    with torch.device("meta"):
        model = build_base_model(spec, setup, "meta")
    assert count_params(spec) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ANALYTIC_PRESETS)
def test_every_preset_default_lora_matches_peft(name: str) -> None:
    spec, _ = resolve_spec(name)
    _check(spec, resolve_setup(None, {"method": "lora"}))


@pytest.mark.parametrize("task", [None, Task.seq_cls])
@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_method_counts_match_transformers_and_peft(name: str, task: Task | None, method: str, options: dict) -> None:
    spec, _ = resolve_spec(name, task=task)
    _check(spec, resolve_setup(None, {"method": method, **options}))


def test_known_count_lora_r8_bert_base_seq_cls() -> None:
    # issue 2: LoRA r=8 on bert-base-uncased for sequence classification, peft defaults (query, value):
    # 12 layers * 2 modules * 8 * (768 + 768) = 294,912 LoRA + classifier 768 * 2 + 2 = 1,538 -> 296,450
    spec, _ = resolve_spec("bert-base-uncased")
    assert method_params(spec, resolve_setup(None, {"method": "lora"})).trainable == 296_450


def test_known_count_bias_names_roberta_base_seq_cls() -> None:
    # issue 2: parameters whose name contains "bias" in roberta-base for sequence classification: 102,914
    # = embeddings LayerNorm 768 + 12 * (4*768 q,k,v,o + 768 LN + 3072 + 768 + 768 LN) + 768 + 2 (classifier)
    spec, _ = resolve_spec("roberta-base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_base_model(spec, resolve_setup(None, {}), "meta")
    oracle = sum(p.numel() for n, p in model.named_parameters() if "bias" in n)
    assert oracle == 102_914
    bitfit = method_params(spec, resolve_setup(None, {"method": "bitfit"}))
    # BitFit trains the biases and the whole task head: 102,914 + dense 768*768 + out_proj 768*2
    assert bitfit.trainable == 102_914 + 768 * 768 + 768 * 2


def test_lora_targets_matching_nothing_is_a_clear_error() -> None:
    spec, _ = resolve_spec("gpt2")
    with pytest.raises(ConfigError, match="match no module.*c_attn"):
        method_params(spec, resolve_setup(None, {"method": "lora", "lora": {"targets": "q_proj"}}))


def test_lora_on_a_norm_is_rejected() -> None:
    spec, _ = resolve_spec("gpt2")
    with pytest.raises(ConfigError, match="normalisation layer"):
        method_params(spec, resolve_setup(None, {"method": "lora", "lora": {"targets": "ln_1"}}))


def test_bitfit_on_llama_causal_lm_trains_nothing_and_says_so() -> None:
    spec, _ = resolve_spec("Llama-3.2-1B")
    with pytest.raises(ConfigError, match="BitFit trains nothing"):
        method_params(spec, resolve_setup(None, {"method": "bitfit"}))
    # with a classification head there is something to train: the score layer, 2048 * 2
    cls = spec.with_task(Task.seq_cls)
    assert method_params(cls, resolve_setup(None, {"method": "bitfit"})).trainable == 2048 * 2
