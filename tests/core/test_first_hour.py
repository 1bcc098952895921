"""A newcomer's first hour (issue 11): the base install, --version, help, TOML flag names, one resolution for
the CLI, the file and the Python API (no torch here: the runtime half is tests/runtime/test_peft_input.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memprof.cli import app
from memprof.errors import ConfigError
from memprof.resolve import measured_device, resolve_measured, resolve_setup

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[2] / "memprof" / "presets" / "run.example.toml"

# a base install, simulated: torch, transformers and peft cannot be imported
BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'accelerate'):
            raise ModuleNotFoundError(f"No module named '{name}'")
        return None
sys.meta_path.insert(0, Block())
from memprof.cli import main
sys.argv = ['memprof', *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(("args", "what"), [
    (["measure", "roberta-base", "--method", "lora"], "memprof measure"),
    (["trace", "roberta-base"], "memprof trace"),
    (["estimate", "roberta-base", "--trace"], "memprof estimate --trace"),
    (["compare", "roberta-base", "--measure"], "memprof compare --measure"),
])
def test_base_install_refuses_the_torch_commands_in_one_line(args: list[str], what: str) -> None:
    r = subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: {what} needs the torch stack") and "memprof[measure]" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_base_install_estimates() -> None:
    r = subprocess.run([sys.executable, "-c", BLOCK, "compare", "roberta-base", "-f", "json"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 4


def test_version_names_the_tested_and_installed_libraries() -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("memprof 0.1.0 (tested with torch 2.13.0, transformers")


def test_help_groups_options_and_shows_every_default() -> None:
    r = runner.invoke(app, ["estimate", "--help"], env={"COLUMNS": "160"})
    assert r.exit_code == 0
    for panel in ("Run shape", "Precision and kernels", "The loop", "LoRA and LoRA-like", "Overheads and config file"):
        assert panel in r.output
    assert "[default: 1]" in r.output and "[default: 512]" in r.output
    r = runner.invoke(app, ["measure", "--help"], env={"COLUMNS": "160"})
    assert "[default: the model name]" in r.output


def test_compare_takes_one_method_or_a_list_not_both() -> None:
    r = runner.invoke(app, ["compare", "gpt2", "-m", "lora", "-f", "json"])
    assert r.exit_code == 0 and [row["method"] for row in json.loads(r.stdout)] == ["lora"]
    r = runner.invoke(app, ["compare", "gpt2", "-m", "lora", "--methods", "full,lora"])
    assert r.exit_code == 2 and "give --methods or -m/--method, not both" in r.output


def test_toml_takes_the_flag_names_and_the_example_is_what_the_flags_give(tmp_path: Path) -> None:
    from_file = resolve_setup(EXAMPLE)
    flags = resolve_setup(None, {"method": "lora", "batch_size": 8, "seq_len": 1024, "dtype": "bf16",
                                 "optimizer": "adamw", "attn_impl": "sdpa", "grad_checkpointing": False,
                                 "device": "cuda", "loop": "trainer", "grad_accum": 4, "padded": True,
                                 "lora": {"r": 16, "alpha": 32, "targets": "q_proj,k_proj,v_proj,o_proj"},
                                 "overheads": {"cuda_context_bytes": 500 * 2**20, "allocator_reserve_frac": 0.05}})
    assert from_file == flags
    path = tmp_path / "run.toml"
    path.write_text('lora_r = 16\n[lora]\nalpha = 64\n')
    setup = resolve_setup(path, {"method": "lora"})
    assert (setup.lora.r, setup.lora.alpha) == (16, 64)
    with pytest.raises(ConfigError, match="lora must be a table of options"):
        path.write_text("lora = 5\n")
        resolve_setup(path, {"method": "lora"})
    with pytest.raises(ConfigError, match="is a directory"):
        resolve_setup(tmp_path)


def test_measure_precedence_is_flags_over_file_over_cpu_defaults(tmp_path: Path) -> None:
    """On a CPU the CPU defaults (fp32, b=8, s=128) fill only what neither the file nor the flags set."""
    path = tmp_path / "run.toml"
    path.write_text('batch_size = 2\nseq_len = 16\ndtype = "bf16"\n')
    setup, note = resolve_measured(path, {}, cuda_available=False)
    assert (setup.batch_size, setup.seq_len, setup.dtype.value, setup.device.value) == (2, 16, "bf16", "cpu")
    assert note == "CPU run"
    setup, note = resolve_measured(path, {"batch_size": 4}, cuda_available=False)
    assert setup.batch_size == 4 and setup.seq_len == 16
    setup, note = resolve_measured(None, {"seq_len": 64}, cuda_available=False)
    assert (setup.batch_size, setup.seq_len, setup.dtype.value) == (8, 64, "fp32")
    assert note == "CPU run; CPU defaults used: dtype=fp32, batch_size=8"
    path.write_text('device = "cpu"\n')
    assert measured_device(path, {}, cuda_available=True)[0].value == "cpu"  # the file's device is used
    setup, note = resolve_measured(None, {}, cuda_available=True)
    assert setup.device.value == "cuda" and note is None and setup.batch_size == 1  # no CPU defaults on a GPU


def test_measured_sweep_precedence_is_axes_and_flags_over_file_over_cpu_defaults(tmp_path: Path) -> None:
    """``compare --measure`` on a CPU: the same order as measure (flags and swept axes > --config > CPU defaults),
    for every method of the sweep."""
    from memprof.sweep import plan_setups

    path = tmp_path / "run.toml"
    path.write_text('batch_size = 2\nseq_len = 16\ndtype = "bf16"\n')
    device, defaults, used = measured_device(path, {}, cuda_available=False)
    assert device.value == "cpu" and used == []  # the file sets every CPU default
    setups = plan_setups(["full", "lora"], {"device": "cpu"}, file=path, defaults=defaults)
    assert {(s.batch_size, s.seq_len, s.dtype.value) for s in setups} == {(2, 16, "bf16")}
    setups = plan_setups(["lora"], {"device": "cpu", "batch_size": 4}, file=path, defaults=defaults,
                         seq_lens=[32, 64])
    assert [(s.batch_size, s.seq_len, s.dtype.value) for s in setups] == [(4, 32, "bf16"), (4, 64, "bf16")]
    _, defaults, used = measured_device(None, {}, cuda_available=False)
    setups = plan_setups(["lora"], {"device": "cpu"}, defaults=defaults)
    assert (setups[0].batch_size, setups[0].seq_len, setups[0].dtype.value) == (8, 128, "fp32")


@pytest.mark.parametrize(("device_name", "row"), [
    ("NVIDIA RTX A6000", "RTX-A6000"), ("NVIDIA RTX 6000 Ada Generation", "RTX-6000-Ada"), ("NVIDIA A40", "A40"),
    ("NVIDIA L40", "L40"), ("NVIDIA L40S", "L40S"), ("NVIDIA GeForce RTX 5090", "RTX-5090"),
    ("NVIDIA B200", "B200"), ("AMD Instinct MI300X", "MI300X"), ("NVIDIA H200", "H200"),
])
def test_gpu_catalog_has_the_gpus_people_fine_tune_on(device_name: str, row: str) -> None:
    """Each row: memory, dense bf16/fp16/tf32/fp32 peaks (for MFU) and the datasheet they come from; the device
    names torch reports map to them."""
    from memprof.analytic.flops import match_gpu
    from memprof.presets import gpu_catalog

    found = match_gpu(device_name)
    assert found is not None and found["name"] == row
    for g in {r["name"]: r for r in gpu_catalog().values()}.values():
        assert g["memory_mib"] > 0 and g["peak_fp32_tflops"] > 0 and g["source"]
        assert set(g) >= {"peak_bf16_tflops", "peak_fp16_tflops", "peak_tf32_tflops"}
        # dense tensor-core half precision is at least the plain FP32 rate on every GPU listed
        assert g["peak_fp16_tflops"] >= g["peak_fp32_tflops"]


@pytest.mark.parametrize("options", [{"method": "lora", "dtype": "bf16"}, {"method": "lora", "dtype": "fp32"},
                                     {"method": "full", "dtype": "bf16"}, {"method": "adapter", "dtype": "fp16"}])
def test_explain_model_state_lines_are_arithmetic_a_reader_can_check(options: dict) -> None:
    """The substituted side of every model-state term evaluates to its bytes, and no source cites a file that is
    not in the repository (design.md was one)."""
    import memprof

    est = memprof.estimate("roberta-base", explain=True, batch_size=8, seq_len=128, **options)
    states = [t for t in est.terms if t.category.value in ("params_trainable", "params_frozen", "gradients",
                                                           "optimizer_states", "master_weights")]
    assert states
    for term in states:
        expr = term.substituted.replace(",", "").replace(" B", "").replace("x", "*")
        expr = expr.replace(" step counters * 4", " * 4")
        assert eval(expr, {"__builtins__": {}}) == term.bytes, (term.name, term.substituted, term.bytes)  # noqa: S307
    assert not any("design.md" in t.source for t in est.terms)
