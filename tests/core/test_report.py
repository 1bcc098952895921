"""Output formats carry the same numbers: raw bytes for machines, rounded units for humans."""

from __future__ import annotations

import json

from rich.console import Console

from memprof.resolve import resolve_setup
from memprof.analytic import estimate
from memprof.hub import resolve_spec
from memprof.documents import estimate_document
from memprof.report import Format, render_rows, rows_csv, rows_markdown, to_frame
from memprof.units import fmt_bytes, fmt_count, fmt_pct


def test_units() -> None:
    assert fmt_bytes(3 * 2**30) == "3.00 GiB" and fmt_bytes(None) == "-"
    assert fmt_count(124_439_808) == "124.44M" and fmt_pct(0.0123) == "1.2%"


def _row() -> dict:
    spec, _ = resolve_spec("gpt2")
    return estimate(spec, resolve_setup(None, {"batch_size": 2})).to_row()


def test_row_formats_agree() -> None:
    row = _row()
    assert row["peak_bytes"] == sum(v for k, v in row.items() if k.endswith("_bytes") and k[:-6] in (
        "params_trainable", "params_frozen", "gradients", "optimizer_states", "master_weights", "weight_copies",
        "activations", "temporaries", "inputs"))
    csv_text = rows_csv([row])
    assert csv_text.splitlines()[0].split(",")[0] == "kind" and str(row["peak_bytes"]) in csv_text
    md = rows_markdown([row], ["model", "peak_bytes"])
    assert md.splitlines()[2] == f"| openai-community/gpt2 | {fmt_bytes(row['peak_bytes'])} |"
    frame = to_frame([row, row])
    assert list(frame["peak_bytes"]) == [row["peak_bytes"]] * 2


def test_render_rows_json_is_raw() -> None:
    console = Console(record=True, width=200)
    render_rows([{"a_bytes": 5, "b": None}], Format.json, console)
    assert json.loads(console.export_text()) == [{"a_bytes": 5, "b": None}]


def test_estimate_document_has_phases_and_notes() -> None:
    spec, _ = resolve_spec("Llama-3.2-1B")
    # b*s*V*4 = 4*2048*128256*4 B = 3.9 GiB of fp32 logits against a ~12 GiB peak: the note fires
    est = estimate(spec, resolve_setup(None, {"batch_size": 4, "seq_len": 2048, "grad_checkpointing": True}))
    doc = estimate_document(est)
    assert set(doc["phase_peaks_bytes"]) == {"forward", "backward", "optimizer"}
    assert any("logits" in n for n in doc["notes"])
