"""Presentation primitives: rows (flat dicts) -> rich table | json | csv | markdown | html (| DataFrame), one
cell formatter, a progress bar. The views of each kind of record (estimate, measurement, comparison) are in
documents.py; both are the only formatters. Humans get rounded GiB; machines (json, csv) get raw bytes. pandas
is imported only for ``to_frame``.
"""

from __future__ import annotations

import contextlib
import csv
import html
import io
import json
from enum import Enum
from typing import Any, Iterable, Iterator, Sequence

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from .units import fmt_bytes, fmt_count, fmt_pct


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"
    html = "html"


def rows_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or all_columns(rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in columns})
    return buf.getvalue()


def rows_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                  labels: dict[str, str] | None = None) -> str:
    columns = list(columns or all_columns(rows))
    out = ["| " + " | ".join(md_escape((labels or {}).get(c, c)) for c in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        out.append("| " + " | ".join(md_escape(fmt_cell(row.get(c), c)) for c in columns) + " |")
    return "\n".join(out) + "\n"


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def rows_html(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str | None = None,
              labels: dict[str, str] | None = None, notes: Sequence[str] = ()) -> str:
    """A self-contained HTML page with one table (cells formatted as in the rich table)."""
    columns = list(columns or all_columns(rows))
    esc = html.escape
    head = "".join(f"<th>{esc((labels or {}).get(c, c))}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(f"<td>{esc(fmt_cell(row.get(c), c))}</td>" for c in columns) + "</tr>"
                     for row in rows)
    caption = f"<caption>{esc(title)}</caption>" if title else ""
    foot = "".join(f"<p>{esc(n)}</p>" for n in notes)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>memprof</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}caption{text-align:left;padding:4px 0}"
            "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
            "td:first-child,th:first-child{text-align:left}p{color:#555;font-size:90%}"
            f"</style></head><body>\n<table>{caption}<thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>\n"
            f"{foot}</body></html>\n")


def rows_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str | None = None,
               labels: dict[str, str] | None = None) -> Table:
    columns = list(columns or all_columns(rows))
    table = Table(title=title, show_header=True, header_style="bold")
    for c in columns:
        table.add_column((labels or {}).get(c, c), overflow="fold")
    for row in rows:
        table.add_row(*(fmt_cell(row.get(c), c) for c in columns))
    return table


def rows_json(rows: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(rows), indent=2, default=str)


def render_rows(rows: Sequence[dict[str, Any]], fmt: Format, console: Console, columns: Sequence[str] | None = None,
                title: str | None = None, labels: dict[str, str] | None = None) -> None:
    """Print rows in the chosen format (json/csv/markdown to stdout verbatim, table through rich)."""
    if fmt is Format.table:
        console.print(rows_table(rows, columns, title, labels))
    elif fmt is Format.json:
        console.out(rows_json(rows), highlight=False)
    elif fmt is Format.csv:
        console.out(rows_csv(rows, columns), highlight=False, end="")
    elif fmt is Format.html:
        console.out(rows_html(rows, columns, title, labels), highlight=False, end="")
    else:
        console.out(rows_markdown(rows, columns, labels), highlight=False, end="")


def to_frame(rows: Iterable[dict[str, Any]]):  # noqa: ANN201 (pandas.DataFrame)
    """The one table interchange: ``pandas.DataFrame([r.to_row() for r in records])``."""
    import pandas as pd

    return pd.DataFrame(list(rows))


def all_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for k in row:
            seen.setdefault(k, None)
    return list(seen)


def fmt_cell(value: Any, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and column.endswith("_bytes"):
        return fmt_bytes(value)
    if isinstance(value, int) and column.endswith("_params"):
        return fmt_count(value)
    if isinstance(value, float):
        if column.endswith("_pct") or column.endswith("_frac"):
            if 0 < abs(value) < 1e-4:  # e.g. an estimate off by a few KiB: keep two significant digits
                return f"{100 * value:.2g}%"
            return fmt_pct(value, 2 if 0 < abs(value) < 0.01 else 1)
        if column.endswith("_per_s"):
            return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
        if column.startswith("speedup"):
            return f"{value:.2f}x"
        if column.endswith("_s"):
            return f"{value:.4g}"
        return f"{value:.4g}"
    return str(value)


@contextlib.contextmanager
def progress_bar(console: Console, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar driven by ``progress(phase, step, total)`` callbacks (None when disabled)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("starting", total=1)

        def update(phase: str, step: int, total: int) -> None:
            bar.update(task, description=phase, completed=step, total=max(total, 1))

        yield update


def print_unwrapped(console: Console, table: Table) -> None:
    """Print a wide table at its natural width (the terminal soft-wraps), not squeezed into the console's."""
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    width = console.width
    console.width = max(width, natural)
    try:
        console.print(table)
    finally:
        console.width = width


def table_width(console: Console, table: Table) -> int:
    """The width a table takes at its natural size."""
    return Measurement.get(console, console.options.update_width(10_000), table).maximum
