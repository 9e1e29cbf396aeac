import math

import pytest
import torch

from longtail.errors import ConfigError
from longtail.metrics import (
    calibration_bins,
    default_thresholds,
    expected_calibration_error,
    flip_tta,
    format_table,
    gather_unique,
    group_of_classes,
    summarize,
)


def logits_predicting(preds: list[int], num_classes: int) -> torch.Tensor:
    logits = torch.zeros(len(preds), num_classes)
    logits[torch.arange(len(preds)), torch.tensor(preds)] = 5.0
    return logits


def two_class_logits(p_first: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly [p, 1 - p] per row."""
    p = torch.tensor(p_first, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], dim=1)


def test_default_thresholds_follow_spec():
    assert default_thresholds("cifar10_lt") == default_thresholds("fashion_mnist_lt") == (1000, 200)
    assert default_thresholds("cifar100_lt") == default_thresholds("imagenet_lt") == (100, 20)
    assert default_thresholds("folder") == (100, 20)  # whatever its class count


def test_group_boundaries_are_inclusive_for_medium():
    many, medium, few = group_of_classes([101, 100, 20, 19, 500], (100, 20))
    assert many == [0, 4]
    assert medium == [1, 2]
    assert few == [3]


def test_perfect_and_all_wrong():
    counts = [500, 50, 5]
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    perfect = summarize(logits_predicting(targets.tolist(), 3), targets, counts, (100, 20))
    for key in ("top1", "balanced", "many", "medium", "few"):
        assert perfect[key] == pytest.approx(100.0)
    wrong = summarize(logits_predicting(((targets + 1) % 3).tolist(), 3), targets, counts, (100, 20))
    for key in ("top1", "balanced", "many", "medium", "few"):
        assert wrong[key] == pytest.approx(0.0)
    assert wrong["per_class"] == [0.0, 0.0, 0.0]


def test_hand_made_per_class_and_groups_on_imbalanced_split():
    counts = [500, 50, 5]  # many, medium, few under (100, 20)
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    preds = [0, 0, 0, 1, 1, 0, 0]  # class 0: 3/4, class 1: 1/2, class 2: 0/1
    res = summarize(logits_predicting(preds, 3), targets, counts, (100, 20))
    assert res["per_class"] == pytest.approx([75.0, 50.0, 0.0])
    assert res["top1"] == pytest.approx(400 / 7)
    assert res["balanced"] == pytest.approx(125 / 3)
    assert res["top1"] != pytest.approx(res["balanced"])
    assert (res["many"], res["medium"], res["few"]) == pytest.approx((75.0, 50.0, 0.0))
    assert res["class_counts"] == counts
    assert res["thresholds"] == [100, 20]
    assert res["num_samples"] == 7


def test_empty_group_is_none_and_absent_class_is_skipped():
    counts = [5000, 3000, 1500]  # all > 1000: no Medium, no Few
    targets = torch.tensor([0, 0, 1])  # class 2 absent from the split
    res = summarize(logits_predicting([0, 1, 1], 3), targets, counts, default_thresholds(3))
    assert res["medium"] is None and res["few"] is None
    assert res["per_class"] == [50.0, 100.0, None]
    assert res["balanced"] == pytest.approx(75.0)
    assert res["many"] == pytest.approx(75.0)


def test_ece_and_nll_match_hand_values():
    # confidences 0.95 (right), 0.95 (wrong), 0.70 (right), 0.55 (wrong); 15 bins
    logits = two_class_logits([0.95, 0.95, 0.70, 0.55])
    targets = torch.tensor([0, 1, 0, 1])
    # bins: {0.95, 0.95}: |0.5 - 0.95| * 2/4; {0.70}: |1 - 0.7| / 4; {0.55}: |0 - 0.55| / 4
    expected_ece = (0.45 * 0.5 + 0.30 * 0.25 + 0.55 * 0.25) * 100
    expected_nll = -(math.log(0.95) + math.log(0.05) + math.log(0.70) + math.log(0.45)) / 4
    res = summarize(logits, targets, [10, 10], (100, 20), ece_bins=15)
    assert res["ece"] == pytest.approx(expected_ece, abs=1e-9)
    assert res["nll"] == pytest.approx(expected_nll, abs=1e-12)


def test_ece_bins_are_right_closed_and_full_confidence_is_in_last_bin():
    # confidence 1.0 shares the last bin with 0.95: (0.5 acc vs 0.975 conf) -> 47.5 %
    logits = torch.tensor([[100.0, 0.0], [math.log(0.95), math.log(0.05)]], dtype=torch.float64)
    targets = torch.tensor([1, 0])
    assert expected_calibration_error(logits, targets, 15) == pytest.approx(47.5, abs=1e-9)
    # a tie gives confidence exactly 0.5, the edge between 2 bins: it belongs to (0, 0.5]
    _, _, counts = calibration_bins(torch.zeros(1, 2), torch.tensor([0]), 2)
    assert counts.tolist() == [1.0, 0.0]


def test_ece_agrees_with_torchmetrics_off_boundaries():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 7, generator=g) * 2
    targets = torch.randint(0, 7, (400,), generator=g)
    ours = expected_calibration_error(logits, targets, 15)
    # probabilities, not logits: torchmetrics treats inputs inside [0, 1] as probabilities already
    theirs = tm.multiclass_calibration_error(logits.softmax(1), targets, num_classes=7, n_bins=15, norm="l1")
    assert ours == pytest.approx(float(theirs) * 100, abs=1e-4)


def test_summarize_rejects_class_mismatch():
    with pytest.raises(ConfigError, match="classes"):
        summarize(torch.zeros(2, 5), torch.tensor([0, 1]), [10, 10, 10], (100, 20))


def test_gather_unique_drops_padding_duplicates_and_sorts():
    idx = torch.tensor([4, 1, 3, 0, 2, 4, 1])  # a sampler padded with 4 and 1 again
    targets = idx % 3
    logits = idx.to(torch.float32).unsqueeze(1).repeat(1, 3)
    out_logits, out_targets, out_idx = gather_unique(logits, targets, idx)
    assert out_idx.tolist() == [0, 1, 2, 3, 4]
    assert out_targets.tolist() == [0, 1, 2, 0, 1]
    assert out_logits[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_flip_tta_averages_logits_of_image_and_mirror():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    logits_fn = lambda t: t[:, 0, 0, :]  # the first pixel row as 3 "logits"
    out = flip_tta(logits_fn, x)
    expected = (x[:, 0, 0, :] + x[:, 0, 0, :].flip(1)) / 2
    assert torch.equal(out, expected)


def test_format_table_shows_dash_for_missing_groups():
    res = {"top1": 71.234, "balanced": 70.0, "many": 80.0, "medium": None, "few": None, "ece": 5.5, "nll": 1.23456}
    single = format_table(res)
    assert "| All | Balanced | Many | Medium | Few | ECE | NLL |" in single
    assert "| 71.23 | 70.00 | 80.00 | — | — | 5.50 | 1.235 |" in single
    named = format_table([("erm", res), ("ewb", dict(res, few=12.5))]).splitlines()
    assert named[0].startswith("| Run |")
    assert named[2].startswith("| erm |") and named[3].startswith("| ewb |")
    assert "12.50" in named[3]
