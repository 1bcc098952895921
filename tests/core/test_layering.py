"""The estimate path never imports the torch stack (or pandas): it must stay fast and work without them."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "accelerate", "pandas")


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.strip()
    return {m for m in out.split(",") if m}


def test_core_does_not_import_torch() -> None:
    code = ("import memprof.analytic, memprof.report, memprof.hub, memprof.analytic.fit, memprof.analytic.flops\n"
            "from memprof.hub import resolve_spec\nfrom memprof.config import resolve_setup\n"
            "from memprof.analytic import estimate\n"
            "spec, _ = resolve_spec('Llama-3.2-1B')\n"
            "estimate(spec, resolve_setup(None, {'method': 'lora', 'batch_size': 4}), explain=True)")
    assert _modules_after(code) == set()


def test_cli_estimate_does_not_import_torch() -> None:
    code = ("from typer.testing import CliRunner\nfrom memprof.cli import app\n"
            "r = CliRunner().invoke(app, ['estimate', '--params', '3e9', '--dtype', 'fp16', '--method', 'adapter',"
            " '--gpu', 'A100-80GB', '--explain', '-f', 'json'])\nassert r.exit_code == 0, r.output")
    assert _modules_after(code) == set()


def test_measure_runner_does_not_import_torch_in_the_parent() -> None:
    assert _modules_after("import memprof.runtime.runner, memprof.runtime") == set()
