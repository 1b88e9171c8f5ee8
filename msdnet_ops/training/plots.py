"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed).

Legends sit below the axes, so they never cover data; the accuracy axis spans at least
:data:`MIN_ACCURACY_SPAN` percentage points, so a difference of one test image does not fill
the plot.
"""
from __future__ import annotations

import math
from pathlib import Path

MIN_ACCURACY_SPAN = 10.0  # percentage points

LAZY_NOTE = ("Measured multiply-adds can fall below the expected ones, even below exit 1's cost: the real early "
             "exit computes only the feature maps each exit needs, while the expected cost counts everything a "
             "full forward pass computes up to that exit.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def accuracy_limits(accuracies_percent) -> tuple[float, float]:
    """y-limits that hold every accuracy (whole percents around them), span at least
    MIN_ACCURACY_SPAN points and stay within 0..100, plus half a point of margin for markers."""
    lo = max(0.0, math.floor(min(accuracies_percent) - 0.5))
    hi = min(100.0, math.ceil(max(accuracies_percent) + 0.5))
    if hi - lo < MIN_ACCURACY_SPAN:
        lo = max(0.0, hi - MIN_ACCURACY_SPAN)
        hi = min(100.0, lo + MIN_ACCURACY_SPAN)
    return lo - 0.5, hi + 0.5


def _label_exits(ax, exits: list[dict]) -> None:
    """Name the exits on a top axis at their multiply-adds (nothing drawn over the data)."""
    top = ax.secondary_xaxis("top")
    top.set_xticks([e["macs"] / 1e6 for e in exits], labels=[f"exit {e['exit']}" for e in exits])
    top.tick_params(labelsize=8)


def _save(plt, fig, path):
    """Write the PNG (the bounding box grows to hold every label) and return the closed figure,
    whose layout tests can still inspect."""
    fig.savefig(Path(path), dpi=120, bbox_inches="tight")
    plt.close(fig)
    return fig


def _finish_axes(ax, xlabel: str, ylabel: str, legend_columns: int) -> None:
    """Axis labels, a light grid and the legend below the axes (never over the data)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=legend_columns, frameon=False, fontsize=9)


def plot_anytime(path, exits: list[dict], title: str = "anytime prediction"):
    """Per-exit table (MACs, validation and test accuracy) beside accuracy vs. MACs; returns
    the (closed) figure."""
    plt = _pyplot()
    fig, (ax_t, ax) = plt.subplots(1, 2, figsize=(11, 1.6 + 0.3 * max(len(exits), 8)),
                                   gridspec_kw={"width_ratios": [1, 1.3]})
    ax_t.axis("off")
    rows = [[str(e["exit"]), f"{e['macs'] / 1e6:.2f}", f"{e['val_accuracy'] * 100:.2f}",
             f"{e['test_accuracy'] * 100:.2f}"] for e in exits]
    table = ax_t.table(cellText=rows, colLabels=["exit", "MMACs", "val acc %", "test acc %"], loc="center",
                       cellLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.25)
    macs = [e["macs"] / 1e6 for e in exits]
    test = [e["test_accuracy"] * 100 for e in exits]
    val = [e["val_accuracy"] * 100 for e in exits]
    ax.plot(macs, test, "o-", label="test", zorder=3)
    ax.plot(macs, val, "s--", alpha=0.7, label="validation")
    ax.set_ylim(*accuracy_limits(test + val))
    _label_exits(ax, exits)
    _finish_axes(ax, "multiply-adds per image to reach the exit (millions)", "accuracy (%)", legend_columns=2)
    fig.suptitle(title)
    return _save(plt, fig, path)


def plot_budgeted(path, points: list[dict], exits: list[dict], title: str = "budgeted batch classification"):
    """Left: test accuracy vs. average multiply-adds per image, for the budgeted curve (expected
    and, when measured, measured cost) and the single exits. Right: the cost of each q, expected
    and measured, against the exits' costs. A caption explains why measured can be lower.
    Returns the (closed) figure."""
    plt = _pyplot()
    measured = [p for p in points if p.get("measured_macs") is not None]
    fig, (ax, ax_q) = plt.subplots(1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [1.4, 1]})

    accuracy = [p["test_accuracy"] * 100 for p in points]
    ax.plot([e["macs"] / 1e6 for e in exits], [e["test_accuracy"] * 100 for e in exits], "s--", color="C1",
            label="single exits", zorder=2)
    if measured:
        ax.plot([p["measured_macs"] / 1e6 for p in measured], [p["measured_accuracy"] * 100 for p in measured],
                ":", marker="x", markersize=4, color="C3", label="budgeted, measured cost", zorder=3)
    ax.plot([p["expected_macs"] / 1e6 for p in points], accuracy, "-", marker="o", markersize=3, color="C0",
            linewidth=2, label="budgeted, expected cost", zorder=4)
    ax.set_ylim(*accuracy_limits(accuracy + [e["test_accuracy"] * 100 for e in exits]))
    _label_exits(ax, exits)
    _finish_axes(ax, "average multiply-adds per image (millions)", "test accuracy (%)", legend_columns=3)

    qs = [p["q"] for p in points]
    ax_q.plot(qs, [p["expected_macs"] / 1e6 for p in points], "-", color="C0", linewidth=2, label="expected")
    if measured:
        ax_q.plot([p["q"] for p in measured], [p["measured_macs"] / 1e6 for p in measured], ":", marker="x",
                  markersize=4, color="C3", label="measured")
    for e in exits:
        ax_q.axhline(e["macs"] / 1e6, color="C1", linestyle="--", linewidth=0.8, alpha=0.6)
        ax_q.annotate(f"exit {e['exit']}", (1.0, e["macs"] / 1e6), xycoords=("axes fraction", "data"),
                      xytext=(3, 0), textcoords="offset points", va="center", fontsize=8, color="C1")
    _finish_axes(ax_q, "q (share of images leaving at exit k ~ q^k)", "multiply-adds per image (millions)",
                 legend_columns=2)

    fig.suptitle(title)
    if measured:
        fig.text(0.5, -0.10, LAZY_NOTE, ha="center", va="top", wrap=True, fontsize=9)  # below the legend
    return _save(plt, fig, path)
