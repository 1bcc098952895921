"""The HTML report (``compare`` / ``report -f html``): one self-contained page to share (pure)."""

from __future__ import annotations

from typing import Any, Sequence

from .report import fmt_cell


_SORT_JS = """
document.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
  const up = th.dataset.order !== 'up'; th.dataset.order = up ? 'up' : 'down';
  const key = r => { const v = r.cells[col].dataset.v; const n = parseFloat(v); return isNaN(n) ? v : n; };
  rows.sort((a, b) => { const x = key(a), y = key(b);
    const c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
    return up ? c : -c; });
  rows.forEach(r => body.appendChild(r));
}));
"""


def comparison_page(rows: Sequence[dict[str, Any]], columns: Sequence[str], heading: str, labels: dict[str, str],
                    notes: Sequence[str], png: bytes | None = None) -> str:
    """A self-contained HTML page to share: the setup, the comparison (estimate, trace, measurement, their errors,
    savings and speed-ups; click a column to sort), the figure embedded as data, the footnotes. No external
    assets: one file."""
    import base64
    import datetime
    import html

    from . import __version__

    esc = html.escape
    head = "".join(f"<th title=\"click to sort\">{esc(labels.get(c, c))}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(f"<td data-v=\"{esc(_raw(row.get(c)))}\">{esc(fmt_cell(row.get(c), c))}</td>"
                                       for c in columns) + "</tr>" for row in rows)
    figure = (f"<figure><img alt=\"memory by category and step times\" src=\"data:image/png;base64,"
              f"{base64.b64encode(png).decode()}\"></figure>") if png else ""
    foot = "".join(f"<li>{esc(n)}</li>" for n in notes)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>memprof: "
            f"{esc(str(rows[0].get('model')) if rows else 'comparison')}</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;color:#222}h1{font-size:1.3em}"
            ".setup{color:#444}table{border-collapse:collapse;font-size:90%}"
            "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee;cursor:pointer}"
            "td:first-child,th:first-child{text-align:left}figure{margin:1.5em 0}img{max-width:100%}"
            "li{color:#555;font-size:90%}footer{color:#888;font-size:80%;margin-top:2em}"
            "</style></head><body>\n<h1>memprof: full fine-tuning vs PEFT</h1>\n"
            f"<p class=\"setup\">{esc(heading)}</p>\n<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n"
            f"</tbody></table>\n{figure}\n<ul>{foot}</ul>\n<footer>memprof {esc(__version__)}, {when}</footer>\n"
            f"<script>{_SORT_JS}</script></body></html>\n")


def _raw(value: Any) -> str:
    """A cell's sort key: the raw number, or the text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)
