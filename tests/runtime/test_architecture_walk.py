"""Every architecture traced (issue: MoE decoders, DeBERTa-v2/v3, ModernBERT, Gemma-2/3, encoder-decoders, ViT-style
image classification): a tiny config of each traces with LoRA and full fine-tuning, with trainable and total counts
equal to the model transformers builds with peft applied (peft's ``get_nb_trainable_parameters``), and Gemma-2,
whose model class has no SDPA, resolves to eager attention by itself and says so."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tiny_configs import (BART, DEBERTA_V2, GEMMA2, GEMMA3, MIXTRAL, MODERNBERT, OLMOE, QWEN2_MOE, T5,  # noqa: E402
                          VIT)
from memprof.config import AttnImpl  # noqa: E402
from memprof.hub import load_spec_any  # noqa: E402
from memprof.images import image_run  # noqa: E402
from memprof.resolve import resolve_setup  # noqa: E402
from memprof.spec import Task  # noqa: E402

# The MoE decoders: memprof's default LoRA targets (q_proj, v_proj: compat.py), and the fused expert weights through
# peft's target_parameters (tests/runtime/test_moe_lora.py covers each target set against a real CPU step)
EXPERTS = {"lora": {"targets": "q_proj,v_proj,experts"}}
# name -> (config, task, LoRA options); task None: the config's default (causal-lm, seq2seq, image-cls)
ARCHITECTURES = {
    "mixtral": (MIXTRAL, None, {}),
    "qwen2-moe": (QWEN2_MOE, None, EXPERTS),
    "olmoe": (OLMOE, None, {}),
    "deberta-v2": (DEBERTA_V2, Task.seq_cls, {}),
    "modernbert": (MODERNBERT, Task.seq_cls, {"lora": {"targets": "Wqkv"}}),  # peft 0.21 has no default for it
    "gemma2": (GEMMA2, None, {}),
    "gemma3": (GEMMA3, None, {}),
    "t5": (T5, None, {}),
    "bart": (BART, None, {}),
    # peft's image classification recipe (query and value projections; memprof saves the classifier as it does)
    "vit": (VIT, None, {"lora": {"targets": "q_proj,v_proj"}}),
}
# full fine-tuning where it adds a kind of model (an MoE, the encoders, a mixed stack, an encoder-decoder, ViT)
FULL = ("mixtral", "deberta-v2", "modernbert", "gemma3", "bart", "vit")
CASES = [(name, "lora") for name in ARCHITECTURES] + [(name, "full") for name in FULL]


def _spec(name: str, tmp_path: Path):  # noqa: ANN202
    cfg, task, _ = ARCHITECTURES[name]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return load_spec_any(str(path), task=task)


def _oracle(spec, setup) -> tuple[int, int]:  # noqa: ANN001
    """(trainable, total) of the full-depth model transformers builds on meta with the method applied: peft's own
    get_nb_trainable_parameters for peft methods, the module's parameters for full fine-tuning."""
    from memprof.runtime.build import count_trainable
    from memprof.runtime.trace import apply_as_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_as_run(spec, setup)
    return tuple(model.get_nb_trainable_parameters()) if hasattr(model, "get_nb_trainable_parameters") \
        else count_trainable(model)


@pytest.mark.parametrize("name,method", CASES)
def test_every_architecture_traces_with_peft_counts(name: str, method: str, tmp_path: Path) -> None:
    from memprof.runtime.trace import trace

    spec = _spec(name, tmp_path)
    options = ARCHITECTURES[name][2] if method == "lora" else {}
    size = {} if spec.task is Task.image_cls else {"seq_len": 16}  # ViT: its config's 32x32 images, 17 tokens
    setup = resolve_setup(None, {"method": method, "batch_size": 2, **size, **options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = trace(spec, setup)
    assert est.peak_bytes > 0 and est.peak_bytes == est.peak.total_bytes
    assert (est.trainable_params, est.total_params) == _oracle(spec, image_run(spec, est.setup))
    if method == "lora":
        assert 0 < est.trainable_params < est.total_params
    else:
        assert est.trainable_params == est.total_params


def test_gemma2_resolves_to_eager_attention_and_says_so(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from memprof.cli import app

    path = tmp_path / "gemma2.json"
    path.write_text(json.dumps(GEMMA2))
    result = CliRunner().invoke(app, ["trace", str(path), "-m", "lora", "-b", "2", "-s", "16", "-f", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    text = json.dumps(doc)
    assert f'"attn_impl": "{AttnImpl.eager.value}"' in text  # the record, under the default --attn auto
    assert "attention: eager, the kernel transformers" in text and "no attention soft-capping" in text
