"""The command line: every command, every output format, and every kind of bad input (one line, exit 2)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memprof.cli import app

runner = CliRunner()


def run(*args: str):  # noqa: ANN202
    return runner.invoke(app, list(args))


def test_estimate_table_names_the_regime_and_the_assumed_shape() -> None:
    r = run("estimate", "--params", "3e9", "--dtype", "fp16", "--method", "adapter")
    assert r.exit_code == 0, r.output
    assert "fp16 amp" in r.output and "adapter houlsby r=64" in r.output
    assert "LLaMA-like shape scaled from meta-llama/Llama-3.2-3B" in r.output and "layers=26" in r.output
    assert "peak tensor memory" in r.output and "device total" in r.output


def test_estimate_json_is_the_record() -> None:
    r = run("estimate", "roberta-base", "--method", "lora", "-b", "8", "-s", "128", "--dtype", "fp32", "-f", "json",
            "--gpu", "T4", "--explain")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    est = doc["estimate"]
    assert est["model"] == "FacebookAI/roberta-base" and est["trainable_params"] == 887_042
    assert est["peak_bytes"] == sum(doc["breakdown_bytes"].values())
    assert doc["fit"]["fits"] is True and doc["fit"]["gpu"] == "T4"
    assert any(t["category"] == "activations" for t in doc["terms"])


@pytest.mark.parametrize("fmt", ["csv", "markdown"])
def test_estimate_csv_and_markdown(fmt: str) -> None:
    r = run("estimate", "gpt2", "-f", fmt)
    assert r.exit_code == 0, r.output
    if fmt == "csv":
        row = next(csv.DictReader(io.StringIO(r.output)))
        assert row["model"] == "openai-community/gpt2" and int(row["peak_bytes"]) > 0
    else:
        assert r.output.startswith("| kind |") and "| analytic |" in r.output


def test_gpu_does_not_fit_says_by_how_much() -> None:
    r = run("estimate", "Llama-3.1-8B", "--dtype", "fp32", "--gpu", "24GiB")
    assert r.exit_code == 0 and "does NOT fit" in r.output and "short by" in r.output


def test_fit_finds_the_largest_batch() -> None:
    r = run("fit", "roberta-base", "--method", "lora", "-s", "128", "--gpu", "T4", "-f", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    b = doc["max_batch_size"]
    assert b > 8 and doc["max_seq_len"] == 512
    over = run("estimate", "roberta-base", "--method", "lora", "-s", "128", "-b", str(b + 1), "--gpu", "T4", "-f", "json")
    assert json.loads(over.output)["fit"]["fits"] is False
    at = run("estimate", "roberta-base", "--method", "lora", "-s", "128", "-b", str(b), "--gpu", "T4", "-f", "json")
    assert json.loads(at.output)["fit"]["fits"] is True


def test_presets_lists_models_and_gpus() -> None:
    r = run("presets", "-f", "csv")
    assert r.exit_code == 0 and "meta-llama/Llama-3.2-3B" in r.output and "H100-80GB" in r.output


@pytest.mark.parametrize("args,message", [
    (["estimate", "roberta-base", "--dtype", "fp8"], "dtype 'fp8' is not supported; choose one of: fp32, bf16, fp16"),
    (["estimate", "roberta-base", "-b", "0"], "batch size must be between 1"),
    (["estimate", "roberta-base", "-s", "100000"], "exceeds FacebookAI/roberta-base's 512 learned positions"),
    (["estimate", "--params", "1e3"], "--params must be between"),
    (["estimate", "roberta-base", "--method", "dora"], "method 'dora' is not supported"),
    (["estimate", "roberta-base", "--optimizer", "adam"], "optimizer 'adam' is not supported"),
    (["estimate", "roberta-base", "--gpu", "X100"], "unknown GPU 'X100'"),
    (["estimate", "roberta-base", "--method", "lora", "--lora-r", "0"], "lora r must be between 1"),
    (["estimate", "gpt2", "--method", "lora", "--lora-targets", "q_proj"], "match no module"),
    (["estimate", "roberta-base", "--method", "lora", "--adapter-size", "8"], "adapter options do not apply"),
    (["estimate", "Llama-3.2-1B", "--method", "bitfit"], "BitFit trains nothing"),
    (["estimate", "roberta-base", "--attn", "flash3"], "attn impl 'flash3' is not supported"),
    (["estimate", "roberta-base", "--task", "generation"], "task 'generation' is not supported"),
    (["estimate", "roberta-base", "--params", "3e9"], "not both"),
    (["estimate"], "give a model"),
    (["estimate", "roberta-base", "--peft-config", "x.json"], "peft config x.json does not exist"),
    (["measure", "roberta-base", "--device", "tpu"], "device 'tpu' is not supported"),
    (["estimate", "gpt2", "--method", "prefix", "--grad-checkpointing"], "prefix tuning cannot run with gradient"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    r = run(*args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert "Traceback" not in r.output


def test_bad_config_files(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "bert", ')
    r = run("estimate", str(bad))
    assert r.exit_code == 2 and "not valid JSON" in r.output
    toml = tmp_path / "run.toml"
    toml.write_text("batch_size = 'many'\n")
    r = run("estimate", "gpt2", "--config", str(toml))
    assert r.exit_code == 2 and "batch size must be an integer" in r.output


def test_python_dash_m_runs_the_same_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "memprof", "estimate", "gpt2", "-f", "json"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["estimate"]["model"] == "openai-community/gpt2"


def test_dora_adds_one_magnitude_per_output_feature_of_each_target(tmp_path: Path) -> None:
    """--lora-dora (and `dora = true` in a run file): RoBERTa-base's default targets are query and value, 768
    outputs each in 12 layers, so DoRA trains 12 * 2 * 768 = 18,432 parameters more than LoRA."""
    import memprof

    lora = memprof.estimate("roberta-base", method="lora", batch_size=1, seq_len=128)
    dora = memprof.estimate("roberta-base", method="lora", lora={"dora": True}, batch_size=1, seq_len=128)
    assert dora.trainable_params - lora.trainable_params == 12 * 2 * 768
    assert dora.peak_bytes > lora.peak_bytes  # the magnitude's states, the weight-norm transients, the kept base result
    r = CliRunner().invoke(app, ["estimate", "roberta-base", "--method", "lora", "--lora-dora", "-s", "128"])
    assert r.exit_code == 0 and "lora r=8 DoRA" in r.output, r.output
    run = tmp_path / "run.toml"
    run.write_text('method = "lora"\nseq_len = 128\nbatch_size = 1\n[lora]\ndora = true\n')
    r = CliRunner().invoke(app, ["estimate", "roberta-base", "--config", str(run), "-f", "json"])
    assert r.exit_code == 0 and f'"trainable_params": {dora.trainable_params}' in r.output, r.output[:500]
