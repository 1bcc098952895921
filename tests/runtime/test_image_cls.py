"""ViT-style image classification (``--task image-cls``): sized by image, not by sequence length.

A tiny ViT traces with peft's own trainable count and the real CPU step's tracked peak (to the byte), for full
fine-tuning and peft's image-classification LoRA recipe (queries and values adapted, the classifier trained in
full), in fp32 and bf16; the analytic estimate refuses it in one line; ``--image-size`` sizes the batch and the
model; the vit-base preset has the published parameter count.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tiny_configs import VIT  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from memprof.cli import app  # noqa: E402
from memprof.errors import ConfigError  # noqa: E402
from memprof.hub import load_spec_any  # noqa: E402
from memprof.images import image_run  # noqa: E402
from memprof.resolve import resolve_setup  # noqa: E402
from memprof.spec import Task  # noqa: E402

# peft's image classification example (LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
# under transformers 5.23, whose ViTAttention names its projections q_proj / k_proj / v_proj / o_proj
RECIPE = {"method": "lora", "lora": {"targets": "q_proj,v_proj", "modules_to_save": "classifier"}}


def _config(tmp_path: Path, cfg: dict = VIT) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _trainable_names(spec, setup) -> set[str]:  # noqa: ANN001
    from memprof.runtime.trace import apply_as_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_as_run(spec, image_run(spec, setup))
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_traces_equal_to_a_real_cpu_step_with_peft_counts(tmp_path: Path, method: str, dtype: str) -> None:
    from memprof.runtime.build import apply_method, build_base_model, count_trainable, peft_config_for
    from memprof.runtime.catalogue import peft_trainable
    from memprof.runtime.harness import run_measurement
    from memprof.runtime.trace import trace

    spec = load_spec_any(_config(tmp_path))
    assert (spec.task, spec.num_labels) == (Task.image_cls, 10)
    options = RECIPE if method == "lora" else {"method": "full"}
    setup = resolve_setup(None, {"batch_size": 2, "dtype": dtype, "device": "cpu", **options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = trace(spec, setup)
        real = run_measurement(spec, setup, warmup_steps=1, timed_steps=1)
    assert real.status == "ok"
    assert (est.peak_bytes, est.trainable_params, est.total_params) == \
        (real.peak_bytes, real.trainable_params, real.total_params)
    assert est.setup.seq_len == real.setup_row["seq_len"] == (32 // 8) ** 2 + 1  # 16 patches + [CLS]
    sized = image_run(spec, setup)
    if method == "lora":  # peft's own count: 2 blocks x 2 projections x r (32 + 32) + the classifier 32 x 10 + 10
        assert est.trainable_params == peft_trainable(spec, sized, peft_config_for(spec, sized)) == 2 * 2 * 8 * 64 + 330
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert est.trainable_params == count_trainable(apply_method(build_base_model(spec, sized), spec, sized))[0]


def test_lora_trains_the_classifier_by_default(tmp_path: Path) -> None:
    # peft has no image task type that would save the head (as SEQ_CLS does): memprof saves it, as peft's example
    spec = load_spec_any(_config(tmp_path))
    setup = resolve_setup(None, {"method": "lora", "lora_targets": "q_proj,v_proj"})
    names = _trainable_names(spec, setup)
    assert any("classifier" in n for n in names) and all("lora_" in n or "classifier" in n for n in names)
    bitfit = _trainable_names(spec, resolve_setup(None, {"method": "bitfit"}))
    assert {"classifier.weight", "classifier.bias"} <= bitfit


def test_image_size_sizes_the_batch_and_the_model(tmp_path: Path) -> None:
    from memprof.runtime.build import build_base_model, synthetic_batch

    spec = load_spec_any(_config(tmp_path))
    for size, dtype, torch_dtype in ((None, "fp32", "torch.float32"), (48, "bf16", "torch.bfloat16")):
        setup = image_run(spec, resolve_setup(None, {"batch_size": 3, "dtype": dtype, "image_size": size}))
        side = size or VIT["image_size"]
        batch = synthetic_batch(spec, setup, "cpu")
        assert tuple(batch["pixel_values"].shape) == (3, 3, side, side)
        assert str(batch["pixel_values"].dtype) == torch_dtype and tuple(batch["labels"].shape) == (3,)
        assert int(batch["labels"].max()) < VIT["num_labels"]
        assert setup.seq_len == (side // 8) ** 2 + 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            positions = build_base_model(spec, setup).vit.embeddings.position_embeddings
        assert positions.shape[1] == setup.seq_len  # the model built at that size
    with pytest.raises(ConfigError, match="smaller than"):
        image_run(spec, resolve_setup(None, {"image_size": 4}))
    with pytest.raises(ConfigError, match="does not apply to image-cls"):
        image_run(spec, resolve_setup(None, {"seq_len": 64}))
    with pytest.raises(ConfigError, match="prompt tuning works on token embeddings"):
        image_run(spec, resolve_setup(None, {"method": "prompt"}))
    with pytest.raises(ConfigError, match="padded batches do not apply"):
        image_run(spec, resolve_setup(None, {"padded": True}))


def _one_line_error(result, needle: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert needle in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_cli_refuses_the_analytic_estimate_and_mismatched_sizes_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    for args in (["estimate", "vit-base", "--task", "image-cls"], ["estimate", "vit-base"]):
        _one_line_error(runner.invoke(app, args), "model_type 'vit' is outside the analytic families")
    _one_line_error(runner.invoke(app, ["trace", "vit-base", "-s", "128"]), "--seq-len does not apply to --task image-cls")
    _one_line_error(runner.invoke(app, ["trace", "roberta-base", "--image-size", "224"]),
                    "--image-size applies to --task image-cls only")
    # peft has no default LoRA targets for ViT: its own refusal, in one line
    _one_line_error(runner.invoke(app, ["trace", _config(tmp_path), "-m", "lora"]), "target_modules")


def test_cli_trace_with_image_size(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["estimate", _config(tmp_path), "--trace", "-m", "lora", "--lora-targets",
                                      "q_proj,v_proj", "--image-size", "64", "-b", "2", "-f", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    text = json.dumps(doc)
    assert '"seq_len": 65' in text and "images of 64x64 pixels: 65 tokens each" in text


def test_vit_base_preset_has_the_published_parameter_count() -> None:
    # google/vit-base-patch16-224, ImageNet-1k classifier: 86,567,656 parameters (85,798,656 + 768 x 1000 + 1000)
    from memprof.runtime.build import build_base_model

    spec = load_spec_any("vit-base-patch16-224")
    assert (spec.name, spec.task, spec.num_labels) == ("google/vit-base-patch16-224", Task.image_cls, 1000)
    setup = image_run(spec, resolve_setup(None, {}))
    assert (setup.image_size, setup.seq_len) == (224, 197)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_base_model(spec, setup)
    assert sum(p.numel() for p in model.parameters()) == 86_567_656


def test_cli_measure_on_cpu_with_peft_s_recipe(tmp_path: Path) -> None:
    # the recipe as an adapter_config.json: r=16, alpha 16, dropout 0.1, the classifier saved
    recipe = tmp_path / "adapter_config.json"
    recipe.write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 16, "lora_dropout": 0.1, "bias": "none",
                                  "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier"]}))
    result = CliRunner().invoke(app, ["measure", _config(tmp_path), "--peft-config", str(recipe), "--steps", "1",
                                      "--out", str(tmp_path / "out"), "-f", "json"])
    assert result.exit_code == 0, result.output
    text = json.dumps(json.loads(result.output))
    assert '"status": "ok"' in text and '"seq_len": 17' in text and '"image-cls"' in text
    assert f'"trainable_params": {2 * 2 * 16 * 64 + 330}' in text
    assert '"batch_size": 8' in text and '"dtype": "fp32"' in text  # the CPU defaults, but for the sequence length
