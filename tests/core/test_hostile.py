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

# Every hostile input is answered promptly: a hang (an unreachable hub retried for minutes, a 10^12-block replay)
# fails here. Not a speed target: a bound two orders of magnitude above what each case takes.
HANG_LIMIT_S = 120


@pytest.fixture(autouse=True)
def _answered_promptly():
    import time

    start = time.monotonic()
    yield
    assert time.monotonic() - start < HANG_LIMIT_S, "a hostile input took minutes to answer"


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
     "n_inner must be an integer between 1 and"),
    ('{"model_type": ["bert"]}', "model_type must be a string"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"model_type": "llama", "hidden_size": -64}', "must be a positive integer"),
    ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1000000000000, '
     '"vocab_size": 100, "intermediate_size": 128}', "is beyond any real model (memprof accepts at most 4,096)"),
    ('{"model_type": "bert", "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, '
     '"intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64, "type_vocab_size": -2}',
     "type_vocab_size must be an integer between 0 and"),
    ('{"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 100, "n_positions": 64, "attn_pdrop": NaN}',
     "attn_pdrop must be a probability in [0, 1], got nan"),
    ('{"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 100, "n_positions": 64, "resid_pdrop": 1.5}',
     "resid_pdrop must be a probability in [0, 1]"),
    ('{"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 100, "n_positions": 64, '
     '"tie_word_embeddings": "false"}', "tie_word_embeddings must be true or false, got 'false'"),
    ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, '
     '"vocab_size": 100, "intermediate_size": 128, "num_key_value_heads": 0}',
     "num_key_value_heads must be an integer between 1 and"),
    ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, '
     '"vocab_size": 100, "intermediate_size": 128, "head_dim": -32}', "head_dim must be an integer between 1 and"),
    ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, '
     '"vocab_size": 100, "intermediate_size": 128, "max_position_embeddings": "4096"}',
     "max_position_embeddings must be an integer between 1 and"),
], ids=["wrong type", "model_type a list", "deep nesting", "negative size", "10^12 layers", "negative token types",
        "NaN dropout", "dropout past 1", "string boolean", "no kv heads", "negative head_dim", "string positions"])
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
    (lambda r: r["spec"].update(num_layers=10**12), "num_layers = 1000000000000 is beyond any real model"),
], ids=["null batch", "null setup", "no spec", "wrong-typed spec", "10^12 layers"])
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


@pytest.mark.parametrize(("content", "message"), [
    (b"\x00\xff\xfe binary", "cannot be read as text"),
    (b"[lora]\n[lora.r]\nx = 1\n", "lora r must be an integer"),
    (b'device = 3\n', "device '3' is not supported"),
    (b'batch_size = [1, 2]\n', "batch size must be an integer"),
    (b"method = \n", "config file"),
    (None, "is a directory"),
], ids=["binary", "table for a number", "number for a name", "list for a number", "not TOML", "a directory"])
def test_a_config_file_that_is_not_a_run_file_is_one_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "run.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert message in _one_error_line(CliRunner().invoke(app, ["estimate", "roberta-base", "--config", str(path)]))


def test_compare_refuses_an_empty_method_list_and_an_impossible_length(tmp_path: Path) -> None:
    """An empty --methods (an unset shell variable) is not "every method"; a --seq-len past the position table
    is refused before a sweep starts, as estimate refuses it (no n/a rows, nothing written)."""
    out = tmp_path / "out" / "r.jsonl"
    line = _one_error_line(CliRunner().invoke(app, ["compare", "roberta-base", "--methods", "", "--out", str(out)]))
    assert "--methods must list at least one value" in line
    for flag in ([], ["--measure"]):
        if flag:
            pytest.importorskip("torch")
        r = CliRunner().invoke(app, ["compare", "roberta-base", "-m", "lora", "-s", "1000", *flag, "--out", str(out)])
        assert "sequence length 1000 exceeds FacebookAI/roberta-base's 512 learned positions" in _one_error_line(r)
    assert not out.parent.exists()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(peak_bytes=-537791128), "peak_bytes = -537791128: byte counts are integers >= 0"),
    (lambda m: m.update(peak_bytes=1.5e9), "byte counts are integers >= 0"),
    (lambda m: m.update(step_time_median_s=float("nan")), "step_time_median_s = nan: it must be a finite number"),
    (lambda m: m.update(samples_per_s=-4.0), "samples_per_s = -4.0: it must be a finite number >= 0"),
    (lambda m: m.update(steady_bytes="1 GB"), "steady_bytes = '1 GB': byte counts are integers >= 0"),
    (lambda m: m.update(step_time_ci95_s=5), "record is malformed"),
], ids=["negative peak", "fractional bytes", "NaN time", "negative rate", "string bytes", "number for an interval"])
def test_report_on_a_hand_edited_measurement_is_one_line(tmp_path: Path, edit, message: str) -> None:  # noqa: ANN001
    """Stored numbers are checked when read: a negative peak would otherwise print as a -537791128.0% saving."""
    pytest.importorskip("torch")
    import json

    from tiny_configs import tiny_spec
    from memprof.config import Device, Dtype, Method, RunSetup
    from memprof.runtime.runner import measure

    setup = RunSetup(method=Method.lora, batch_size=1, seq_len=8, dtype=Dtype.fp32, device=Device.cpu)
    measure(tiny_spec("gpt2"), setup, out_dir=tmp_path, name="m", isolate=False, timed_steps=1, breakdown=False)
    path = tmp_path / "m.jsonl"
    record = json.loads(path.read_text())
    edit(record["measurement"])
    path.write_text(json.dumps(record) + "\n")
    assert message in _one_error_line(CliRunner().invoke(app, ["report", str(path)]))


# (peft config JSON, words the error must contain): each is refused by trace and by measure before any worker runs
PEFT_CASES = [
    ("[1, 2]", "is not a peft config (a JSON object with a peft_type)"),
    (b"\x00\xff\xfe", "is not a JSON file"),
    ('{"peft_type": "NOSUCH"}', "peft_type 'NOSUCH' is not one of"),
    ('{"peft_type": "IA3", "task_type": "SEQ_CLS", "target_modules": ["query"], "feedforward_modules": ["dense"]}',
     "`feedforward_modules` should be a subset of `target_modules`"),
    ('{"peft_type": "LORA", "task_type": "SEQ_CLS", "target_modules": ["no_such_module"]}',
     "peft cannot apply LoraConfig to FacebookAI/roberta-base: No modules were targeted for adaptation"),
    ('{"peft_type": "LORA", "task_type": "SEQ_CLS", "target_modules": ["query"], "r": -4}', "lora r must be between 1"),
    ('{"peft_type": "LORA", "task_type": "SEQ_CLS", "target_modules": ["query"], "init_lora_weights": "loftq"}',
     "needs a package that is not installed (peft 0.21.2: The required package 'scipy' is not installed"),
    ('{"peft_type": "ADAMSS", "task_type": "SEQ_CLS", "target_modules": ["query"]}',
     "needs a package that is not installed (peft 0.21.2: scikit-learn is required for AdaMSS"),
    ('{"peft_type": "PROMPT_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 8, "prompt_tuning_init": "TEXT",'
     ' "prompt_tuning_init_text": "classify", "tokenizer_name_or_path": "no-such/tokenizer"}',
     "tokenizer_name_or_path 'no-such/tokenizer' is not a local folder, not in the hub cache, and the hub "
     "(127.0.0.1) is not reachable"),
]


@pytest.mark.parametrize("command", ["trace", "measure"])
@pytest.mark.parametrize(("content", "message"), PEFT_CASES,
                         ids=["a list", "binary", "unknown type", "IA3 feedforward outside targets", "no target matches",
                              "negative rank", "LoftQ needs scipy", "AdaMSS needs scikit-learn",
                              "tokenizer from an unreachable hub"])
def test_a_peft_config_that_cannot_run_is_one_line_before_any_work(tmp_path: Path, command: str,
                                                                   content: str | bytes, message: str) -> None:
    """What peft or a missing package would refuse inside the run is one line at once (exit 2), for measure as
    for trace: no worker starts, nothing is written, and no hub is waited on for a minute."""
    import time

    pytest.importorskip("peft")
    for package in ("scipy", "sklearn"):
        if package in message.replace("scikit-learn", "sklearn") and _installed(package):
            pytest.skip(f"{package} is installed here: the config runs")
    path = tmp_path / "adapter_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    extra = ["--out", str(out), "-b", "1", "-s", "16"] if command == "measure" else ["-s", "16"]
    started = time.monotonic()
    r = CliRunner().invoke(app, [command, "roberta-base", "--peft-config", str(path), *extra], env=env)
    assert message in _one_error_line(r)
    assert time.monotonic() - started < 60  # a hang (an unreachable hub is retried for minutes) fails here
    assert not out.exists()


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
