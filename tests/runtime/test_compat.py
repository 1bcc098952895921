"""Library versions and refusals: the tested pins, the refusal rules against the installed libraries, and the
one-line refusals of estimate / trace / measure / compare."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from typer.testing import CliRunner  # noqa: E402

from memprof import compat  # noqa: E402
from memprof.cli import app  # noqa: E402
from memprof.config import Method  # noqa: E402
from memprof.resolve import resolve_setup  # noqa: E402
from memprof.errors import LibraryRefusalError  # noqa: E402
from memprof.runtime.refusals import library_refusals, refusal_from  # noqa: E402
from memprof.runtime.trace import trace_depth  # noqa: E402
from memprof.spec import Task  # noqa: E402
from tiny_configs import CONFIGS, tiny_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_tested_versions_are_the_constraints_file() -> None:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", (ROOT / "constraints.txt").read_text(), re.M))
    for library, version in compat.TESTED_VERSIONS.items():
        assert pins[library] == version, f"constraints.txt pins {library}=={pins[library]}, compat says {version}"


def test_version_specifiers() -> None:
    assert compat.satisfies("5.24.0", ">=5.24") and compat.satisfies("5.24.0rc1", ">=5.24")
    assert not compat.satisfies("5.23.0", ">=5.24") and compat.satisfies("2.13.0+cpu", "==2.13")
    assert compat.satisfies("0.21.2", ">=0.21,<=0.21.2") and not compat.satisfies("0.22.0", "<=0.21.2")
    assert not compat.satisfies(None, ">=0")
    with pytest.raises(ValueError):
        compat.satisfies("5.24.0", "~=5")


CASES = [(family, task) for family in CONFIGS for task in (Task.seq_cls, Task.causal_lm)]


@pytest.mark.parametrize(("family", "task"), CASES, ids=[f"{f}-{t.value}" for f, t in CASES])
def test_prefix_rules_match_the_installed_libraries(family: str, task: Task, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the rules switched off, the installed transformers/peft refuse prefix tuning exactly where a rule says
    they do (with its message), and run it everywhere else: the rules describe the installed libraries."""
    spec = tiny_spec(family).with_task(task)
    setup = resolve_setup(None, {"method": "prefix", "batch_size": 2, "seq_len": 16, "device": "cpu",
                                 "prompt": {"num_virtual_tokens": 4}})
    rule = compat.known_refusal(spec, setup)
    monkeypatch.setattr(compat, "KNOWN_REFUSALS", ())
    if rule is None:
        trace_depth(spec, setup)  # runs
        return
    with pytest.raises(LibraryRefusalError) as refused:
        trace_depth(spec, setup)
    assert refused.value.library == rule.raised_by and refused.value.reason == rule.reason


def test_refusal_from_tells_a_library_refusal_from_other_errors() -> None:
    """An explicit raise in peft's code is a refusal (library, version, message); the same exception type raised
    elsewhere, or another type raised by peft, is not."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(LibraryRefusalError) as refused, library_refusals("LoRA on a toy"):
        peft.get_peft_model(model, peft.LoraConfig(target_modules=["no_such_module"]))
    assert refused.value.library == "peft" and refused.value.version == compat.installed_version("peft")
    assert str(refused.value).startswith(f"peft {peft.__version__} refuses LoRA on a toy: Target modules")
    try:
        raise ValueError("a memprof bug")
    except ValueError as exc:
        assert refusal_from(exc, "x") is None
    try:
        peft.LoraConfig(r="eight").__post_init__()  # a library failing on bad input (TypeError), not refusing
    except Exception as exc:  # noqa: BLE001
        assert refusal_from(exc, "x") is None


@pytest.fixture
def ia3_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    rule = compat.KnownRefusal(raised_by="peft", methods=(Method.ia3,), tasks=(Task.seq_cls,), model_types=("bert",),
                               when=(("peft", ">=0"),), reason="IA3 is not supported here.", cause="a test rule")
    monkeypatch.setattr(compat, "KNOWN_REFUSALS", (rule,))


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIGS["bert"]))
    return path


@pytest.mark.parametrize("command", [["trace"], ["measure", "--device", "cpu"], ["estimate", "--trace"]])
def test_refusals_are_one_line_exit_2_and_write_nothing(command: list[str], tmp_path: Path, ia3_refused: None) -> None:
    out = tmp_path / "out"
    r = runner.invoke(app, [command[0], str(_config(tmp_path)), *command[1:], "--method", "ia3", "-b", "2", "-s", "16",
                            *(["--out", str(out)] if command[0] == "measure" else [])])
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"error: peft {peft.__version__} refuses IA3 on ") and r.output.count("\n") == 1
    assert "IA3 is not supported here" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_the_analytic_estimate_notes_a_refusal(tmp_path: Path, ia3_refused: None) -> None:
    r = runner.invoke(app, ["estimate", str(_config(tmp_path)), "--method", "ia3", "-b", "2", "-s", "16"])
    assert r.exit_code == 0, r.output
    assert "note: the installed libraries refuse this run (peft" in r.output


def test_sweeps_record_a_refusal_as_na(tmp_path: Path, ia3_refused: None) -> None:
    out = tmp_path / "sweep.jsonl"
    r = runner.invoke(app, ["compare", str(_config(tmp_path)), "--methods", "full,ia3", "-b", "2", "-s", "16",
                            "--trace", "--out", str(out), "-f", "json"])
    assert r.exit_code == 0, r.output
    rows = {row["method"]: row for row in json.loads(r.stdout)}
    assert rows["full"]["traced_peak_bytes"] > 0
    assert rows["ia3"]["traced_peak_bytes"] is None and "trace n/a: peft" in rows["ia3"]["note"]
    assert "estimate only: peft" in rows["ia3"]["note"]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert any(rec.get("kind") == "traced" and rec["status"] == "n/a" for rec in records)


def test_a_refusal_inside_the_worker_is_an_na_record(tmp_path: Path) -> None:
    """A refusal no rule predicts (a peft config applied as given) is found by the worker: status n/a, the
    library's message, and `memprof measure` says it in one line with exit 2. DistilBERT's forward has never
    taken past_key_values, so peft refuses sequence-classification prefix tuning on it under every version."""
    config = tmp_path / "distilbert.json"
    config.write_text(json.dumps({"model_type": "distilbert", "vocab_size": 100, "dim": 32, "n_layers": 1,
                                  "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 64}))
    peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, token_dim=32, num_attention_heads=2,
                            num_layers=1, num_transformer_submodules=1).save_pretrained(str(tmp_path / "prefix"))
    r = runner.invoke(app, ["measure", str(config), "--device", "cpu", "--task", "seq-cls", "-b", "2", "-s", "16",
                            "--peft-config", str(tmp_path / "prefix" / "adapter_config.json"),
                            "--out", str(tmp_path / "out"), "--warmup", "1", "--steps", "1"])
    assert r.exit_code == 2 and r.output.startswith(f"error: peft {peft.__version__} refuses a PREFIX_TUNING peft "
                                                    "config on ") and r.output.count("\n") == 1, r.output
    assert "Model does not support past key values" in r.output
    (results,) = (tmp_path / "out").glob("*.jsonl")
    record = json.loads(results.read_text())
    assert record["measurement"]["status"] == "n/a" and "past key values" in record["measurement"]["message"]
