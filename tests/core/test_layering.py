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
            "from memprof.hub import resolve_spec\nfrom memprof.resolve import resolve_setup\n"
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


def test_modules_stay_small_and_say_what_they_mirror() -> None:
    """Issue 9: one reason to change per module. No module past ~500 lines unless its docstring says why; every
    analytic script names the transformers release it mirrors, which must be the tested one (moving the pin in
    constraints.txt means re-reading those files against the new modeling code)."""
    import re
    from pathlib import Path

    from memprof.compat import TESTED_VERSIONS

    root = Path(__file__).resolve().parents[2] / "memprof"
    for path in root.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 520:
            assert "Longer than 500 lines because" in text[:2000], f"{path.relative_to(root)}: split it or say why"
    tested = ".".join(TESTED_VERSIONS["transformers"].split(".")[:2])
    scripts = [*(root / "analytic" / "families").glob("[!_]*.py"),
               *(root / "analytic" / name for name in ("forward.py", "attention.py", "heads.py", "hf_layers.py"))]
    for path in scripts:
        named = set(re.findall(r"transformers (\d+\.\d+)", path.read_text()[:1500]))
        assert named == {tested}, f"{path.name} mirrors transformers {named or '?'}, the tested version is {tested}"
