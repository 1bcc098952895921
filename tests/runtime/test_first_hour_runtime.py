"""A newcomer's first hour, the torch half (issue 11): the API measures what the CLI measures, measure prints
its own estimate and where the record went, the traced tasks, the comparison figure, timing statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from rich.console import Console  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import memprof  # noqa: E402
from memprof.cli import app  # noqa: E402
from memprof.runtime.harness import median_ci  # noqa: E402
from tiny_configs import LLAMA  # noqa: E402

runner = CliRunner()


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA))
    return path


def test_the_api_measures_the_run_the_cli_measures(tmp_path: Path) -> None:
    """Same defaults, same resolution: device auto (CPU here) and the CPU defaults; the same setup and, on the
    tracker, the same peak to the byte."""
    config = _config(tmp_path)
    api = memprof.measure(str(config), method="lora", seq_len=16, out_dir=tmp_path / "api")
    r = runner.invoke(app, ["measure", str(config), "--method", "lora", "-s", "16", "--out", str(tmp_path / "cli"),
                            "-f", "json"])
    assert r.exit_code == 0, r.output
    cli = json.loads(r.output)[0]
    assert api.device == "cpu" and api.setup_row == {k: cli[k] for k in api.setup_row}
    assert (api.setup_row["batch_size"], api.setup_row["dtype"]) == (8, "fp32")  # the CPU defaults, both ways
    assert api.peak_bytes == cli["peak_bytes"] and api.status == "ok"
    assert api.timed_steps >= 5 and api.step_time_ci95_s[0] <= api.step_time_median_s <= api.step_time_ci95_s[1]


def test_measure_prints_its_estimate_and_the_record_path(tmp_path: Path) -> None:
    config = _config(tmp_path)
    r = runner.invoke(app, ["measure", str(config), "--method", "lora", "-b", "2", "-s", "16", "--out",
                            str(tmp_path / "out"), "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert "memprof's estimate of this run (tracked)" in r.output and "%)" in r.output
    assert f"record appended to {tmp_path / 'out'}" in r.output.replace("\n", "")
    r = runner.invoke(app, ["measure", str(config), "--method", "lora", "-b", "2", "-s", "16", "--out",
                            str(tmp_path / "out"), "--steps", "2", "-f", "json"])
    row = json.loads(r.output)[0]
    assert abs(row["est_vs_measured_frac"]) < 0.01 and row["est_peak_bytes"] > 0


def test_median_interval() -> None:
    # with 9 values the 95% interval of the median is (x_2, x_8) (P(Bin(9, 1/2) < 2) = 10/512 < 0.025)
    assert median_ci([float(v) for v in range(1, 10)]) == (2.0, 8.0)
    assert median_ci([1.0, 2.0, 3.0]) == (1.0, 3.0)  # too few values for an interval: the range


@pytest.mark.parametrize(("model", "task"), [("bert-base-uncased", "token-cls"), ("roberta-base", "qa")])
def test_encoder_tasks_trace(model: str, task: str) -> None:
    r = runner.invoke(app, ["trace", model, "--task", task, "--method", "lora", "-b", "2", "-s", "32", "-f", "json"])
    assert r.exit_code == 0, r.output
    est = json.loads(r.output)["estimate"]
    assert est["task"] == task and est["peak_bytes"] > 0 and 0 < est["trainable_params"] < est["total_params"]


@pytest.mark.parametrize("config", [
    {"model_type": "t5", "vocab_size": 512, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
     "num_decoder_layers": 2, "num_heads": 4, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1},
    {"model_type": "bart", "vocab_size": 512, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
     "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
     "max_position_embeddings": 128, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
     "decoder_start_token_id": 2},
], ids=["t5", "bart"])
def test_encoder_decoders_trace_and_refuse_the_analytic_estimate_in_one_line(tmp_path: Path, config: dict) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    r = runner.invoke(app, ["trace", str(path), "--method", "lora", "-b", "2", "-s", "32", "-f", "json"])
    assert r.exit_code == 0, r.output
    est = json.loads(r.output)["estimate"]
    assert est["task"] == "seq2seq" and est["peak_bytes"] > 0
    r = runner.invoke(app, ["estimate", str(path)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "use --trace" in r.output


def test_comparison_figure_and_terminal_width(tmp_path: Path) -> None:
    """The figure names the setup and puts totals on the bars; a 100-column terminal gets a table that fits,
    with a note naming the columns it left out."""
    rows = memprof.compare("roberta-base", methods=["full", "lora"], batch_size=8, seq_len=128, dtype="fp32")
    from memprof.documents import comparison_view, render_comparison
    from memprof.plot import figure
    from memprof.report import Format

    heading = comparison_view([r.to_row() for r in rows])[0]
    fig = figure(rows, heading)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert fig._suptitle.get_text().replace("\n", " ").startswith("model FacebookAI/roberta-base")
    assert any(t.startswith(f"{rows[0].est_peak_bytes / 2**30:.2f}") for t in texts)
    console = Console(width=100, force_terminal=True, record=True)
    render_comparison([r.to_row() for r in rows], Format.table, console)
    lines = console.export_text().splitlines()
    table = [line for line in lines if line.startswith(("┃", "│", "┏", "└"))]
    assert table and max(len(line) for line in table) <= 100
    assert any(line.startswith("note: hidden to fit the terminal") for line in lines)
