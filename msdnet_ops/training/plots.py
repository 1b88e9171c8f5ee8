"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_anytime(path, exits: list[dict], title: str = "anytime prediction") -> None:
    """Per-exit table (MACs, validation and test accuracy) beside accuracy vs. MACs."""
    plt = _pyplot()
    fig, (ax_t, ax) = plt.subplots(1, 2, figsize=(11, 0.9 + 0.32 * max(len(exits), 6)),
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
    ax.plot(macs, [e["test_accuracy"] * 100 for e in exits], "o-", label="test")
    ax.plot(macs, [e["val_accuracy"] * 100 for e in exits], "s--", alpha=0.7, label="validation")
    for e, m in zip(exits, macs):
        ax.annotate(str(e["exit"]), (m, e["test_accuracy"] * 100), textcoords="offset points", xytext=(3, -10),
                    fontsize=8)
    ax.set_xlabel("multiply-adds per image (M)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)


def plot_budgeted(path, points: list[dict], exits: list[dict], title: str = "budgeted batch classification") -> None:
    """Test accuracy vs. average multiply-adds per image: the budgeted curve (expected and,
    when available, measured) and the single exits."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot([p["expected_macs"] / 1e6 for p in points], [p["test_accuracy"] * 100 for p in points], "-",
            color="C0", label="budgeted (expected MACs)")
    measured = [p for p in points if p.get("measured_macs") is not None]
    if measured:
        ax.plot([p["measured_macs"] / 1e6 for p in measured], [p["measured_accuracy"] * 100 for p in measured],
                "x", color="C3", label="budgeted (measured MACs)")
    ax.plot([e["macs"] / 1e6 for e in exits], [e["test_accuracy"] * 100 for e in exits], "o--", color="C1",
            label="single exits (anytime)")
    ax.set_xlabel("average multiply-adds per image (M)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)
