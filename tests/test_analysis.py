"""Analysis: FDR against closed forms, cosine statistics, BN gammas, norms, tracking and `analyze_run`."""
import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from longtail.analysis import (
    analyze_run, bn_gammas, class_feature_norms, classifier_norms, cosine_stats, fisher_details, fisher_ratio, track,
)
from longtail.config import load_config
from longtail.engine import fit
from longtail.models.heads import CosineHead, ETFHead, LinearHead
from tiny import TINY_MLP


def test_fdr_of_a_hand_computed_example():
    # Class 0 at 0 and 2, class 1 at 4 and 6: mu = 3, mu_0 = 1, mu_1 = 5.
    # S_b = 2 * 2^2 + 2 * 2^2 = 16, S_w = 1 + 1 + 1 + 1 = 4, FDR = 16 / 4 = 4.
    x = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert fisher_ratio(x, y) == pytest.approx(4.0)
    # A second dimension, uncorrelated with the first within each class and with equal class means,
    # adds within-class scatter only in its own direction, so the ratio stays 4.
    x2 = torch.tensor([[0.0, 1.0], [2.0, -1.0], [4.0, -1.0], [6.0, 1.0]])
    assert fisher_ratio(x2, y) == pytest.approx(4.0)
    x3 = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 1.0], [6.0, 3.0]])
    # dim 2: means 0 / 2, mu = 1, S_b = [[16, 8], [8, 4]], S_w = [[4, 2], [2, 2]]; tr(S_w^-1 S_b) = 4.
    assert fisher_ratio(x3, y) == pytest.approx(4.0)


def test_fdr_of_two_classes_matches_the_fisher_closed_form():
    # For two classes tr(S_w^-1 S_b) = n0 n1 / N * d^T S_w^-1 d with d = mu_0 - mu_1.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 4, generator=g), torch.randn(12, 4, generator=g) + torch.tensor([1.0, 0.5, 0, -2])])
    y = torch.tensor([0] * 30 + [1] * 12)
    a, b = x[:30].double(), x[30:].double()
    d = a.mean(0) - b.mean(0)
    s_w = (a - a.mean(0)).T @ (a - a.mean(0)) + (b - b.mean(0)).T @ (b - b.mean(0))
    expected = 30 * 12 / 42 * float(d @ torch.linalg.solve(s_w, d))
    assert fisher_ratio(x, y) == pytest.approx(expected, rel=1e-9)


def test_fdr_drops_near_constant_dimensions():
    x = torch.tensor([[0.0, 7.0, 0.0], [2.0, 7.0, 0.0], [4.0, 7.000001, 0.0], [6.0, 7.000001, 0.0]],
                     dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    # Kept, dim 1 would separate the classes perfectly (zero within-class scatter) and dominate the ratio.
    assert fisher_ratio(x, y) == pytest.approx(4.0)


def test_fdr_with_more_dimensions_than_samples_uses_the_pseudo_inverse():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 20, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    # S_w has rank 6 - 3 = 3 of 20: solve would not raise but return rounding noise (~1e17).
    details = fisher_details(x, y)
    assert details["solver"] == "pinv_fallback" and details["dims"] == 20
    assert np.isfinite(details["fdr"]) and details["fdr"] > 0
    assert details["fdr"] == pytest.approx(fisher_ratio(x, y, rule="spread"))  # no dimension dropped by either


def test_fdr_falls_back_to_the_pseudo_inverse_when_solve_fails():
    # Two identical dimensions: S_w = [[4, 4], [4, 4]] is exactly singular and solve raises.
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0], [4.0, 4.0], [6.0, 6.0]])
    y = torch.tensor([0, 0, 1, 1])
    # pinv(S_w) = [[1, 1], [1, 1]] / 16, S_b = 16 [[1, 1], [1, 1]]: tr = 4, as with one copy.
    assert fisher_details(x, y) == {"fdr": pytest.approx(4.0), "solver": "pinv_fallback", "dims": 2, "dims_total": 2}
    assert fisher_details(x[:, :1], y)["solver"] == "solve"
    assert fisher_details(x, y, rule="spread")["solver"] == "pinv"


def _sylvester_hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(h, np.array([[1.0, 1.0], [1.0, -1.0]]))
    return h


def test_fdr_rules_differ_on_a_tiny_scale_but_class_informative_dimension():
    # 16 samples; the columns of a Hadamard matrix are orthogonal +-1 patterns. Column 8 splits the
    # samples into the two classes; each dimension j = mean + spread * H[:, k_j] + sep * H[:, 8], with
    # its own within-class pattern k_j, so S_w is diagonal and FDR = sum_j (sep_j / spread_j)^2.
    h = _sylvester_hadamard(16)
    y = torch.from_numpy((h[:, 8] < 0).astype(np.int64))

    def dim(mean, spread, pattern, sep):
        return mean + spread * h[:, pattern] + sep * h[:, 8]

    # Two unit-scale dimensions that barely separate the classes: 0.2^2 + 0.1414^2 = 0.06.
    # One dimension at scale 1e-5 that separates them well: (1.51e-5 / 1e-6)^2 = 228.01.
    x = torch.from_numpy(np.stack([dim(1.0, 1.0, 1, 0.2), dim(1.0, 1.0, 2, 0.1414),
                                   dim(2e-5, 1e-6, 3, 1.51e-5)], axis=1))
    reference, spread = fisher_details(x, y), fisher_details(x, y, rule="spread")
    # Reference: t = 1e-3 x |mean of all entries| = 6.7e-4, and the tiny dimension's values stay within
    # 3.3e-5 of the first sample's, so it is dropped. Spread: its std 1.5e-5 > 1e-3 x |its mean 2e-5|: kept.
    assert reference == {"fdr": pytest.approx(0.06, rel=1e-3), "solver": "solve", "dims": 2, "dims_total": 3}
    assert spread == {"fdr": pytest.approx(228.07, rel=1e-3), "solver": "pinv", "dims": 3, "dims_total": 3}
    assert fisher_ratio(x, y) == pytest.approx(0.06, rel=1e-3)  # the reference rule is the default
    assert spread["fdr"] > 1000 * reference["fdr"]
    with pytest.raises(ValueError, match="FDR rule"):
        fisher_ratio(x, y, rule="pinv")


def test_fdr_reference_rule_drops_columns_of_s_w_within_the_tolerance():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 0.2], [6.0, 0.2]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    # Mean of all entries 1.55, t = 1.55e-3: dimension 1 moves 0.2 > t from the first sample, so the
    # first test keeps it; it has no within-class spread, so S_w's column 1 is all 0 <= t and the
    # second test drops it (kept, S_w would be singular). Dimension 0 alone: FDR 4, by solve.
    assert fisher_details(x, y) == {"fdr": pytest.approx(4.0), "solver": "solve", "dims": 1, "dims_total": 2}


def test_cosine_statistics_of_a_hand_made_example():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])
    y = torch.tensor([0, 0, 1, 1, 1])
    stats = cosine_stats(x, y, num_classes=3)
    assert stats["same"] == pytest.approx(1.0)  # same-class pairs point the same way
    assert stats["different"] == pytest.approx(0.0)  # the classes are orthogonal
    m = stats["matrix"]
    assert m[0, 0] == pytest.approx(1.0) and m[0, 1] == pytest.approx(0.0) and np.isnan(m[2, 2])

    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    stats = cosine_stats(x, y, num_classes=2)
    # same pairs (ordered): (0,1) 0 twice, (2,3) -1/sqrt2 twice -> mean -1/(2 sqrt2)
    assert stats["same"] == pytest.approx(-1 / (2 * np.sqrt(2)))
    # different: (0,2) -1, (0,3) 1/sqrt2, (1,2) 0, (1,3) 1/sqrt2 -> mean (sqrt2 - 1) / 4
    assert stats["different"] == pytest.approx((np.sqrt(2) - 1) / 4)
    assert stats["matrix"][0, 1] == pytest.approx(stats["different"])


def test_feature_and_classifier_norms():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])
    assert class_feature_norms(x, torch.tensor([0, 0, 1]), 3) == [pytest.approx(3.0), pytest.approx(10.0), None]
    head = LinearHead(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    assert classifier_norms(head) == [pytest.approx(5.0), pytest.approx(1.0)]
    assert classifier_norms(ETFHead(4, 3)) == [pytest.approx(1.0)] * 3
    assert classifier_norms(CosineHead(4, 3)) is not None
    assert classifier_norms(nn.Identity()) is None


def test_bn_gammas_per_layer_and_overall():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Conv2d(1, 1, 1), nn.BatchNorm2d(3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 3.0]))
        model[3].weight.copy_(torch.tensor([2.0, 2.0, 2.0]))
    g = bn_gammas(model)
    assert [layer["name"] for layer in g["layers"]] == ["1", "3"]
    assert g["layers"][0]["mean"] == pytest.approx(2.0) and g["layers"][0]["std"] == pytest.approx(1.0)
    assert g["mean"] == pytest.approx(2.0) and g["std"] == pytest.approx(np.std([1, 3, 2, 2, 2]))
    assert bn_gammas(nn.Linear(2, 2)) == {"layers": [], "mean": None, "std": None}


TINY = [*TINY_MLP, "train.epochs=2", "eval.batch_size=256"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("runs") / "tracked"
    fit(load_config(None, [*TINY, "train.track_every=1", "optim.weight_decay=0.005"]), out, data_root=str(data_root))
    return out, str(data_root)


def test_track_leaves_module_modes_alone():
    from longtail.data.splits import InMemorySplit

    split = InMemorySplit(torch.randint(0, 255, (12, 1, 4, 4), dtype=torch.uint8), torch.arange(12) % 3,
                          torch.arange(12), [0.5], [0.25], "none", 3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU())
    model.features = model.forward
    model.train()
    model[2].eval()
    stats = track(model, split, torch.device("cpu"))
    assert set(stats) == {"fdr", "fdr_solver", "cos_same", "cos_different", "feature_norm_mean", "bn_gamma_mean",
                          "bn_gamma_std"}
    assert stats["fdr_solver"] in ("solve", "pinv_fallback")
    assert model.training and not model[2].training and stats["bn_gamma_mean"] == pytest.approx(1.0)


def test_training_tracks_and_analyze_writes_json_and_figures(tracked_run):
    out, root = tracked_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("track" in r and r["track"]["fdr"] > 0 for r in records)
    events = EventAccumulator(str(out))
    events.Reload()
    for tag in ("track/fdr", "track/bn_gamma_mean", "track/bn_gamma_std", "track/cos_different"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    assert all(r["track"]["fdr_solver"] in ("solve", "pinv_fallback") for r in records)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_loss": 0.5, "tr')  # a run killed mid-write leaves a torn last line
    result = analyze_run(out, data_root=root)
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["splits"]["train"]["fdr"] == pytest.approx(result["splits"]["train"]["fdr"])
    assert saved["fdr_rule"] == "reference"
    assert {saved["splits"][s]["fdr_solver"] for s in ("train", "test")} <= {"solve", "pinv_fallback"}
    assert len(saved["splits"]["test"]["cos_matrix"]) == 10 and len(saved["classifier_norms"]) == 10
    assert [t["epoch"] for t in saved["tracked"]] == [1, 2]
    assert len(saved["bn_gamma"]["layers"]) == 3
    for name in ("norms.png", "cosine-train.png", "cosine-test.png", "tracking.png"):
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG", name
