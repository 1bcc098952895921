"""Hostile and malformed input (issue 10, class 1 "silent wrong numbers" and class 3 "tracebacks"): every value
of the wrong type or out of range is refused with one line, through the CLI (exit 2, one ``error:`` line, no
traceback, nothing written) and the Python API (a MemprofError subclass), before any work starts. A string
``"no"`` must never reach a boolean field: it is truthy and would silently switch the option on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

import memprof
from memprof.cli import app
from memprof.errors import MemprofError

# (options given to memprof.estimate("roberta-base", ...), words the one-line error must contain)
API_CASES = [
    ({"grad_checkpointing": "no"}, "grad checkpointing must be true or false"),
    ({"dropout": "false"}, "dropout must be true or false"),
    ({"padded": 1}, "padded must be true or false"),
    ({"method": "adapter", "adapter_train_norms": "no"}, "adapter train norms must be true or false"),
    ({"method": "qlora", "double_quant": "no"}, "quant double quant must be true or false"),
    ({"method": "prefix", "prefix_projection": "yes"}, "prompt projection must be true or false"),
    ({"method": "lora", "lora_targets": ["query", 3]}, "lora.targets must be a list of module names"),
    ({"method": "ia3", "ia3_targets": 5}, "ia3 targets must be a list of module names"),
    ({"method": "lora", "lora_bias": 0}, "lora bias must be a string"),
    ({"method": "lora", "lora_dropout": math.nan}, "lora dropout must be a finite number"),
    ({"method": "lora", "lora_dropout": "0.1"}, "lora dropout must be a finite number"),
    ({"method": "lora", "lora_r": "16"}, "lora r must be an integer"),
    ({"method": "lora", "lora_r": 16.5}, "lora r must be an integer"),
    ({"method": "lora", "lora_r": 0}, "lora r must be between 1"),
    ({"method": "adapter", "adapter_size": -1}, "adapter bottleneck must be between 1"),
    ({"method": "adapter", "adapter_act": 3}, "adapter activation must be a string"),
    ({"method": "prompt", "virtual_tokens": 0}, "num virtual tokens must be between 1"),
    ({"method": "prefix", "prompt": {"projection": True, "projection_hidden": -5}},
     "prefix projection hidden size must be between 1"),
    ({"reserve_frac": math.nan}, "must be a finite number"),
    ({"reserve_frac": 2.0}, "allocator reserve fraction must be in [0, 1]"),
    ({"cuda_context_mib": math.inf}, "cuda_context_mib must be a finite number >= 0"),
    ({"cuda_context_mib": -1}, "cuda_context_mib must be a finite number >= 0"),
    ({"batch_size": 2.5}, "batch size must be an integer"),
    ({"batch_size": True}, "batch size must be an integer"),
    ({"seq_len": "128"}, "sequence length must be an integer"),
    ({"grad_accum": 0}, "gradient accumulation steps must be between 1"),
    ({"lora": "r=16"}, "lora must be a table of options"),
    ({"dtype": "fp8"}, "dtype 'fp8' is not supported"),
    ({"no_such_option": 1}, "unknown option 'no_such_option'"),
]


@pytest.mark.parametrize(("options", "message"), API_CASES, ids=[str(c[0]) for c in API_CASES])
def test_api_refuses_wrong_types_and_ranges(options: dict, message: str) -> None:
    with pytest.raises(MemprofError) as exc:
        memprof.estimate("roberta-base", **options)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("model", [123, ["bert"], 3.5])
def test_api_refuses_a_model_that_is_not_a_name(model: object) -> None:
    with pytest.raises(MemprofError, match="model must be a preset name"):
        memprof.estimate(model)  # type: ignore[arg-type]


# (a TOML run file, words the error must contain): the same checks for a config file, where "no" is a string
TOML_CASES = [
    ('grad_checkpointing = "no"\n', "grad checkpointing must be true or false"),
    ('dropout = "off"\n', "dropout must be true or false"),
    ('method = "adapter"\nadapter_train_norms = "no"\n', "adapter train norms must be true or false"),
    ('method = "qlora"\ndouble_quant = "false"\n', "quant double quant must be true or false"),
    ('method = "lora"\n[lora]\nr = "16"\n', "lora r must be an integer"),
    ('method = "lora"\n[lora]\ntargets = [1, 2]\n', "lora.targets must be a list of module names"),
    ('reserve_frac = nan\n', "must be a finite number"),
    ('cuda_context_mib = inf\n', "cuda_context_mib must be a finite number >= 0"),
    ('lora = 3\n', "lora must be a table of options"),
]


@pytest.mark.parametrize(("text", "message"), TOML_CASES, ids=[c[0].strip() for c in TOML_CASES])
def test_config_file_values_are_checked_like_flags(tmp_path: Path, text: str, message: str) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["compare", "roberta-base", "--config", str(toml), "--out", str(out / "r.jsonl")])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert "Traceback" not in r.output and not out.exists()  # nothing written


# (CLI arguments, words the one-line error must contain): checked before any work starts
CLI_CASES = [
    (["estimate", "roberta-base", "--cuda-context-mib", "nan"], "cuda_context_mib must be a finite number >= 0"),
    (["estimate", "roberta-base", "--cuda-context-mib", "inf"], "cuda_context_mib must be a finite number >= 0"),
    (["estimate", "roberta-base", "--reserve-frac", "nan"], "must be a finite number"),
    (["estimate", "roberta-base", "--num-labels", "0"], "--num-labels must be an integer between 1"),
    (["estimate", "roberta-base", "--num-labels", "-3"], "--num-labels must be an integer between 1"),
    (["estimate", "roberta-base", "--gpu", "9" * 60 + "GiB"], "--gpu size must be positive and at most"),
    (["estimate", "roberta-base", "--gpu", "0GiB"], "--gpu size must be positive"),
    (["fit", "roberta-base", "--gpu", "1e400GiB"], "unknown GPU '1e400GiB'; give a size like 24GiB"),
    (["compare", "roberta-base", "--methods", "lora", "--adapter-size", "8"],
     "adapter options do not apply to the methods swept (lora)"),
    (["compare", "roberta-base", "--methods", "full,bitfit", "--lora-r", "16"],
     "lora options do not apply to the methods swept (full, bitfit)"),
    (["compare", "roberta-base", "--measure", "--timeout", "nan"], "--timeout must be a number of seconds > 0"),
    (["compare", "roberta-base", "--measure", "--timeout", "0"], "--timeout must be a number of seconds > 0"),
]


@pytest.mark.parametrize(("args", "message"), CLI_CASES, ids=[" ".join(c[0][:4]) for c in CLI_CASES])
def test_cli_refuses_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(app, [*args, *(["--out", str(out / "r.jsonl")] if args[0] == "compare" else [])])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert "Traceback" not in r.output and not out.exists()


def test_measure_refuses_a_timeout_that_never_fires() -> None:
    pytest.importorskip("torch")
    from memprof.resolve import resolve_setup
    from memprof.runtime.runner import measure
    from memprof.hub import resolve_spec

    spec, _ = resolve_spec("roberta-base")
    with pytest.raises(MemprofError, match="--timeout must be a number of seconds > 0"):
        measure(spec, resolve_setup(None, {"device": "cpu"}), timeout_s=math.nan, out_dir=None)


def test_fit_says_when_the_answer_is_a_limit_not_memory() -> None:
    """A huge GPU: the batch search's cap and the model's position table are reported as what they are."""
    r = CliRunner().invoke(app, ["fit", "roberta-base", "-s", "128", "--gpu", "100000GiB"])
    assert r.exit_code == 0, r.output
    assert "largest batch size that fits at s=128: 65536 or more (the search stops there)" in r.output
    assert "at b=1: 512 (the model's 512 learned positions" in r.output
    r = CliRunner().invoke(app, ["fit", "Llama-3.2-1B", "-s", "128", "--gpu", "100000GiB"])
    assert "largest sequence length that fits at b=1: 1048576 or more (the search stops there)" in r.output


# needs the torch stack (the checks run before anything is built or measured)
TORCH_CLI_CASES = [
    (["trace", "roberta-base", "--layers", "0"], "trace depth must be between 1 and 10 for a 12-block model"),
    (["trace", "roberta-base", "--layers", "-3"], "trace depth must be between 1 and 10"),
    (["trace", "roberta-base", "--layers", "1000"], "trace depth must be between 1 and 10"),
    (["trace", "roberta-base", "--layers", "many"], "must be auto, full or a block count"),
    (["measure", "roberta-base", "--name", "../../escaped"], "--name must be a file name stem"),
    (["measure", "roberta-base", "--name", "a/b"], "--name must be a file name stem"),
    (["measure", "roberta-base", "--timeout", "-1"], "--timeout must be a number of seconds > 0"),
]


@pytest.mark.parametrize(("args", "message"), TORCH_CLI_CASES, ids=[" ".join(c[0][:4]) for c in TORCH_CLI_CASES])
def test_torch_commands_refuse_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, [*args, *(["--out", str(out)] if args[0] == "measure" else [])])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert "Traceback" not in r.output and not out.exists() and not (tmp_path / "escaped.jsonl").exists()


@pytest.mark.parametrize("content", [b"", b'{"schema": "memprof.estim'], ids=["empty", "torn first record"])
def test_an_empty_or_torn_results_file_resumes(tmp_path: Path, content: bytes) -> None:
    """An interrupted first write leaves an empty file or a torn first line: the sweep resumes from nothing,
    appends its records on lines of their own, and the file then reads back whole."""
    path = tmp_path / "r.jsonl"
    path.write_bytes(content)
    r = CliRunner().invoke(app, ["compare", "roberta-base", "-m", "lora", "--out", str(path)])
    assert r.exit_code == 0, r.output
    again = CliRunner().invoke(app, ["compare", "roberta-base", "-m", "lora", "--out", str(path), "-f", "json"])
    assert again.exit_code == 0 and "1 of 1 runs reused" in again.output
    report = CliRunner().invoke(app, ["report", str(path), "-f", "csv"])
    assert report.exit_code == 0 and report.output.count("\n") == 2  # header + the one run


def test_a_results_file_that_is_not_memprofs_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.jsonl"
    path.write_text('{"loss": 1.5}\n')
    r = CliRunner().invoke(app, ["compare", "roberta-base", "-m", "lora", "--out", str(path)])
    assert r.exit_code == 2 and "not memprof's" in r.output
    assert path.read_text() == '{"loss": 1.5}\n'  # nothing appended


@pytest.mark.parametrize(("args", "message"), [
    (["estimate", "roberta-base", "--timeout", "nan"], "No such option: --timeout"),
    (["estimate", "roberta-base", "-b", "abc"], "'abc' is not a valid int"),
    (["estimate", "roberta-base", "-b"], "requires an argument"),
    (["nosuch"], "No such command 'nosuch'"),
    (["estimate", "roberta-base", "--dtype", "fp8"], "dtype 'fp8' is not supported"),
], ids=["unknown option", "not an int", "missing value", "unknown command", "memprof's own error"])
def test_usage_errors_are_one_line_from_the_console(args: list[str], message: str) -> None:
    """click's own usage errors (not memprof's) through the real entry point: one error line, exit 2, no box."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "memprof", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def _one_error_line(r) -> str:  # noqa: ANN001
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    return lines[0]


@pytest.mark.parametrize(("config", "message"), [
    ('{"model_type": "gpt2", "n_inner": "abc", "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 100}',
     "a field has the wrong type or value"),
    ('{"model_type": ["bert"]}', "model_type must be a string"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"model_type": "llama", "hidden_size": -64}', "must be a positive integer"),
    ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1000000000000, '
     '"vocab_size": 100, "intermediate_size": 128}', "is beyond any real model (memprof accepts at most 4,096)"),
], ids=["wrong type", "model_type a list", "deep nesting", "negative size", "10^12 layers"])
def test_malformed_config_json_is_one_line(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(config)
    assert message in _one_error_line(CliRunner().invoke(app, ["estimate", str(path)]))


def test_a_name_too_long_for_the_file_system_is_one_line(tmp_path: Path) -> None:
    for model in ("a" * 300, str(tmp_path / ("b" * 300) / "config.json")):
        assert "neither a preset nor a readable path" in _one_error_line(CliRunner().invoke(app, ["estimate", model]))


@pytest.mark.parametrize("option", ["--out", "--plot"])
def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path: Path, option: str) -> None:
    """A results file or plot under a path component that is a file, or in a place that refuses files, is one
    line before the sweep runs, and nothing is created."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    suffix = ".jsonl" if option == "--out" else ".png"
    for target, words in ((blocker / f"x{suffix}", "exists and is not a folder"),
                          (Path("/proc") / f"x{suffix}", "cannot be")):
        if option == "--plot":
            pytest.importorskip("matplotlib")
        line = _one_error_line(CliRunner().invoke(app, ["compare", "roberta-base", "-m", "lora", option, str(target)]))
        assert words in line and option in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_measure_checks_its_folder_and_weights_before_any_worker(tmp_path: Path) -> None:
    """An unwritable --out and hub weights that cannot be fetched are one line at once (transformers would retry
    an unreachable hub for minutes inside the run); the hub endpoint is HF_ENDPOINT's, as the client's."""
    pytest.importorskip("torch")
    runner = CliRunner()
    line = _one_error_line(runner.invoke(app, ["measure", "roberta-base", "--out", "/proc/nope", "-b", "1"]))
    assert "--out /proc/nope cannot be written" in line
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    line = _one_error_line(runner.invoke(app, ["measure", "roberta-base", "--pretrained", "no-such/model", "--out",
                                               str(tmp_path / "m")], env=env))
    assert "not in the hub cache, and the hub (127.0.0.1) is not reachable" in line
    assert not (tmp_path / "m").exists()  # checking created nothing


def test_escape_sequences_in_names_and_records_never_reach_the_terminal(tmp_path: Path) -> None:
    """A model name or a record read from someone else's file holding terminal escapes (clear screen, retitle)
    is printed with them shown as \\xNN, never raw."""
    line = _one_error_line(CliRunner().invoke(app, ["estimate", "rob\x1b[2Jerta"]))
    assert "\x1b" not in line and "\\x1b[2J" in line
    path = tmp_path / "r.jsonl"
    assert CliRunner().invoke(app, ["compare", "roberta-base", "-m", "lora", "--out", str(path)]).exit_code == 0
    path.write_text(path.read_text().replace("FacebookAI/roberta-base", "evil\\u001b]0;pwned\\u0007name"))
    for fmt in ("table", "markdown", "csv", "json", "html"):
        r = CliRunner().invoke(app, ["report", str(path), "-f", fmt])
        assert r.exit_code == 0, r.output
        assert "\x1b" not in r.output and "\x07" not in r.output and "pwned" in r.output


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["setup"].update(batch_size=None), "batch size must be an integer"),
    (lambda r: r.update(setup=None), "record is malformed"),
    (lambda r: r.pop("spec"), "record has no spec"),
    (lambda r: r["spec"].update(hidden_size="x"), "hidden_size must be a positive integer"),
], ids=["null batch", "null setup", "no spec", "wrong-typed spec"])
def test_report_on_hand_edited_records_is_one_line(tmp_path: Path, edit, message: str) -> None:  # noqa: ANN001
    import json

    path = tmp_path / "r.jsonl"
    assert CliRunner().invoke(app, ["compare", "roberta-base", "-m", "lora", "--out", str(path)]).exit_code == 0
    record = json.loads(path.read_text().splitlines()[0])
    edit(record)
    path.write_text(json.dumps(record) + "\n")
    assert message in _one_error_line(CliRunner().invoke(app, ["report", str(path)]))


def test_measure_refuses_a_sequence_past_the_position_table_before_the_worker(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    r = CliRunner().invoke(app, ["measure", "roberta-base", "-s", "1000", "-b", "1", "--out", str(tmp_path / "m")])
    assert "exceeds FacebookAI/roberta-base's 512 learned positions" in _one_error_line(r)
    assert not (tmp_path / "m").exists()  # no error record: nothing ran
