"""memprof fit --verify (issue 13): the predicted largest batch, then real steps at it in worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from memprof.analytic.fit import resolve_gpu  # noqa: E402
from memprof.resolve import resolve_setup  # noqa: E402
from memprof.runtime.runner import measure  # noqa: E402
from memprof.verify import verify_fit  # noqa: E402
from memprof.cli import app  # noqa: E402
from tiny_configs import LLAMA, tiny_spec  # noqa: E402


def test_fit_verify_runs_the_predicted_size_on_cpu(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA))
    r = CliRunner().invoke(app, ["fit", str(config), "-s", "32", "-b", "2", "--dtype", "fp32", "--gpu", "0.52GiB",
                                 "--verify", "-f", "json"])
    assert r.exit_code == 0, r.output
    checks = json.loads(r.output[r.output.index('{\n  "verified"'):])["verified"]
    assert [c["dimension"] for c in checks] == ["batch_size", "seq_len"]
    for check in checks:
        assert check["device"] == "cpu" and check["predicted"] >= 1 and check["attempts"][0]["size"] == check["predicted"]
        ok = [a for a in check["attempts"] if a["status"] == "ok"]
        assert check["confirmed"] == max(a["size"] for a in ok) <= check["predicted"]
        assert all(a["device_total_bytes"] <= check["budget_bytes"] for a in ok)
        assert check["limiting_phase"] in ("forward", "backward", "optimizer")
    # the prediction is the estimate's (fit's own table): the largest batch at s=32 and sequence at b=2
    table = CliRunner().invoke(app, ["fit", str(config), "-s", "32", "-b", "2", "--dtype", "fp32", "--gpu", "0.52GiB"])
    assert f"at s=32: {checks[0]['predicted']}" in table.output and f"at b=2: {checks[1]['predicted']}" in table.output


def test_verify_backs_off_after_an_out_of_memory() -> None:
    """A worker whose address space is capped runs out of memory at the predicted size (a real OOM, recorded as a
    result); verify steps the batch down until a size runs."""
    spec = tiny_spec("llama")
    setup = resolve_setup(None, {"seq_len": 64, "dtype": "fp32"})
    gpu = resolve_gpu("0.6GiB")
    sizes: list[int] = []

    def capped(spec, run, **kw):  # noqa: ANN001, ANN202
        sizes.append(run.batch_size)
        # the first attempt gets 1 MiB of headroom (it cannot even build its batch), the others 1 GiB
        return measure(spec, run, memory_limit_bytes=2**20 if len(sizes) == 1 else 2**30, **kw)

    check = verify_fit(spec, setup, gpu, "cpu", measure=capped)
    assert check.attempts[0].status == "oom" and sizes[1] == sizes[0] - max(1, sizes[0] // 32)  # ~3% back-off
    assert check.confirmed == sizes[-1] and check.attempts[-1].status == "ok"


def test_an_over_budget_run_scales_the_next_try_by_what_it_measured() -> None:
    """A run that measured 20% over its estimate: the next size is the one the estimate allows once scaled by
    that 20%, not a 3% step (which would need several tries to get under)."""
    import dataclasses

    from memprof.analytic import estimate

    spec = tiny_spec("llama")
    setup = resolve_setup(None, {"seq_len": 64, "dtype": "fp32"})
    gpu = resolve_gpu("0.75GiB")  # 1.2x over it leaves room: the scaled estimate allows b=341 of 674
    sizes: list[int] = []

    def over_by_20_percent(spec, run, **kw):  # noqa: ANN001, ANN202
        sizes.append(run.batch_size)
        m = measure(spec, run, isolate=False, **{k: v for k, v in kw.items() if k != "timeout_s"})
        # report the real step's peak scaled so that its device total is 1.2x the estimate's
        plan = dataclasses.replace(run, device=setup.device)
        est = estimate(spec, plan).device
        target_total = int(1.2 * est.device_total_bytes)
        return dataclasses.replace(m, peak_bytes=m.peak_bytes + (target_total - _cpu_total(m, plan)))

    def _cpu_total(m, plan):  # noqa: ANN001, ANN202
        from memprof.verify import _measured_total
        return _measured_total(m, plan)

    check = verify_fit(spec, setup, gpu, "cpu", measure=over_by_20_percent)
    assert check.attempts[0].status == "too big"

    def total(b: int) -> int:
        return estimate(spec, dataclasses.replace(setup, batch_size=b)).device.device_total_bytes

    ratio = check.attempts[0].device_total_bytes / total(sizes[0])
    assert 1.2 <= ratio < 1.3
    # the second try is the largest batch whose estimate, scaled by what the first run measured, fits the budget
    assert total(sizes[1]) * ratio <= gpu.memory_bytes < total(sizes[1] + 1) * ratio
    assert sizes[1] < sizes[0] - max(1, sizes[0] // 32)  # far below one 3% step
    # that size runs within the budget; the next tries bisect between it and the first size, which did not
    assert check.attempts[1].status == "ok" and sizes[2] == (sizes[0] + sizes[1]) // 2
    assert check.confirmed == max(a.size for a in check.attempts if a.status == "ok")
