"""Comparison plots (``--plot out.png``): memory by category per run, estimated next to measured, and step
times. matplotlib is the optional extra ``memprof[plot]``, imported only when a plot is written."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .compare import BREAKDOWN_KEYS, ComparisonRow
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
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise DependencyMissingError("--plot needs matplotlib: pip install 'memprof[plot]'") from None
    return path


def write_plot(rows: Sequence[ComparisonRow], path: str | Path) -> Path:
    """Write a PNG: stacked memory-by-category bars per run (estimate, and measured where present) and, when
    anything was measured, step-time bars.

    Raises:
        DependencyMissingError: matplotlib is not installed.
        ConfigError: nothing to plot, or a path that does not end in .png.
    """
    path = check_plot_path(path)
    if not rows:
        raise ConfigError("nothing to plot: no comparison rows")
    from matplotlib.figure import Figure

    timed = any(r.step_time_s for r in rows)
    width = max(6.0, 1.1 * len(rows) + 2)
    fig = Figure(figsize=(width, 7.5 if timed else 4.8), layout="constrained")
    axes = fig.subplots(2 if timed else 1, 1, squeeze=False)[:, 0]
    _memory_panel(axes[0], rows)
    if timed:
        _time_panel(axes[1], rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _memory_panel(ax, rows: Sequence[ComparisonRow]) -> None:  # noqa: ANN001 (matplotlib Axes)
    labels = _labels(rows)
    measured_any = any(r.measured_breakdown or r.measured_peak_bytes for r in rows)
    bar_w = 0.38 if measured_any else 0.7
    seen: set[str] = set()
    for i, r in enumerate(rows):
        est, tag = _estimate_bars(r)
        bars = [(i - bar_w / 2 if measured_any else i, est, tag)]
        if r.measured_breakdown:
            bars.append((i + bar_w / 2, dict(r.measured_breakdown), "meas."))
        elif r.measured_peak_bytes:
            bars.append((i + bar_w / 2, {"measured peak": r.measured_peak_bytes}, "meas."))
        for x, parts, tag in bars:
            bottom = 0.0
            for key in (*BREAKDOWN_KEYS, "measured peak"):
                gib = parts.get(key, 0) / BYTES_PER_GIB
                if gib <= 0:
                    continue
                label = key.replace("_", " ") if key not in seen else None
                seen.add(key)
                ax.bar(x, gib, bar_w, bottom=bottom, color=_COLOURS.get(key, "#bcbd22"), label=label)
                bottom += gib
            if bottom and measured_any:
                ax.text(x, bottom, tag, ha="center", va="bottom", fontsize=7)
        if not r.est_breakdown and not r.measured_breakdown:
            ax.text(i, 0, r.status, ha="center", va="bottom", fontsize=8, rotation=90)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("GiB at the peak")
    model = rows[0].setup.get("model")
    ax.set_title(f"{model}: memory by category" + (" (est. left, measured right)" if measured_any else ""))
    handles, names = ax.get_legend_handles_labels()
    order = [k.replace("_", " ") for k in (*BREAKDOWN_KEYS, "measured peak")]
    pairs = sorted(zip(names, handles), key=lambda nh: order.index(nh[0]))
    ax.legend([h for _, h in pairs], [n for n, _ in pairs], fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)


def _time_panel(ax, rows: Sequence[ComparisonRow]) -> None:  # noqa: ANN001
    xs = range(len(rows))
    times = [r.step_time_s or 0.0 for r in rows]
    ax.bar(xs, times, 0.6, color="#17becf")
    for i, r in enumerate(rows):
        if r.step_time_s and r.speedup_vs_full:
            ax.text(i, r.step_time_s, f"{r.speedup_vs_full:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), _labels(rows), fontsize=8)
    ax.set_ylabel("median step time (s)")
    ax.set_title("measured step time (speed-up vs full above the bars)")
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
