import pytest
import torch

from longtail.metrics import summarize
from longtail.plots import plot_confusion, plot_per_class_accuracy, plot_reliability

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


def test_per_class_accuracy_plot(tmp_path, predictions):
    logits, targets, counts = predictions
    per_class = summarize(logits, targets, counts, (100, 20))["per_class"]
    per_class[3] = None  # a class absent from the split is left blank, not drawn as 0
    out = plot_per_class_accuracy(per_class, counts, tmp_path / "figures" / "per_class.png", thresholds=(100, 20))
    assert out == str(tmp_path / "figures" / "per_class.png")
    assert_png(out, tmp_path)


def test_confusion_plot_accepts_logits_or_predictions(tmp_path, predictions):
    logits, targets, counts = predictions
    a = plot_confusion(logits, targets, 8, tmp_path / "confusion.png", class_counts=counts)
    b = plot_confusion(logits.argmax(1), targets, 8, tmp_path / "confusion_preds.png")
    assert_png(a, tmp_path)
    assert_png(b, tmp_path)


def test_reliability_plot_overwrites_atomically(tmp_path, predictions):
    logits, targets, _ = predictions
    path = tmp_path / "reliability.png"
    path.write_bytes(b"stale")
    out = plot_reliability(logits, targets, path, bins=15)
    assert_png(out, tmp_path)
