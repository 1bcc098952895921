"""`memprof measure` end to end on a tiny local config (CPU): the record, the JSONL file, the errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from memprof.cli import app
from tiny_configs import LLAMA

runner = CliRunner()


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA))
    return path


def test_measure_cpu_json_and_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "results"
    r = runner.invoke(app, ["measure", str(_config(tmp_path)), "--device", "cpu", "--method", "lora", "-b", "2",
                            "-s", "16", "--warmup", "1", "--steps", "2", "--out", str(out), "--name", "tiny",
                            "--threads", "1", "-f", "json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)[0]
    assert row["status"] == "ok" and row["device"] == "cpu" and row["method"] == "lora"
    assert row["peak_bytes"] > 0 and row["tokens_per_s"] > 0
    lines = (out / "tiny.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["measurement"]["status"] == "ok"


def test_measure_cpu_defaults_are_said(tmp_path: Path) -> None:
    r = runner.invoke(app, ["measure", str(_config(tmp_path)), "--device", "cpu", "--warmup", "1", "--steps", "1",
                            "-s", "16", "--out", str(tmp_path), "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "CPU defaults used: dtype=fp32, batch_size=8" in r.output and "peak live tensors (tracker)" in r.output


def test_measure_errors_are_one_line(tmp_path: Path) -> None:
    out = ["--out", str(tmp_path)]  # nothing may land in the repository's measurements/
    r = runner.invoke(app, ["measure", str(_config(tmp_path)), "--device", "cuda", *out])
    assert r.exit_code == 2 and r.output.startswith("error: device cuda: no CUDA device")
    r = runner.invoke(app, ["measure", str(_config(tmp_path)), "--device", "cpu", "--method", "qlora", *out])
    assert r.exit_code == 2 and r.output.startswith("error: QLoRA needs bitsandbytes") and r.output.count("\n") == 1
    r = runner.invoke(app, ["measure", str(_config(tmp_path)), "--device", "cpu", "--optimizer", "adamw-8bit", *out])
    assert r.exit_code == 2 and r.output.startswith("error: adamw-8bit (bitsandbytes) runs on CUDA only")
    r = runner.invoke(app, ["measure", str(_config(tmp_path)), "--device", "cpu", "-b", "0", *out])
    assert r.exit_code == 2 and "batch size must be between 1" in r.output
