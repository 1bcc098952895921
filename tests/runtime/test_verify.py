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
from memprof.verify import verify_batch_size  # noqa: E402
from memprof.cli import app  # noqa: E402
from tiny_configs import LLAMA, tiny_spec  # noqa: E402


def test_fit_verify_runs_the_predicted_size_on_cpu(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA))
    r = CliRunner().invoke(app, ["fit", str(config), "-s", "32", "--dtype", "fp32", "--gpu", "0.52GiB", "--verify",
                                 "-f", "json"])
    assert r.exit_code == 0, r.output
    check = json.loads(r.output[r.output.index('{\n  "predicted_batch_size"'):])
    assert check["device"] == "cpu" and check["predicted_batch_size"] >= 1
    ok = [a for a in check["attempts"] if a["status"] == "ok"]
    assert check["confirmed_batch_size"] == ok[0]["batch_size"] <= check["predicted_batch_size"]
    assert ok[0]["device_total_bytes"] <= check["budget_bytes"] and check["limiting_phase"] in ("forward", "backward")


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

    check = verify_batch_size(spec, setup, gpu, "cpu", measure=capped)
    assert check.attempts[0].status == "oom" and sizes[1] == sizes[0] - 1
    assert check.confirmed == sizes[-1] and check.attempts[-1].status == "ok"
