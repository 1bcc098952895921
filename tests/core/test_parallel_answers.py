"""Issue 12's answers beyond one GPU: compare --world-sizes/--strategies (scaling.py) and fit --strategy
(analytic/fit.py fit_world), checked by properties a reader can verify by hand, and through the CLI."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from memprof.analytic import estimate
from memprof.analytic.fit import fit_world, max_batch_size, on_world, resolve_gpu
from memprof.cli import app
from memprof.errors import ConfigError
from memprof.hub import resolve_spec
from memprof.resolve import resolve_setup
from memprof.scaling import plan_worlds, rank_row, rank_rows, smallest_fitting
from memprof.sweep import plan_setups

runner = CliRunner()


def run(*args: str):  # noqa: ANN202
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def llama_1b():  # noqa: ANN201
    return resolve_spec("Llama-3.2-1B")[0]


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_full_fine_tuning_per_rank_peak_falls_with_the_world(llama_1b, strategy: str) -> None:  # noqa: ANN001
    # sharded states: each doubling of the ranks halves the states' share, so every rank's peak drops
    setup = resolve_setup(None, {"method": "full", "seq_len": 256})
    rows = rank_rows(llama_1b, [setup], plan_worlds("2,4,8,16", strategy, {}))
    peaks = [r.peak_bytes for r in rows]
    assert [r.world_size for r in rows] == [2, 4, 8, 16] and all(r.status == "ok" for r in rows)
    assert all(a > b for a, b in zip(peaks, peaks[1:])), peaks
    totals = [r.device_total_bytes for r in rows]
    assert all(a > b for a, b in zip(totals, totals[1:])), totals


def test_world_size_one_is_the_plain_one_device_estimate(llama_1b) -> None:  # noqa: ANN001
    setup = resolve_setup(None, {"method": "lora", "seq_len": 256, "world_size": 8, "strategy": "fsdp"})
    plain = estimate(llama_1b, setup.on_one_device())
    row = rank_row(llama_1b, setup, 1, None, {}, resolve_gpu("H100"))
    assert (row.strategy, row.offload, row.world_size, row.status) == (None, None, 1, "ok")
    assert (row.peak_bytes, row.allocated_bytes, row.device_total_bytes) == (
        plain.peak_bytes, plain.device.allocated_bytes, plain.device.device_total_bytes)
    assert row.host_bytes is None and row.fits is True
    assert row.margin_bytes == resolve_gpu("H100").memory_bytes - plain.device.device_total_bytes
    assert on_world(setup, 1, {"strategy": "zero3"}) == setup.on_one_device()


def test_compare_rows_one_device_once_then_each_strategy(llama_1b) -> None:  # noqa: ANN001
    setups = plan_setups(["full", "lora"], {"seq_len": 256})
    rows = rank_rows(llama_1b, setups, plan_worlds("1,2,4", "fsdp,zero3", {}))
    assert [(r.setup["method"], r.strategy, r.world_size) for r in rows] == [
        ("full", None, 1), ("full", "fsdp", 2), ("full", "fsdp", 4), ("full", "zero3", 2), ("full", "zero3", 4),
        ("lora", None, 1), ("lora", "fsdp", 2), ("lora", "fsdp", 4), ("lora", "zero3", 2), ("lora", "zero3", 4)]
    # ZeRO in bf16 is DeepSpeed's mixed precision: the rows say so; the one-device and FSDP rows stay pure
    assert {r.to_row()["regime"] for r in rows if r.strategy == "zero3"} == {"mixed"}
    assert {r.to_row()["regime"] for r in rows if r.strategy != "zero3"} == {"pure"}
    assert smallest_fitting(rows) == []  # no GPU given: no answer line


def test_smallest_fitting_names_the_first_world_that_fits(llama_1b) -> None:  # noqa: ANN001
    setup = resolve_setup(None, {"method": "full", "seq_len": 256})
    one = estimate(llama_1b, setup).device.device_total_bytes
    at4 = estimate(llama_1b, on_world(setup, 4, {"strategy": "fsdp"})).device.device_total_bytes
    gpu = resolve_gpu(f"{(one + at4) // 2 / 2**20:.0f}MiB")  # between one device and fsdp x 4 ...
    rows = rank_rows(llama_1b, [setup], plan_worlds("1,2,4,8", "fsdp", {}), gpu)
    fitting = [r.world_size for r in rows if r.fits]
    assert 1 not in fitting and 4 in fitting
    assert smallest_fitting(rows) == [f"smallest world size listed that fits {gpu.name}: full: fsdp {min(fitting)}"]


def test_unmodelled_combinations_are_na_rows_with_the_reason(llama_1b) -> None:  # noqa: ANN001
    setup = resolve_setup(None, {"method": "full", "seq_len": 256, "grad_accum": 2})
    rows = rank_rows(llama_1b, [setup], plan_worlds("1,2", "fsdp,zero3", {}))
    status = {(r.strategy, r.world_size): r.status for r in rows}
    assert status == {(None, 1): "ok", ("fsdp", 2): "n/a", ("zero3", 2): "n/a"}
    na = next(r for r in rows if r.status == "n/a")
    assert "gradient accumulation" in na.note and "\n" not in na.note and na.peak_bytes is None


@pytest.mark.parametrize("args,message", [
    (("1,x", None, {}), "comma-separated integers"),
    (("0,2", None, {}), "world sizes must be between 1"),
    ((None, "fsdp", {}), "--strategies needs the world sizes"),
    (("2", None, {"world_size": 4}), "give --world-sizes or --world-size"),
    (("2", "fsdp", {"strategy": "zero3"}), "give --strategies or --strategy"),
    (("2", "zero4", {}), "strategy 'zero4' is not supported"),
    (("2", "zero3", {"offload": "disk"}), "offload 'disk' is not supported"),
])
def test_bad_world_plans_are_one_line(args: tuple, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_worlds(*args)


def test_fit_world_smallest_fits_and_half_does_not() -> None:
    spec, _ = resolve_spec("Llama-3.1-8B")
    setup = resolve_setup(None, {"method": "full", "seq_len": 2048})
    gpu = resolve_gpu("40GiB")
    found = fit_world(spec, setup, gpu, {"strategy": "fsdp"})
    w = found.world_size
    assert w is not None and w >= 2 and [n for n, _ in found.tried] == [2**k for k in range(w.bit_length())]
    at_w = on_world(setup, w, {"strategy": "fsdp"})
    assert estimate(spec, at_w).device.device_total_bytes <= gpu.memory_bytes
    assert estimate(spec, on_world(setup, w // 2, {"strategy": "fsdp"})).device.device_total_bytes > gpu.memory_bytes
    assert found.estimate.setup.world_size == w and found.max_batch_size == max_batch_size(spec, at_w, gpu) >= 1
    import dataclasses

    b = found.max_batch_size
    assert estimate(spec, dataclasses.replace(at_w, batch_size=b + 1)).device.device_total_bytes > gpu.memory_bytes


def test_fit_world_says_none_fits_and_skips_sizes_the_nodes_forbid() -> None:
    spec, _ = resolve_spec("Llama-3.1-8B")
    setup = resolve_setup(None, {"method": "full", "seq_len": 2048})
    none = fit_world(spec, setup, resolve_gpu("4GiB"), {"strategy": "ddp"})  # ddp replicates: never fits
    assert none.world_size is None and none.max_batch_size == 0 and len(none.tried) == 11
    two_nodes = fit_world(spec, setup, resolve_gpu("1GiB"), {"strategy": "fsdp", "nodes": 2}, sizes=(1, 2, 4))
    assert [n for n, _ in two_nodes.tried] == [2, 4]
    with pytest.raises(ConfigError, match="is a multiple of 3"):
        fit_world(spec, setup, resolve_gpu("H100"), {"strategy": "fsdp", "nodes": 3})


# ---- the command line ----------------------------------------------------------------------------------------
def test_cli_compare_answers_fsdp_vs_zero3_and_lora_on_one() -> None:
    r = run("compare", "Llama-3.1-8B", "--methods", "full,lora", "--strategies", "fsdp,zero3", "--world-sizes",
            "1,2,4,8", "--gpu", "H100", "-s", "2048", "-f", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.output)))
    assert [(x["method"], x["strategy"], x["world_size"]) for x in rows][:4] == [
        ("full", "", "1"), ("full", "fsdp", "2"), ("full", "fsdp", "4"), ("full", "fsdp", "8")]
    assert len(rows) == 2 * (1 + 2 * 3) and {x["gpu"] for x in rows} == {"H100-80GB"}
    lora_one = next(x for x in rows if x["method"] == "lora" and x["world_size"] == "1")
    assert lora_one["fits"] == "True" and int(lora_one["device_total_bytes"]) < int(lora_one["gpu_memory_bytes"])
    table = run("compare", "Llama-3.1-8B", "--methods", "full,lora", "--strategies", "fsdp,zero3", "--world-sizes",
                "1,2,4,8", "--gpu", "H100", "-s", "2048")
    assert table.exit_code == 0, table.output
    assert "device total / rank" in table.output and "one device" in table.output
    assert "smallest world size listed that fits H100-80GB: full:" in table.output
    assert "analytic only" in table.output and "DeepSpeed" in table.output


def test_cli_compare_without_the_new_flags_is_unchanged() -> None:
    r = run("compare", "Llama-3.2-1B", "--methods", "full,lora", "-s", "256", "-f", "csv")
    assert r.exit_code == 0, r.output
    header = r.output.splitlines()[0].split(",")
    assert "est_peak_bytes" in header and "world_size" not in header and "fits" not in header


def test_cli_fit_strategy_finds_the_fewest_gpus() -> None:
    r = run("fit", "Llama-3.1-8B", "--gpu", "40GiB", "--strategy", "fsdp", "-s", "2048", "-f", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    world = doc["world"]
    w = world["min_world_size"]
    assert world["strategy"] == "fsdp" and w >= 2 and world["tried"][-1] == {
        "world_size": w, "strategy": "fsdp", "device_total_bytes": doc["estimate"]["device_total_bytes"], "fits": True}
    assert not world["tried"][-2]["fits"] and doc["fit"]["fits"] is True and doc["max_batch_size"] >= 1
    table = run("fit", "Llama-3.1-8B", "--gpu", "40GiB", "--strategy", "fsdp", "-s", "2048")
    assert table.exit_code == 0 and f"under fsdp: {w} GPUs" in table.output and "largest batch size" in table.output
    fixed = run("fit", "Llama-3.1-8B", "--gpu", "40GiB", "--world-size", "8", "--strategy", "fsdp", "-s", "2048",
                "-f", "json")  # a given world size: the fit at that size, as before
    assert fixed.exit_code == 0 and "world" not in json.loads(fixed.output)
    assert "fsdp x 8" in json.loads(fixed.output)["notes"][0]


@pytest.mark.parametrize("args,message", [
    (["compare", "Llama-3.2-1B", "--world-sizes", "2", "--measure"], "--measure: not with --world-sizes"),
    (["compare", "Llama-3.2-1B", "--gpu", "H100"], "--gpu applies to the per-rank table"),
    (["compare", "Llama-3.2-1B", "--world-sizes", "2", "--strategies", "zero4"], "strategy 'zero4' is not supported"),
    (["fit", "Llama-3.2-1B", "--strategy", "fsdp", "--verify"], "--verify runs one device"),
    (["fit", "Llama-3.2-1B", "--strategy", "fsdp", "--nodes", "3"], "is a multiple of 3"),
    (["fit", "Llama-3.2-1B", "--strategy", "zero9"], "strategy 'zero9' is not supported"),
])
def test_cli_bad_input_is_one_line(args: list[str], message: str) -> None:
    r = run(*args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
