"""Comparison plots (``--plot out.png``): memory by category per run, estimated next to measured, and step
times. matplotlib is the optional extra ``memprof[plot]``, imported only when a plot is written."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

from .comparison import BREAKDOWN_KEYS, ComparisonRow
from .errors import ConfigError, DependencyMissingError
from .documents import COMPARISON_LABELS
from .units import BYTES_PER_GIB

# one colour per category, the same in every plot
_COLOURS = {"params_trainable": "#1f77b4", "params_frozen": "#aec7e8", "gradients": "#ff7f0e",
            "optimizer_states": "#d62728", "master_weights": "#9467bd", "weight_copies": "#c5b0d5",
            "activations": "#2ca02c", "temporaries": "#98df8a", "inputs": "#7f7f7f"}
_SWEPT = ("batch_size", "seq_len", "dtype", "regime", "grad_checkpointing", "device", "method_options", "model")


def _labels(rows: Sequence[ComparisonRow]) -> list[str]:
    """x labels: the method plus whatever else varies between rows."""
    varying = [c for c in _SWEPT if len({repr(r.setup.get(c)) for r in rows}) > 1]
    out = []
    for r in rows:
        parts = [str(r.setup.get("method"))]
        for c in varying:
            v = r.setup.get(c)
            parts.append(("ckpt" if v else "no ckpt") if c == "grad_checkpointing"
                         else f"{COMPARISON_LABELS.get(c, c)}={v}")
        out.append("\n".join(parts))
    return out


def _estimate_bars(r: ComparisonRow) -> tuple[dict[str, int], str]:
    """The estimate drawn next to a measurement is the one it is compared with (tracked on CPU)."""
    if r.est_basis == "tracked" and r.est_tracked_breakdown:
        return dict(r.est_tracked_breakdown), "est."
    return dict(r.est_breakdown), "est."


def check_plot_path(path: str | Path) -> Path:
    """Check, before a long sweep, that a plot can be written there (a .png path, matplotlib installed).

    Raises:
        ConfigError: the path does not end in .png.
        DependencyMissingError: matplotlib is not installed.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--plot writes a PNG; give a path ending in .png, got {path}")
    from .outputs import check_writable

    check_writable(path, "--plot")
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise DependencyMissingError("--plot needs matplotlib: pip install 'memprof[plot]'") from None
    return path


def write_plot(rows: Sequence[ComparisonRow], path: str | Path, title: str | None = None) -> Path:
    """Write a PNG: memory by category per run (the estimate hatched, the measurement solid beside it, each bar
    with its total) and, when anything was measured, the median step time with its spread (95% CI of the
    median) and the speed-up over full fine-tuning. ``title``: the setup the runs share (the table's heading).

    Raises:
        DependencyMissingError: matplotlib is not installed.
        ConfigError: nothing to plot, or a path that does not end in .png.
    """
    path = check_plot_path(path)
    if not rows:
        raise ConfigError("nothing to plot: no comparison rows")
    fig = figure(rows, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def png_bytes(rows: Sequence[ComparisonRow], title: str | None = None) -> bytes | None:
    """The same figure as PNG bytes (for the HTML report), None without matplotlib or rows."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    if not rows:
        return None
    import io

    buf = io.BytesIO()
    figure(rows, title).savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def figure(rows: Sequence[ComparisonRow], title: str | None = None):  # noqa: ANN201 (matplotlib Figure)
    from matplotlib.figure import Figure

    timed = any(r.step_time_s for r in rows)
    width = max(7.0, 1.25 * len(rows) + 2.5)
    fig = Figure(figsize=(width, 8.0 if timed else 5.2), layout="constrained")
    axes = fig.subplots(2 if timed else 1, 1, squeeze=False)[:, 0]
    _memory_panel(axes[0], rows)
    if timed:
        _time_panel(axes[1], rows)
    model = rows[0].setup.get("model")
    fig.suptitle("\n".join(textwrap.wrap(title or str(model), 110)), fontsize=9)
    return fig


def _memory_panel(ax, rows: Sequence[ComparisonRow]) -> None:  # noqa: ANN001 (matplotlib Axes)
    labels = _labels(rows)
    measured_any = any(r.measured_breakdown or r.measured_peak_bytes for r in rows)
    bar_w = 0.34 if measured_any else 0.6
    offset = 0.19 if measured_any else 0.0
    seen: set[str] = set()
    top = 0.0
    for i, r in enumerate(rows):
        est, _ = _estimate_bars(r)
        bars = [(i - offset, est, "est.", True)]
        if r.measured_breakdown:
            bars.append((i + offset, dict(r.measured_breakdown), "meas.", False))
        elif r.measured_peak_bytes:
            bars.append((i + offset, {"measured peak": r.measured_peak_bytes}, "meas.", False))
        for x, parts, tag, hatched in bars:
            bottom = 0.0
            for key in (*BREAKDOWN_KEYS, "measured peak"):
                gib = parts.get(key, 0) / BYTES_PER_GIB
                if gib <= 0:
                    continue
                label = key.replace("_", " ") if key not in seen else None
                seen.add(key)
                ax.bar(x, gib, bar_w, bottom=bottom, color=_COLOURS.get(key, "#bcbd22"), label=label,
                       hatch="//" if hatched and measured_any else None, edgecolor="white", linewidth=0.5)
                bottom += gib
            if bottom:
                ax.text(x, bottom, f"{bottom:.2f}" + (f"\n{tag}" if measured_any else ""), ha="center",
                        va="bottom", fontsize=7)
                top = max(top, bottom)
        if not r.est_breakdown and not r.measured_breakdown:
            ax.text(i, 0, r.status, ha="center", va="bottom", fontsize=8, rotation=90)
    ax.set_ylim(0, top * 1.22 if top else 1)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("GiB at the peak")
    ax.set_title("memory by category at the peak" + (" (estimate hatched, measured solid)" if measured_any else ""),
                 fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    order = [k.replace("_", " ") for k in (*BREAKDOWN_KEYS, "measured peak")]
    pairs = sorted(zip(names, handles), key=lambda nh: order.index(nh[0]))
    ax.legend([h for _, h in pairs], [n for n, _ in pairs], fontsize=7, loc="upper left", ncol=2, framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)


def _time_panel(ax, rows: Sequence[ComparisonRow]) -> None:  # noqa: ANN001
    xs = list(range(len(rows)))
    times = [r.step_time_s or 0.0 for r in rows]
    lows = [max(0.0, (r.step_time_s or 0) - (r.step_time_low_s or r.step_time_s or 0)) for r in rows]
    highs = [max(0.0, (r.step_time_high_s or r.step_time_s or 0) - (r.step_time_s or 0)) for r in rows]
    ax.bar(xs, times, 0.55, color="#17becf", yerr=[lows, highs], capsize=3, ecolor="#555")
    for i, r in enumerate(rows):
        if r.step_time_s:
            text = f"{r.step_time_s:.3g} s" + (f"\n{r.speedup_vs_full:.2f}x" if r.speedup_vs_full else "")
            ax.text(i, r.step_time_s + highs[i], text, ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, max((t + h for t, h in zip(times, highs)), default=1) * 1.3 or 1)
    ax.set_xticks(xs, _labels(rows), fontsize=8)
    ax.set_ylabel("median step time (s)")
    ax.set_title("measured step time (bars: the median's 95% CI; speed-up vs full fine-tuning)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def write_steps_plot(rows: Sequence[dict], path: str | Path) -> Path:
    """Per-step memory of a profiled run (``memprof report --steps``): measured peak per optimizer step and rank,
    the estimate of each step's shape beside it, and the padded length on a second axis."""
    from matplotlib.figure import Figure

    from matplotlib.ticker import MaxNLocator

    path = check_plot_path(path)
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.add_subplot()
    top = max(r["peak_bytes"] for r in rows)
    unit, scale = ("GiB", BYTES_PER_GIB) if top >= BYTES_PER_GIB else ("MiB", 2**20)
    for rank in sorted({r["rank"] for r in rows}):
        mine = [r for r in rows if r["rank"] == rank]
        steps = [r["step"] for r in mine]
        suffix = f" (rank {rank})" if len({r["rank"] for r in rows}) > 1 else ""
        ax.plot(steps, [r["peak_bytes"] / scale for r in mine], "o-", label="measured peak" + suffix)
        est = [(r["step"], r["estimate_peak_bytes"] / scale) for r in mine if r.get("estimate_peak_bytes")]
        if est:
            ax.plot(*zip(*est), "s--", label="memprof estimate of the step's shape" + suffix)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"peak memory ({unit})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    lengths = ax.twinx()
    ax.set_zorder(lengths.get_zorder() + 1)
    ax.patch.set_visible(False)
    lengths.bar([r["step"] for r in rows], [r["seq_len"] for r in rows], alpha=0.15, color="#7f7f7f",
                label="padded length")
    lengths.set_ylabel("padded sequence length (tokens)")
    first = rows[0]
    fig.suptitle(f"{first['model']} | {first['method']} | b={first['batch_size']} | {first.get('device', '')}: "
                 "peak memory per step", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = lengths.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, fontsize=8, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
