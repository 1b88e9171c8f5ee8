"""What ``msdnet evaluate`` shows a person: the plots' layout (nothing covered, honest y-range,
the measured-below-expected caption) and the summary sentences. Inputs are made-up exits and
budgeted points shaped like a real evaluation; no model runs here."""
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from msdnet_ops.training.evaluate import dominance_check, dominance_sentence
from msdnet_ops.training.plots import LAZY_NOTE, accuracy_limits, plot_anytime, plot_budgeted

EXITS = [{"exit": k + 1, "macs": m, "val_accuracy": v, "test_accuracy": t}
         for k, (m, v, t) in enumerate([(4.2e6, 0.994, 0.994), (6.7e6, 1.0, 0.992), (9.1e6, 1.0, 0.994),
                                        (11.0e6, 1.0, 0.994)])]


def budgeted_points(measured: bool):
    points = []
    for i in range(1, 40):
        q = round(0.05 * i, 2)
        expected = 4.3e6 + 5.3e6 * i / 39
        point = {"q": q, "test_accuracy": 0.992 if i == 1 else 0.994, "expected_macs": expected,
                 "measured_macs": None, "measured_accuracy": None}
        if measured:  # lazy evaluation: cheaper than expected, at first even cheaper than exit 1
            point.update(measured_macs=expected - 0.6e6, measured_accuracy=point["test_accuracy"])
        points.append(point)
    return points


@pytest.mark.parametrize("accuracies", [[99.17, 100.0], [60.2, 75.9], [0.0, 3.0], [97.0, 97.0], [12.5, 88.0]])
def test_accuracy_axis_holds_the_data_and_spans_at_least_ten_points(accuracies):
    lo, hi = accuracy_limits(accuracies)
    assert lo < min(accuracies) and max(accuracies) < hi
    assert hi - lo >= 10
    assert -0.5 <= lo and hi <= 100.5


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legends_and_caption_cover_nothing(tmp_path):
    figures = [plot_anytime(tmp_path / "anytime.png", EXITS),
               plot_budgeted(tmp_path / "budgeted.png", budgeted_points(measured=True), EXITS)]
    for fig in figures:
        renderer = FigureCanvasAgg(fig).get_renderer()  # the closed figure has lost its canvas
        axes = [ax for ax in fig.axes if ax.lines]  # the plots (not the table, not the exit-name axes)
        legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None]
        assert legends
        for ax in axes:
            assert ax.get_ylim()[1] - ax.get_ylim()[0] >= 3  # MMACs panel too: not a sliver
            for legend in legends:
                box = legend.get_window_extent(renderer)
                assert not _overlaps(box, ax.xaxis.get_tightbbox(renderer)), "legend on the x labels"
                for line in ax.lines:  # no point or reference line under a legend
                    xy = line.get_transform().transform(line.get_xydata())
                    assert not any(box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1 for x, y in xy), \
                        f"the legend covers {line.get_label()!r}"
        for text in fig.texts:
            for legend in legends:
                assert not _overlaps(text.get_window_extent(renderer), legend.get_window_extent(renderer))
    accuracy_axes = [ax for ax in figures[1].axes if ax.get_ylabel() == "test accuracy (%)"]
    assert accuracy_axes[0].get_ylim()[1] - accuracy_axes[0].get_ylim()[0] >= 10
    labels = [line.get_label() for ax in figures[1].axes for line in ax.lines]
    assert "budgeted, expected cost" in labels and "budgeted, measured cost" in labels
    assert LAZY_NOTE in [t.get_text() for t in figures[1].texts]


def test_no_caption_without_measurement(tmp_path):
    fig = plot_budgeted(tmp_path / "budgeted.png", budgeted_points(measured=False), EXITS)
    assert LAZY_NOTE not in [t.get_text() for t in fig.texts]


def test_summary_sentence_when_early_exit_pays_off():
    sentence = dominance_sentence(dominance_check(budgeted_points(False), [e["macs"] for e in EXITS],
                                                  [e["test_accuracy"] for e in EXITS]))
    # exit 1 (4.2 M) is cheaper than every budgeted point (from 4.3 M): not compared
    assert sentence.startswith("Early exit pays off: for exits 2, 3, 4,")
    assert "(Exit 1: every budgeted point costs more" in sentence
    assert "True" not in sentence and "False" not in sentence


def test_summary_sentence_names_the_exit_early_exit_loses_to():
    points = [dict(p, test_accuracy=0.990) for p in budgeted_points(False)]
    sentence = dominance_sentence(dominance_check(points, [e["macs"] for e in EXITS],
                                                  [e["test_accuracy"] for e in EXITS]))
    assert sentence.startswith("Early exit loses accuracy here:")
    for k in (2, 3, 4):
        assert f"exit {k} (" in sentence
    assert "at the cost of exit 2 (6.70 MMACs) the best budgeted point reaches 99.00 %, below the exit's 99.20 %" \
        in sentence
