"""Sweeps that trace and measure (tiny configs, mostly in this process): resume, OOM and other failures as
rows, `memprof report` on compare and `memprof measure` files, and the plot with measured bars."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")

from memprof.cli import app  # noqa: E402
from memprof.comparison import compare  # noqa: E402
from memprof.config import Device, Dtype, Method, RunSetup, with_method_defaults  # noqa: E402
from memprof.plot import write_plot  # noqa: E402
from memprof.records import Measurement  # noqa: E402
from memprof.runtime import runner as runner_module  # noqa: E402
from memprof.runtime.runner import (SCHEMA, append_jsonl, measurement_to_dict, setup_to_json,  # noqa: E402
                                    spec_to_json)
from memprof.records import setup_row  # noqa: E402
from memprof.sweep import MeasureOptions, plan_setups, rows_from_records, read_records, run_sweep  # noqa: E402
from tiny_configs import BERT, tiny_spec  # noqa: E402

cli = CliRunner()
IN_PROCESS = MeasureOptions(warmup_steps=1, timed_steps=1, isolate=False)
CPU = {"device": "cpu", "dtype": "fp32", "seq_len": 16}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _measured(path: Path) -> list[dict]:
    return [r for r in _lines(path) if r["schema"] == SCHEMA]


def test_resume_reuses_every_run_and_adds_only_new_ones(tmp_path: Path) -> None:
    spec, path = tiny_spec("bert"), tmp_path / "runs.jsonl"
    setups = plan_setups(["full", "lora"], CPU, batch_sizes=[2])
    first = run_sweep(spec, setups, path=path, measure=IN_PROCESS)
    assert (first.planned, first.reused) == (2, 0) and len(_measured(path)) == 2
    again = run_sweep(spec, setups, path=path, measure=IN_PROCESS)
    assert (again.planned, again.reused) == (2, 2) and len(_lines(path)) == 4  # nothing appended
    assert [r["peak_bytes"] for r in again.rows if r["kind"] == "measured"] == \
        [r["peak_bytes"] for r in first.rows if r["kind"] == "measured"]
    wider = run_sweep(spec, plan_setups(["full", "lora"], CPU, batch_sizes=[2, 4]), path=path, measure=IN_PROCESS)
    assert (wider.planned, wider.reused) == (4, 2)
    assert [(r["measurement"]["setup_row"]["method"], r["measurement"]["setup_row"]["batch_size"])
            for r in _measured(path)] == [("full", 2), ("lora", 2), ("full", 4), ("lora", 4)]
    full, lora, *_ = compare(wider.rows)
    assert lora.measured_saved_vs_full_frac > 0 and abs(lora.est_vs_measured_frac) < 0.02


def test_cli_resume_says_how_many_runs_were_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measure = runner_module.measure
    monkeypatch.setattr(runner_module, "measure", lambda *a, **k: measure(*a, **{**k, "isolate": False,
                                                                                  "timeout_s": None}))
    config, out = tmp_path / "config.json", tmp_path / "sweep.jsonl"
    config.write_text(json.dumps(BERT))
    args = ["compare", str(config), "--methods", "full,lora", "--seq-lens", "16", "--measure", "--warmup", "1",
            "--steps", "1", "--out", str(out), "-f", "json"]
    r = cli.invoke(app, [*args, "--batch-sizes", "2"])
    assert r.exit_code == 0, r.output
    assert "0 of 2 runs reused" in r.stderr and "measured on CPU; CPU defaults used: dtype=fp32" in r.stderr
    rows = json.loads(r.stdout)
    assert [x["measured_status"] for x in rows] == ["ok", "ok"] and rows[1]["speedup_vs_full"] > 0
    r = cli.invoke(app, [*args, "--batch-sizes", "2"])
    assert "2 of 2 runs reused" in r.stderr and json.loads(r.stdout) == rows
    r = cli.invoke(app, [*args, "--batch-sizes", "2,4"])
    assert "2 of 4 runs reused from earlier sweeps, 2 run now" in r.stderr and len(_measured(out)) == 4
    report = cli.invoke(app, ["report", str(out), "-f", "json"])
    assert report.exit_code == 0 and json.loads(report.stdout) == json.loads(r.stdout)


def _write_measurement(path: Path, spec, setup: RunSetup, **fields) -> None:  # noqa: ANN001
    m = Measurement(spec_name=spec.name, setup_row=setup_row(spec, setup), device=setup.device.value, **fields)
    append_jsonl(path, {"schema": SCHEMA, "written_at": "2026-01-01T00:00:00+00:00",
                        "measurement": measurement_to_dict(m), "setup": setup_to_json(setup),
                        "spec": spec_to_json(spec)})


def test_recorded_oom_is_a_row_and_is_not_run_again(tmp_path: Path) -> None:
    spec, path = tiny_spec("bert"), tmp_path / "runs.jsonl"
    setups = plan_setups(["full", "lora"], CPU, batch_sizes=[2])
    _write_measurement(path, spec, setups[0], status="oom", message="out of memory during warmup: MemoryError")
    result = run_sweep(spec, setups, path=path, measure=IN_PROCESS)
    assert result.reused == 0 and len(_measured(path)) == 2  # the OOM run is kept; only lora ran
    full, lora = compare(result.rows)
    assert full.status == "oom" and full.note == "measurement oom: out of memory during warmup: MemoryError"
    assert full.est_peak_bytes and full.measured_peak_bytes is None and lora.status == "ok"
    assert lora.measured_saved_vs_full_frac is None  # no measured baseline
    md = cli.invoke(app, ["report", str(path), "-f", "markdown"]).stdout
    assert "| full | oom |" in md and "out of memory during warmup" in md


def test_retry_failed_runs_errors_again_but_not_ooms(tmp_path: Path) -> None:
    spec, path = tiny_spec("bert"), tmp_path / "runs.jsonl"
    setups = plan_setups(["full", "lora"], CPU, batch_sizes=[2])
    _write_measurement(path, spec, setups[0], status="oom", message="out of memory")
    _write_measurement(path, spec, setups[1], status="error", message="worker killed by SIGKILL")
    result = run_sweep(spec, setups, path=path, measure=IN_PROCESS, retry_failed=True)
    assert [r["status"] for r in result.rows if r["kind"] == "measured"] == ["oom", "ok"]
    assert [r.status for r in compare(rows_from_records(read_records([path])))] == ["oom", "ok"]


def test_out_of_memory_in_a_worker_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    # a 4M x 64 fp32 embedding is 1 GiB; the worker may map only 256 MiB more than it has after imports
    spec = tiny_spec("bert", vocab_size=4_000_000, hidden_size=64, num_hidden_layers=1)
    path = tmp_path / "runs.jsonl"
    options = MeasureOptions(warmup_steps=1, timed_steps=1, memory_limit_bytes=256 * 2**20, cpu_threads=1)
    result = run_sweep(spec, plan_setups(["full", "qlora"], {**CPU, "batch_size": 2}), path=path, measure=options)
    full, qlora = compare(result.rows)
    assert full.status == "oom" and "out of memory" in full.note
    assert qlora.status == "n/a" and "CUDA" in qlora.note and qlora.est_peak_bytes  # estimated, not measured
    assert [r["measurement"]["status"] for r in _measured(path)] == ["oom"]


def test_trace_joins_the_measurement(tmp_path: Path) -> None:
    spec, path = tiny_spec("llama"), tmp_path / "runs.jsonl"
    setups = plan_setups(["full", "lora", "bitfit"], {**CPU, "batch_size": 2})
    result = run_sweep(spec, setups, path=path, trace=True, measure=IN_PROCESS)
    full, lora, bitfit = compare(result.rows)
    for row in (full, lora):
        assert row.traced_peak_bytes and abs(row.est_vs_traced_frac) < 0.02
        assert abs(row.traced_vs_measured_frac) < 0.02 and abs(row.est_vs_measured_frac) < 0.02
    assert bitfit.status == "n/a" and "BitFit trains nothing" in bitfit.note
    kinds = [(r["schema"], r.get("kind")) for r in _lines(path)]
    assert kinds.count(("memprof.estimate/1", "traced")) == 2 and kinds.count((SCHEMA, None)) == 2
    again = run_sweep(spec, setups, path=path, trace=True, measure=IN_PROCESS)
    assert again.reused == 3 and compare(again.rows) == compare(result.rows)
    png = write_plot(compare(again.rows), tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_reads_memprof_measure_files(tmp_path: Path) -> None:
    spec = tiny_spec("gpt2")
    for method in (Method.full, Method.lora):
        setup = with_method_defaults(RunSetup(method=method, batch_size=2, seq_len=16, dtype=Dtype.fp32,
                                              device=Device.cpu))
        runner_module.measure(spec, setup, out_dir=tmp_path, isolate=False, warmup_steps=1, timed_steps=1)
    r = cli.invoke(app, ["report", str(tmp_path / "tiny-gpt2.jsonl"), "-f", "csv", "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    full, lora = csv.DictReader(io.StringIO(r.stdout))
    assert full["method"] == "full" and full["est_basis"] == "tracked"
    assert abs(float(lora["est_vs_measured_frac"])) < 0.02 and float(lora["measured_saved_vs_full_frac"]) > 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
