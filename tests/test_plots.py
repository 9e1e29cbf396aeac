import pytest
import torch

from longtail.metrics import summarize
from longtail.plots import (by_size, class_ticks, new_figure, plot_confusion, plot_per_class_accuracy,
                            plot_reliability, shade_groups)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, tmp_dir):
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000  # a real drawing, not an empty canvas
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert width >= 300 and height >= 300
    assert not [p for p in tmp_dir.rglob("*.tmp")], "temporary file left behind"


@pytest.fixture
def predictions():
    g = torch.Generator().manual_seed(0)
    counts = [500, 300, 150, 80, 40, 20, 10, 5]
    targets = torch.arange(8).repeat_interleave(10)
    logits = torch.randn(80, 8, generator=g)
    logits[torch.arange(80), targets] += torch.linspace(3, 0, 8).repeat_interleave(10)  # head classes easier
    return logits, targets, counts


def test_per_class_accuracy_plot_of_several_runs(tmp_path, predictions):
    logits, targets, counts = predictions
    per_class = summarize(logits, targets, counts, (100, 20))["per_class"]
    per_class[3] = None  # a class absent from the split is left blank, not drawn as 0
    runs = {"ce": per_class, "la": per_class[::-1]}
    names = [f"class {c}" for c in range(8)]
    out = plot_per_class_accuracy(runs, counts, tmp_path / "figures" / "per_class.png", (100, 20), names)
    assert out == str(tmp_path / "figures" / "per_class.png")
    assert_png(out, tmp_path)


def test_class_axis_names_the_classes_in_size_order():
    counts = [10, 500, 40, 3]
    ax = new_figure(4, 3).add_subplot()
    class_ticks(ax, by_size(counts), ["cat", "dog", "frog", "ship"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["dog", "frog", "cat", "ship"]
    class_ticks(ax, by_size(counts))  # names unknown: the class ids
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "0", "3"]
    class_ticks(ax, by_size([5] * 101))  # too many to read: no labels at all
    assert ax.get_xticks().size == 0


def test_groups_are_shaded_over_their_span_and_named():
    counts = [500, 300, 150, 80, 40, 20, 10, 5]  # > 100: 3 Many, 20..100: 3 Medium, < 20: 2 Few
    ax = new_figure(4, 3).add_subplot()
    shade_groups(ax, by_size(counts), counts, (100, 20))
    spans = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches]
    assert spans == [(-0.5, 2.5), (2.5, 5.5), (5.5, 7.5)]
    assert [t.get_text() for t in ax.texts] == ["Many (3)", "Medium (3)", "Few (2)"]
    ax = new_figure(4, 3).add_subplot()
    shade_groups(ax, by_size(counts), counts, (1000, 200))  # no Many class: two spans
    assert [t.get_text() for t in ax.texts] == ["Medium (2)", "Few (6)"]
    ax = new_figure(4, 3).add_subplot()
    shade_groups(ax, by_size(counts), counts, (100, 20), named=False)  # a lower panel: shaded, not named
    assert len(ax.patches) == 3 and not ax.texts


def test_confusion_plot_accepts_logits_or_predictions(tmp_path, predictions):
    logits, targets, counts = predictions
    a = plot_confusion(logits, targets, 8, tmp_path / "confusion.png", counts, [f"class {c}" for c in range(8)])
    b = plot_confusion(logits.argmax(1), targets, 8, tmp_path / "confusion_preds.png")
    assert_png(a, tmp_path)
    assert_png(b, tmp_path)


def test_reliability_plot_overwrites_atomically(tmp_path, predictions):
    logits, targets, _ = predictions
    path = tmp_path / "reliability.png"
    path.write_bytes(b"stale")
    out = plot_reliability(logits, targets, path, bins=15)
    assert_png(out, tmp_path)
