"""memprof compare without the torch stack: the join (hand-checkable numbers), every output format, the plot,
estimate-only sweeps and their records, methods that do not apply, and bad input."""

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
from memprof.comparison import KEY_COLUMNS, compare, join, rel_error, saved_frac
from memprof.resolve import resolve_setup
from memprof.hub import resolve_spec
from memprof.records import setup_row

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _setup(method: str, b: int = 8, device: str = "cpu") -> dict:
    return {"model": "m", "task": "seq-cls", "method": method, "batch_size": b, "seq_len": 128, "dtype": "fp32",
            "regime": "fp32", "optimizer": "adamw", "attn_impl": "sdpa", "device": device,
            "grad_checkpointing": False, "dropout": True, "method_options": ""}


def _est(method: str, peak: int, trainable: int, flops: int, b: int = 8, device: str = "cpu", **extra) -> dict:
    return {"kind": "analytic", **_setup(method, b, device), "total_params": 100, "trainable_params": trainable,
            "peak_bytes": peak, "allocated_bytes": peak + 100, "params_frozen_bytes": peak // 2,
            "activations_bytes": peak - peak // 2, "flops_per_step": flops, **extra}


def _tracked(method: str, peak: int, b: int = 8, device: str = "cpu") -> dict:
    return {"kind": "analytic-tracked", **_setup(method, b, device), "peak_bytes": peak}


def _measured(method: str, peak: int, step_s: float, b: int = 8, device: str = "cpu", status: str = "ok") -> dict:
    return {"kind": "measured", **_setup(method, b, device), "status": status, "device": device, "peak_bytes": peak,
            "step_time_median_s": step_s, "tokens_per_s": b * 128 / step_s, "activations_bytes": peak // 3,
            "env_python_version": "3.11", "env_torch_version": "2.13", "env_cpu_threads": 1, "env_date": "2026-01-01"}


def test_key_columns_are_setup_row() -> None:
    spec, _ = resolve_spec("roberta-base")
    assert tuple(setup_row(spec, resolve_setup(None, {"method": "lora"}))) == KEY_COLUMNS


def test_helpers() -> None:
    assert rel_error(110, 100) == pytest.approx(0.1) and rel_error(None, 100) is None and rel_error(1, 0) is None
    assert saved_frac(400, 1000) == pytest.approx(0.6) and saved_frac(1, None) is None


def test_join_lines_up_by_setup_and_computes_errors_and_savings() -> None:
    rows = [
        _est("full", 1000, 100, 600), _tracked("full", 1010),
        {"kind": "traced", **_setup("full"), "peak_bytes": 1005, "elapsed_s": 1.5},
        _measured("full", 1000, 2.0),
        # another batch size: its own group, never the baseline of b=8 rows
        _est("full", 3000, 100, 1200, b=16), _measured("full", 2900, 4.0, b=16),
        _est("lora", 400, 1, 400), _tracked("lora", 404), _measured("lora", 500, 1.0),
    ]
    full, lora, full16 = compare(rows)  # runs of one size and precision stay together
    assert (full.setup["method"], lora.setup["method"], full16.setup["batch_size"]) == ("full", "lora", 16)
    # CPU: the measured tracker peak is compared with the tracked estimate
    assert full.est_basis == "tracked" and full.est_compared_bytes == 1010
    assert full.est_vs_measured_frac == pytest.approx(0.01)         # (1010 - 1000) / 1000
    assert full.traced_vs_measured_frac == pytest.approx(0.005)     # (1005 - 1000) / 1000
    assert full.est_vs_traced_frac == pytest.approx(5 / 1005)       # (1010 - 1005) / 1005
    assert lora.est_vs_measured_frac == pytest.approx(-0.192)       # (404 - 500) / 500
    assert lora.est_saved_vs_full_frac == pytest.approx(0.6)        # 1 - 400 / 1000
    assert lora.measured_saved_vs_full_frac == pytest.approx(0.5)   # 1 - 500 / 1000
    assert lora.speedup_vs_full == pytest.approx(2.0)               # 2.0 s / 1.0 s
    assert lora.flops_vs_full_frac == pytest.approx(400 / 600)
    assert full16.est_saved_vs_full_frac == 0 and full16.speedup_vs_full == 1
    assert lora.trainable_frac == pytest.approx(0.01)
    row = lora.to_row()
    assert row["est_activations_bytes"] == 200 and row["measured_activations_bytes"] == 166
    assert row["status"] == "ok" and "1 CPU threads" in row["provenance"] and row["measured_at"] == "2026-01-01"


def test_cuda_measurement_is_compared_with_the_plain_allocated_estimate() -> None:
    (row,) = compare([_est("full", 1000, 100, 600, device="cuda"), _tracked("full", 1500, device="cuda"),
                      _measured("full", 1050, 1.0, device="cuda")])
    assert row.est_basis == "allocated" and row.est_compared_bytes == 1100   # peak + cuBLAS workspace
    assert row.est_vs_measured_frac == pytest.approx(50 / 1050)


def test_failed_runs_become_rows_that_say_why() -> None:
    rows = [{"kind": "analytic", **_setup("bitfit"), "status": "n/a", "message": "BitFit trains nothing on m"},
            _est("full", 1000, 100, 600), {**_measured("full", 0, 1.0, status="oom"), "message": "out of memory\nx"}]
    bitfit, full = compare(rows)  # one group (same size and precision), in order of appearance
    assert bitfit.status == "n/a" and bitfit.note == "BitFit trains nothing on m" and bitfit.est_peak_bytes is None
    assert full.status == "oom" and full.note == "measurement oom: out of memory" and full.measured_peak_bytes is None


def test_an_ok_measurement_beats_a_later_failure() -> None:
    rows = [_measured("full", 1000, 2.0), _measured("full", 0, 1.0, status="error"), _measured("full", 990, 3.0)]
    (run,) = join(rows)
    assert run["measured"]["peak_bytes"] == 990
    (run,) = join(rows[:2])
    assert run["measured"]["peak_bytes"] == 1000
    with pytest.raises(ValueError, match="row kind"):
        join([{"kind": "guess"}])


def test_compare_module_is_pure() -> None:
    code = ("import sys, memprof.comparison, memprof.sweep\n"
            "print(','.join(m for m in ('torch', 'pandas', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == ""


# ---- CLI: estimate-only sweeps -------------------------------------------------------------------------------
ROBERTA = ["compare", "roberta-base", "--methods", "full,lora,adapter,bitfit", "--batch-sizes", "8,16",
           "--seq-lens", "128", "--dtype", "fp32"]


def test_compare_json_rows() -> None:
    r = runner.invoke(app, [*ROBERTA, "-f", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [(x["method"], x["batch_size"]) for x in rows] == [
        (m, b) for b in (8, 16) for m in ("full", "lora", "adapter", "bitfit")]
    lora = rows[1]
    assert lora["trainable_params"] == 887_042 and lora["measured_peak_bytes"] is None
    assert 0 < lora["est_saved_vs_full_frac"] < 1 and lora["est_peak_bytes"] < rows[0]["est_peak_bytes"]
    assert lora["est_saved_vs_full_frac"] == pytest.approx(1 - lora["est_peak_bytes"] / rows[0]["est_peak_bytes"])


def test_compare_csv_has_every_column_raw() -> None:
    r = runner.invoke(app, [*ROBERTA, "-f", "csv"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 8 and int(rows[0]["est_peak_bytes"]) > 2**30 and "est_activations_bytes" in rows[0]


def test_compare_markdown_and_html_structure() -> None:
    md = runner.invoke(app, [*ROBERTA, "-f", "markdown", "--by-category"]).stdout
    lines = md.splitlines()
    assert lines[0].startswith("model FacebookAI/roberta-base | task seq-cls") and lines[1] == ""
    assert lines[2].startswith("| method | b | trainable |") and "est. activations" in lines[2]
    assert set(lines[3]) <= {"|", "-"} and len(lines[3].split("|")) == len(lines[2].split("|"))
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 1 + 8 and table[2].startswith("| lora | 8 | 887.04K | 0.71% |")
    assert any(line.startswith("- est. peak:") for line in lines)


def test_html_report_is_one_self_contained_page_of_the_records() -> None:
    """The HTML report parsed: the setup, one header row and one row per run, every cell's value (data-v) the
    record's own number, the figure embedded as PNG data, a sort script inline, nothing fetched from elsewhere."""
    import base64
    from html.parser import HTMLParser

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.headers: list[str] = []
            self.rows: list[list[str]] = []
            self.srcs: list[str] = []
            self.tags: list[tuple[str, dict]] = []
            self._in_th = False
            self.setup = ""
            self._in_setup = False

        def handle_starttag(self, tag, attrs):  # noqa: ANN001, ANN202
            attrs = dict(attrs)
            self.tags.append((tag, attrs))
            if tag == "tr":
                self.rows.append([])
            elif tag == "td":
                self.rows[-1].append(attrs.get("data-v", ""))
            elif tag == "th":
                self._in_th = True
            elif tag == "img":
                self.srcs.append(attrs["src"])
            elif tag == "p" and attrs.get("class") == "setup":
                self._in_setup = True

        def handle_endtag(self, tag):  # noqa: ANN001, ANN202
            self._in_th = self._in_th and tag != "th"
            self._in_setup = self._in_setup and tag != "p"

        def handle_data(self, data):  # noqa: ANN001, ANN202
            if self._in_th:
                self.headers.append(data)
            if self._in_setup:
                self.setup += data

    page = runner.invoke(app, [*ROBERTA, "-f", "html"]).stdout
    records = json.loads(runner.invoke(app, [*ROBERTA, "-f", "json"]).stdout)
    parsed = Page()
    parsed.feed(page)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert parsed.setup.startswith("model FacebookAI/roberta-base | task seq-cls")
    body = [r for r in parsed.rows if r]
    assert len(body) == len(records) == 8 and "saved vs full (est.)" in parsed.headers
    from memprof.documents import COMPARISON_LABELS

    keys = [next(k for k, v in COMPARISON_LABELS.items() if v == h) for h in parsed.headers]
    for row, record in zip(body, records):
        for key, cell in zip(keys, row):
            value = record[key]
            expected = "" if value is None else str(int(value)) if isinstance(value, bool) else (
                repr(value) if isinstance(value, float) else str(value))
            assert cell == expected, (key, cell, value)
    (src,) = parsed.srcs
    assert src.startswith("data:image/png;base64,") and base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [t for t, a in parsed.tags if a.get("src", "").startswith("http") or a.get("href")]
    assert "<script>" in page and "addEventListener('click'" in page


def test_compare_table_names_the_shared_setup() -> None:
    r = runner.invoke(app, [*ROBERTA, "--by-category"])
    assert r.exit_code == 0, r.output
    assert "device cuda" in r.stdout and "saved vs full (est.)" in r.stdout and "adapter" in r.stdout


def test_sweep_axes_precisions_and_checkpointing() -> None:
    r = runner.invoke(app, ["compare", "--params", "3e9", "--methods", "full,lora,qlora,adapter,bitfit",
                            "--precisions", "fp32,bf16,fp16:amp,bf16:mixed", "--checkpointing", "off,on", "-b", "16",
                            "-s", "1024", "-f", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 4 * 2 * 5
    assert {(x["dtype"], x["regime"]) for x in rows} == {("fp32", "fp32"), ("bf16", "pure"), ("fp16", "amp"),
                                                         ("bf16", "mixed")}
    bitfit = [x for x in rows if x["method"] == "bitfit"]
    assert all(x["status"] == "n/a" and "BitFit trains nothing" in x["note"] for x in bitfit)
    ckpt = {x["grad_checkpointing"]: x["est_peak_bytes"] for x in rows
            if x["method"] == "full" and x["dtype"] == "fp32"}
    assert ckpt[True] < ckpt[False]


def test_methods_that_do_not_apply_do_not_abort_the_sweep() -> None:
    r = runner.invoke(app, ["compare", "Llama-3.2-1B", "--methods", "full,bitfit,lora"])
    assert r.exit_code == 0, r.output
    assert "BitFit trains nothing" in r.stdout and "lora" in r.stdout


def test_combinations_that_cannot_run_are_n_a_rows() -> None:
    # transformers drops the prefix cache in checkpointed layers: that run is n/a, the others go on
    r = runner.invoke(app, ["compare", "gpt2", "--methods", "full,prefix", "--checkpointing", "off,on", "-f", "json"])
    assert r.exit_code == 0, r.output
    rows = {(x["method"], x["grad_checkpointing"]): x for x in json.loads(r.stdout)}
    assert rows[("prefix", True)]["status"] == "n/a" and "gradient checkpointing" in rows[("prefix", True)]["note"]
    assert all(x["status"] == "ok" for k, x in rows.items() if k != ("prefix", True))


def test_estimate_only_sweep_with_out_is_reported_again(tmp_path: Path) -> None:
    out = tmp_path / "sweep.jsonl"
    first = runner.invoke(app, [*ROBERTA, "--out", str(out), "-f", "json"])
    assert first.exit_code == 0 and "0 of 8 runs reused" in first.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8 and {r["schema"] for r in records} == {"memprof.estimate/1"}
    assert records[0]["estimate"]["peak_bytes"] == json.loads(first.stdout)[0]["est_peak_bytes"]
    again = runner.invoke(app, [*ROBERTA, "--out", str(out), "-f", "json"])
    assert "8 of 8 runs reused" in again.stderr and len(out.read_text().splitlines()) == 8
    report = runner.invoke(app, ["report", str(out), "-f", "json"])
    assert report.exit_code == 0 and json.loads(report.stdout) == json.loads(first.stdout)


def test_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "compare.png"
    r = runner.invoke(app, [*ROBERTA, "--plot", str(path)])
    assert r.exit_code == 0, r.output
    assert path.read_bytes()[:8] == PNG_MAGIC and "plot written to" in r.stderr


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    r = runner.invoke(app, [*ROBERTA, "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 2 and "pip install 'memprof[plot]'" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["compare", "gpt2", "--batch-sizes", "1,2", "-b", "4"], "give --batch-sizes or --batch-size, not both"),
    (["compare", "gpt2", "--precisions", "fp32", "--dtype", "bf16"], "not both"),
    (["compare", "gpt2", "--batch-sizes", "1,x"], "--batch-sizes must be comma-separated integers"),
    (["compare", "gpt2", "--checkpointing", "maybe"], "--checkpointing values must be on or off"),
    (["compare", "gpt2", "--methods", "full,dora"], "method 'dora' is not supported"),
    (["compare", "gpt2", "--precisions", "fp8"], "dtype 'fp8' is not supported"),
    (["compare", "gpt2", "--out", "x.csv"], "must end in .jsonl"),
    (["compare", "gpt2", "--plot", "x.svg"], "give a path ending in .png"),
    (["report", "no/such/file.jsonl"], "does not exist"),
])
def test_bad_input_is_one_line(args: list[str], message: str) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.output


def test_report_refuses_a_file_without_records(tmp_path: Path) -> None:
    path = tmp_path / "other.jsonl"
    path.write_text('{"hello": 1}\n')
    r = runner.invoke(app, ["report", str(path)])
    assert r.exit_code == 2 and "holds no memprof records" in r.stderr


def _saved_config(tmp_path: Path, name: str, **fields: object) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS", **fields}))
    return folder


def _json_rows(args: list[str]) -> list[dict]:
    r = runner.invoke(app, ["compare", "roberta-base", "-b", "8", "-s", "128", "--format", "json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_arms_put_saved_peft_configs_side_by_side(tmp_path: Path) -> None:
    """--arm NAME=PATH: each saved config is a run named NAME, with the numbers of the flags it stands for."""
    lora8 = _saved_config(tmp_path, "l8", peft_type="LORA", r=8, target_modules=["query", "value"])
    dora16 = _saved_config(tmp_path, "d16", peft_type="LORA", r=16, use_dora=True, target_modules=["query", "value"])
    ia3 = _saved_config(tmp_path, "ia3", peft_type="IA3")
    rows = _json_rows(["--arm", f"lora-8={lora8}", "--arm", f"dora-16={dora16}", "--arm", f"saved-ia3={ia3}"])
    assert [r["method"] for r in rows] == ["full", "lora-8 (lora)", "dora-16 (lora)", "saved-ia3 (ia3)"]
    flags = _json_rows(["--methods", "full,lora", "--lora-r", "16", "--lora-dora", "--lora-targets", "query,value"])
    assert rows[2]["est_peak_bytes"] == flags[1]["est_peak_bytes"]
    assert rows[2]["est_saved_vs_full_frac"] == flags[1]["est_saved_vs_full_frac"]
    # arms come after --methods, and a newly modelled method is one more --methods value
    mixed = _json_rows(["--methods", "full,vera", "--arm", f"mine={lora8}"])
    assert [r["method"] for r in mixed] == ["full", "vera", "mine (lora)"]


@pytest.mark.parametrize("arm,message", [
    ("no-equals-sign", "--arm takes NAME=PATH"),
    ("=somewhere", "--arm takes NAME=PATH"),
    ("x={boft}", "arm 'x': the peft config's method BOFT is not in memprof's analytic model"),
    ("x={missing}", "does not exist"),
])
def test_a_bad_arm_is_one_line(tmp_path: Path, arm: str, message: str) -> None:
    boft = _saved_config(tmp_path, "boft", peft_type="BOFT", boft_block_size=4)
    r = runner.invoke(app, ["compare", "roberta-base", "--arm", arm.format(boft=boft, missing=tmp_path / "nope")])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.startswith("error:")]) == 1


def test_an_arm_name_given_twice_is_refused(tmp_path: Path) -> None:
    lora8 = _saved_config(tmp_path, "l8", peft_type="LORA", r=8)
    r = runner.invoke(app, ["compare", "roberta-base", "--arm", f"a={lora8}", "--arm", f"a={lora8}"])
    assert r.exit_code == 2 and "given twice" in r.output
