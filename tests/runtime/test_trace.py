"""The traced estimator: depth extrapolation against full-depth traces, every method traced as fake CUDA
tensors, and an architecture outside the analytic families (OPT) through `memprof trace` / `estimate --trace`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from typer.testing import CliRunner  # noqa: E402

from memprof.cli import app  # noqa: E402
from memprof.resolve import resolve_setup  # noqa: E402
from memprof.records import Estimate, Phase  # noqa: E402
from memprof.runtime.trace import trace  # noqa: E402
from memprof.spec import from_hf_config  # noqa: E402

# 6 identical blocks, so "auto" traces depths 2 and 3 and extrapolates to 6
LLAMA_6 = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 256,
           "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
BERT_6 = {"model_type": "bert", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 6,
          "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 64}
# GPT-2 has biases (BitFit trains them), Conv1D projections and a tied head
GPT2_2 = {"model_type": "gpt2", "vocab_size": 512, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64,
          "bos_token_id": 0, "eos_token_id": 0}
EXTRAPOLATED_METHODS = [("full", {}), ("lora", {}), ("prompt", {"prompt": {"num_virtual_tokens": 8}}),
                        ("adapter", {"adapter": {"bottleneck": 16}})]


def _phases(est: Estimate) -> dict[str, dict[str, int]]:
    return {phase.value: bd.as_dict() for phase, bd in est.phase_peaks}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("method,options", EXTRAPOLATED_METHODS, ids=[m for m, _ in EXTRAPOLATED_METHODS])
def test_extrapolated_trace_equals_the_full_depth_trace(method: str, options: dict, device: str) -> None:
    # Each sub-phase's bytes (forward, backward head / top block / bottom block / tail, optimizer) are affine in
    # the number of identical blocks, so extrapolating from depths 2 and 3 is exact: equal to the byte, per phase
    # and per category (CUDA's 512-byte rounding is per storage and so stays affine too).
    spec = from_hf_config(LLAMA_6, "tiny-llama-6")
    setup = resolve_setup(None, {"method": method, "batch_size": 2, "seq_len": 16, "dtype": "fp32", "device": device,
                                 **options})
    extrapolated = trace(spec, setup)
    full = trace(spec, setup, layers="full")
    assert "depths 2 and 3, extrapolated to 6" in extrapolated.notes[0] and "full depth" in full.notes[0]
    assert _phases(extrapolated) == _phases(full)
    assert extrapolated.peak == full.peak and extrapolated.peak_phase == full.peak_phase
    assert (extrapolated.first_step_peak_bytes, extrapolated.steady_bytes) == (full.first_step_peak_bytes,
                                                                                full.steady_bytes)
    assert (extrapolated.total_params, extrapolated.trainable_params) == (full.total_params, full.trainable_params)


@pytest.mark.parametrize("method,options", EXTRAPOLATED_METHODS[:2], ids=["full", "lora"])
def test_extrapolation_of_an_encoder_with_a_classifier(method: str, options: dict) -> None:
    spec = from_hf_config(BERT_6, "tiny-bert-6")
    setup = resolve_setup(None, {"method": method, "batch_size": 2, "seq_len": 16, "dtype": "bf16", **options})
    assert _phases(trace(spec, setup)) == _phases(trace(spec, setup, layers=2)) == _phases(
        trace(spec, setup, layers="full"))


def test_trace_depth_out_of_range_is_a_config_error() -> None:
    from memprof.errors import ConfigError

    spec = from_hf_config(LLAMA_6, "tiny-llama-6")
    with pytest.raises(ConfigError, match="trace depth must be between 1 and 4"):
        trace(spec, resolve_setup(None, {"batch_size": 1, "seq_len": 8}), layers=5)


# ---- every method on emulated CUDA --------------------------------------------------------------------------------
METHODS = [("full", {}), ("lora", {}), ("qlora", {}), ("adapter", {"adapter": {"bottleneck": 16}}), ("bitfit", {}),
           ("ia3", {}), ("prefix", {"prompt": {"num_virtual_tokens": 8}}), ("prompt", {"prompt": {"num_virtual_tokens": 8}})]
WORKSPACE_BYTES = 8 * 2**20  # Overheads().cublas_workspace_bytes, added to the tensor peak on CUDA


@pytest.fixture(scope="module")
def traced_methods() -> dict[str, Estimate]:
    spec = from_hf_config(GPT2_2, "tiny-gpt2")
    return {m: trace(spec, resolve_setup(None, {"method": m, "batch_size": 2, "seq_len": 32, "dtype": "bf16", **o}))
            for m, o in METHODS}


@pytest.mark.parametrize("method", [m for m, _ in METHODS])
def test_each_method_traces_on_fake_cuda(traced_methods: dict[str, Estimate], method: str) -> None:
    est = traced_methods[method]
    assert est.kind == "traced" and est.setup.device.value == "cuda" and "CUDA kernels emulated" in est.notes[0]
    phases = dict(est.phase_peaks)
    assert set(phases) == set(Phase)
    assert est.peak == phases[est.peak_phase] and est.peak_bytes == max(bd.total_bytes for bd in phases.values())
    # weights: a bf16 base is 2 bytes/param (peft's adapters are fp32); QLoRA packs the frozen linears into
    # 4 bits (0.5 byte/param) while its parameter count unpacks them
    weights = est.peak.params_trainable + est.peak.params_frozen
    bytes_per_param = 0.5 if method == "qlora" else 2
    assert est.peak_bytes > weights >= bytes_per_param * est.total_params
    assert 0 < est.trainable_params <= est.total_params
    assert (est.trainable_params == est.total_params) == (method == "full")
    # AdamW keeps two moments per trainable parameter (bf16 for the base, fp32 for peft's / memprof's adapters)
    assert phases[Phase.optimizer].optimizer_states >= 2 * 2 * est.trainable_params
    assert phases[Phase.forward].activations > 0 and phases[Phase.optimizer].gradients > 0
    assert est.device.allocated_bytes == est.peak_bytes + WORKSPACE_BYTES
    assert est.device.allocated_bytes < est.device.reserved_bytes < est.device.device_total_bytes


@pytest.mark.parametrize("method", [m for m, _ in METHODS if m != "full"])
def test_peft_traces_below_full_fine_tuning(traced_methods: dict[str, Estimate], method: str) -> None:
    full, peft = traced_methods["full"], traced_methods[method]
    assert peft.peak_bytes < full.peak_bytes
    assert peft.trainable_params < full.trainable_params / 5


def test_qlora_stores_the_frozen_linears_in_four_bits(traced_methods: dict[str, Estimate]) -> None:
    lora, qlora = traced_methods["lora"], traced_methods["qlora"]
    assert qlora.total_params == lora.total_params and qlora.trainable_params == lora.trainable_params
    assert qlora.peak.params_frozen < lora.peak.params_frozen


# ---- an architecture outside the analytic families -----------------------------------------------------------------
runner = CliRunner()


@pytest.fixture(scope="module")
def opt_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import OPTConfig

    cfg = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=64)
    path = tmp_path_factory.mktemp("opt") / "config.json"
    path.write_text(cfg.to_json_string())
    return path


@pytest.mark.parametrize("command,method", [(["trace"], "lora"), (["estimate", "--trace"], "adapter"),
                                            (["trace", "--layers", "full"], "full")])
def test_opt_goes_through_the_traced_estimator(opt_config: Path, command: list[str], method: str) -> None:
    r = runner.invoke(app, [*command, str(opt_config), "--method", method, "-b", "2", "-s", "16", "-f", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    est = doc["estimate"]
    assert est["kind"] == "traced" and est["method"] == method
    assert est["peak_bytes"] > 0 and est["peak_bytes"] == sum(doc["breakdown_bytes"].values())
    assert set(doc["phase_peaks_bytes"]) == {"forward", "backward", "optimizer"}
    assert (est["trainable_params"] < est["total_params"]) == (method != "full")


def test_opt_deeper_than_three_blocks_is_extrapolated(opt_config: Path, tmp_path: Path) -> None:
    deep = json.loads(opt_config.read_text()) | {"num_hidden_layers": 5}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(deep))
    auto = runner.invoke(app, ["trace", str(path), "--method", "lora", "-b", "2", "-s", "16", "-f", "json"])
    full = runner.invoke(app, ["trace", str(path), "--method", "lora", "-b", "2", "-s", "16", "-f", "json",
                               "--layers", "full"])
    assert auto.exit_code == 0 and full.exit_code == 0, auto.output + full.output
    a, f = json.loads(auto.output), json.loads(full.output)
    assert any("extrapolated to 5" in n for n in a["notes"])
    assert a["phase_peaks_bytes"] == f["phase_peaks_bytes"]


def test_opt_analytic_estimate_says_unsupported_family(opt_config: Path) -> None:
    r = runner.invoke(app, ["estimate", str(opt_config), "--method", "lora", "-b", "2", "-s", "16"])
    assert r.exit_code == 2, r.output
    assert "model_type 'opt' is outside the analytic families" in r.output and "--trace" in r.output
