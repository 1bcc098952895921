"""benchmarks/gpu_check.py: its CPU dry run end to end (every planned row, consistent numbers, n/a reasons), the
budget guard, the refusal without CUDA, the tier runner; and (GPU tier) the real plan's first row on a GPU."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memprof.analytic import estimate
from memprof.hub import resolve_spec
from memprof.resolve import resolve_setup
from memprof.runtime.harness import run_measurement
from memprof.spec import from_hf_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STEM = "gpu_check_cpu_dry_run"


def _load():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)
    spec.loader.exec_module(module)
    return module


gc = _load()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:  # noqa: ANN001
    """The dry run as a user runs it (without the tier, which tests/ runs anyway), once for the module."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--no-tier", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    return out, proc


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / f"{STEM}.csv", newline="") as f:
        return list(csv.DictReader(f))


def _num(value: str) -> float | None:
    return float(value) if value != "" else None


def test_dry_run_writes_every_planned_row(dry_run) -> None:  # noqa: ANN001
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for suffix in (".csv", ".md", ".jsonl", ".records.jsonl"):
        assert (out / f"{STEM}{suffix}").is_file(), suffix
    assert not (out / "gpu_check.csv").exists()  # a dry run never writes the GPU table's files
    rows = _rows(out)
    planned = gc.plan("cpu")
    assert len(planned) == 27 and {p.model for p in planned} == {"bert-base-uncased", "gpt2", "Llama-3.2-1B"}
    assert [(r["model"], r["method"], r["precision"], int(r["batch_size"]), int(r["seq_len"]), r["device"])
            for r in rows] == [p.key for p in planned]
    for r in rows:
        assert r["status"] in ("ok", "n/a"), r
        # never a GPU number on a CPU
        assert r["max_allocated_bytes"] == r["max_reserved_bytes"] == r["nvml_used_bytes"] == "", r
        assert r["err_allocated_frac"] == r["err_reserved_frac"] == r["err_device_frac"] == "", r
        assert _num(r["est_peak_bytes"]) > 0  # the analytic estimate is there for every row, n/a ones too
        if r["method"] == "qlora":
            assert r["status"] == "n/a" and "bitsandbytes" in r["reason"], r
        else:
            assert r["status"] == "ok", r
            assert _num(r["tracker_peak_bytes"]) > 0 and _num(r["step_time_s"]) > 0 and _num(r["tokens_per_s"]) > 0
            assert int(r["timed_steps"]) == 3
    md = (out / f"{STEM}.md").read_text()
    assert "CPU dry run" in md and "--dry-run --no-tier" in md and "torch " in md and "peft " in md
    assert md.count("| n/a |") == 9 and "QLoRA needs bitsandbytes" in md
    assert "worst estimate error" in proc.stdout and "rows: 18 ok, 9 n/a" in proc.stdout


def test_dry_run_errors_follow_from_the_row(dry_run) -> None:  # noqa: ANN001
    out, _ = dry_run
    for r in _rows(out):
        if r["status"] != "ok":
            continue
        tracked, measured = _num(r["est_tracked_peak_bytes"]), _num(r["tracker_peak_bytes"])
        assert _num(r["err_tracker_frac"]) == pytest.approx((tracked - measured) / measured, abs=1e-12)
        assert abs(_num(r["err_tracker_frac"])) < 0.05, r  # tiny stand-ins: a few KB of small tensors at most
        if r["traced_peak_bytes"]:
            assert _num(r["err_traced_frac"]) == pytest.approx((_num(r["traced_peak_bytes"]) - measured) / measured)
    traced = [r for r in _rows(out) if r["traced_peak_bytes"]]
    assert {r["model"] for r in traced} == {"bert-base-uncased", "gpt2", "Llama-3.2-1B"}  # --trace first


def test_dry_run_row_equals_an_independent_measurement(dry_run) -> None:  # noqa: ANN001
    """gpt2 LoRA fp32: the stand-in built here from the preset, measured here with run_measurement."""
    out, _ = dry_run
    preset, _ = resolve_spec("gpt2")
    cfg = {**preset.hf_config, "n_embd": 64, "n_head": 2, "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 0}
    spec = from_hf_config(cfg, "gpt2 (tiny)", source="file").with_layers(2)
    setup = resolve_setup(None, {"method": "lora", "batch_size": 2, "seq_len": 32, "device": "cpu", "dtype": "fp32"})
    m = run_measurement(spec, setup, warmup_steps=2, timed_steps=3)
    row = next(r for r in _rows(out) if (r["model"], r["method"], r["precision"]) == ("gpt2", "lora", "fp32"))
    assert m.status == "ok" and int(row["tracker_peak_bytes"]) == m.peak_bytes == m.tracker_peak_bytes
    assert int(row["trainable_params"]) == m.trainable_params and int(row["total_params"]) == m.total_params
    assert int(row["est_peak_bytes"]) == estimate(spec, setup).peak_bytes
    assert int(row["est_tracked_peak_bytes"]) == estimate(spec, setup, tracked=True).peak_bytes
    # the per-row JSONL holds the same row, and memprof's own records the same measurement
    records = [json.loads(line) for line in (out / f"{STEM}.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "run" and records[0]["device"] == "cpu"
    same = [r for r in records if r.get("kind") == "row" and (r["model"], r["method"], r["precision"]) ==
            ("gpt2", "lora", "fp32")]
    assert len(same) == 1 and same[0]["tracker_peak_bytes"] == m.peak_bytes
    memprof_records = [json.loads(line) for line in (out / f"{STEM}.records.jsonl").read_text().splitlines()]
    assert len(memprof_records) == 18 and all(r["schema"] == "memprof.measurement/1" for r in memprof_records)


def test_budget_records_the_rest_as_skipped(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert gc.main(["--dry-run", "--no-tier", "--budget-s", "1e-9", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    assert len(rows) == 27 and all(r["status"] == "skipped" and "skipped (time)" in r["reason"] for r in rows)
    assert "27 skipped" in capsys.readouterr().out


def test_resume_keeps_finished_rows(tmp_path: Path) -> None:
    planned = gc.plan("cpu")
    jsonl = tmp_path / f"{STEM}.jsonl"
    kept = {"kind": "row", **gc.row_identity(planned[4]), "status": "ok", "tracker_peak_bytes": 123}
    failed = {"kind": "row", **gc.row_identity(planned[5]), "status": "error", "reason": "boom"}
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ({"kind": "run"}, kept, failed)) + '{"kind": "ro')
    assert gc.main(["--dry-run", "--no-tier", "--resume", "--budget-s", "1e-9", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    assert rows[4]["status"] == "ok" and rows[4]["tracker_peak_bytes"] == "123"  # kept, not re-run
    assert rows[5]["status"] == "skipped" and sum(r["status"] == "skipped" for r in rows) == 26  # the error re-runs
    assert gc.main(["--dry-run", "--no-tier", "--budget-s", "1e-9", "--out", str(tmp_path)]) == 0  # no --resume
    assert (tmp_path / f"{STEM}.prev.jsonl").exists() and all(r["status"] == "skipped" for r in _rows(tmp_path))


def test_unreached_rows_read_not_run() -> None:
    planned = gc.plan("cuda")
    done = {"kind": "row", **gc.row_identity(planned[1]), "status": "ok"}
    rows = gc.table_rows(planned, [{"kind": "run"}, done])
    assert [r["status"] for r in rows[:3]] == ["not-run", "ok", "not-run"] and len(rows) == len(planned)
    assert planned[0].key == ("bert-base-uncased", "full", "fp32", 8, 256, "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_plan_refused_without_cuda(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert gc.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--dry-run" in err
    assert not (tmp_path / "out").exists()


def test_tier_records_summary_and_timeout(tmp_path: Path) -> None:
    (tmp_path / "test_tiny_tier.py").write_text(
        "import pytest\n\n@pytest.mark.gpu\ndef test_on_gpu():\n    pass\n\ndef test_plain():\n    pass\n")
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-W", "ignore",
            "test_tiny_tier.py"]
    tier = gc.run_tier(argv, tmp_path / "tier.log", 120, cwd=tmp_path)
    assert tier.rc == 0 and "1 passed" in tier.summary and "1 deselected" in tier.summary, tier
    hung = gc.run_tier([sys.executable, "-c", "import time; print('started'); time.sleep(60)"],
                       tmp_path / "hung.log", 1.0, cwd=tmp_path)
    assert hung.rc is None and "killed after" in hung.summary and not gc.tier_ok(hung)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_first_gpu_row(tmp_path: Path) -> None:
    """The real plan's first row (bert-base-uncased, full, fp32, b=8 s=256) in a worker, as the script runs it."""
    options = gc.options_from(gc.parse_args(["--out", str(tmp_path)]), ["--out", str(tmp_path)])
    row = gc.run_row(gc.plan("cuda")[0], options, timeout_s=300, trace=True)
    assert row["status"] == "ok", row.get("reason")
    assert 0 < row["max_allocated_bytes"] <= row["max_reserved_bytes"]
    if row["nvml_used_bytes"] is not None:
        assert row["max_reserved_bytes"] <= row["nvml_used_bytes"]
    assert row["tracker_peak_bytes"] > 0 and row["step_time_s"] > 0 and row["tokens_per_s"] > 0
    assert abs(row["err_allocated_frac"]) < 0.10, row  # the analytic estimate + cuBLAS workspace vs the allocator
