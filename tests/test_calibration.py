"""Temperature calibration: the fitted T is the NLL minimiser, the fold into each head is exact, and the
engine fits it on the validation split after post-hoc adjustment and records it."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from longtail.calibration import BOUNDS, calibration_record, fit_temperature
from longtail.config import load_config
from longtail.engine import collect_logits, evaluate_run, fit, load_run
from longtail.errors import ConfigError
from longtail.methods.posthoc import run_posthoc
from longtail.metrics import expected_calibration_error
from longtail.models.heads import CosineHead, ETFHead, LinearHead, scale_head
from tiny import TINY_MLP

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

TINY = [*TINY_MLP, "train.epochs=2", "data.val_per_class=5", "posthoc.kind=additive", "posthoc.tau=1.0"]


def _overconfident(n=3000, k=5, factor=3.0, seed=0):
    """Labels drawn from softmax(base), logits factor x base: temperature `factor` calibrates them."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, k, generator=g, dtype=torch.float64) * 1.5
    targets = torch.multinomial(base.softmax(1), 1, generator=g).squeeze(1)
    return base * factor, targets


def test_temperature_is_the_nll_minimiser():
    logits, targets = _overconfident()
    share = torch.bincount(targets, minlength=5).double() / len(targets)
    t = fit_temperature(logits, targets, share)  # the split's own class shares: every weight 1, the plain NLL
    grid = torch.logspace(-1, 1, 4001, dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(logits / g, targets) for g in grid])
    assert t == pytest.approx(float(grid[nll.argmin()]), rel=2e-3)
    assert t == pytest.approx(3.0, rel=0.1)  # the factor the logits were inflated by
    plain = F.cross_entropy(logits / t, targets)
    assert plain < F.cross_entropy(logits / (t * 1.01), targets) and plain < F.cross_entropy(logits / (t / 1.01), targets)


def test_temperature_minimises_the_nll_reweighted_to_the_logits_prior():
    logits, targets = _overconfident(seed=1)
    prior = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    t = fit_temperature(logits, targets, prior)
    share = torch.bincount(targets, minlength=5).double() / len(targets)
    w = prior[targets] / share[targets]

    def nll(temperature):
        return float((w * F.cross_entropy(logits / temperature, targets, reduction="none")).sum() / w.sum())

    assert nll(t) < nll(t * 1.005) and nll(t) < nll(t / 1.005)
    assert t != pytest.approx(fit_temperature(logits, targets, share), rel=1e-3)  # the weights matter


def test_a_split_without_errors_is_warned_about(caplog):
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert fit_temperature(logits, torch.tensor([0, 1]), torch.tensor([0.5, 0.5])) < 0.1  # NLL falling towards T = 0
    assert "classifies every validation sample correctly" in caplog.text
    caplog.clear()
    logits, targets = _overconfident(n=500)
    fit_temperature(logits, targets, torch.full((5,), 0.2, dtype=torch.float64))
    assert caplog.text == ""


@pytest.mark.parametrize("head", [LinearHead(6, 4), LinearHead(6, 4, bias=False), ETFHead(6, 4, seed=3),
                                  CosineHead(6, 4, scale=30.0)])
def test_the_fold_divides_the_logits_of_every_head(head):
    torch.manual_seed(0)
    if isinstance(head, ETFHead):
        with torch.no_grad():
            head.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    features = torch.randn(7, 6)
    folded = scale_head(copy.deepcopy(head), 1 / 2.5)
    assert torch.allclose(folded(features), head(features) / 2.5, rtol=1e-6, atol=1e-6)
    assert type(folded) is type(head)  # a cosine head stays a cosine head, at scale 30 / 2.5
    if isinstance(head, CosineHead):
        assert folded.scale == pytest.approx(12.0)


def test_calibration_record():
    logits, targets = _overconfident(n=500)
    record = calibration_record(logits / 3, targets, 3.0, 15)
    assert record["temperature"] == 3.0
    assert record["nll_uncalibrated"] == pytest.approx(F.cross_entropy(logits, targets).item())
    assert record["ece_uncalibrated"] == pytest.approx(expected_calibration_error(logits, targets, 15))
    assert calibration_record(logits, targets, None, 15) == {"temperature": None, "ece_uncalibrated": None,
                                                             "nll_uncalibrated": None}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """The same tiny training twice, with and without temperature calibration after additive adjustment."""
    out = tmp_path_factory.mktemp("runs")
    plain = fit(load_config(None, TINY), out / "plain", data_root=str(data_root))
    calibrated = fit(load_config(None, [*TINY, "posthoc.calibrate=temperature"]), out / "calibrated",
                     data_root=str(data_root))
    return data_root, out, plain, calibrated


def test_calibrated_export_is_the_adjusted_model_divided_by_t(runs):
    root, out, plain, calibrated = runs
    t = calibrated["temperature"]
    assert plain["temperature"] is None and plain["ece_uncalibrated"] is None
    spec = yaml.safe_load((out / "calibrated" / "model.yaml").read_text())
    assert [f["kind"] for f in spec["folds"]] == ["logit_adjustment", "temperature"]  # adjusted, then calibrated
    assert spec["folds"][1]["temperature"] == t and spec["logit_prior"] == "uniform"

    a, b = load_run(out / "plain", str(root)), load_run(out / "calibrated", str(root))
    z_plain, y = collect_logits(a.model, a.data.test, torch.device("cpu"))
    z_cal, _ = collect_logits(b.model, b.data.test, torch.device("cpu"))
    assert torch.allclose(z_cal, z_plain / t, rtol=1e-5, atol=1e-6)
    # The uncalibrated record is the plain run's; accuracy is untouched.
    assert calibrated["nll_uncalibrated"] == pytest.approx(plain["nll"], rel=1e-5)
    assert calibrated["ece_uncalibrated"] == pytest.approx(plain["ece"], abs=1e-4)
    assert calibrated["per_class"] == plain["per_class"]

    # T is the validation NLL minimiser of the adjusted logits (uniform prior, balanced val: plain NLL).
    z_val, y_val = collect_logits(a.model, a.data.val, torch.device("cpu"))
    assert t == pytest.approx(fit_temperature(z_val, y_val, torch.full((10,), 0.1, dtype=torch.float64)), rel=1e-6)
    nll = [F.cross_entropy(z_val.double() / s, y_val).item() for s in (t / 1.02, t, t * 1.02)]
    assert nll[1] < nll[0] and nll[1] < nll[2]


def test_eval_reproduces_the_calibration_record_and_draws_both_reliability_diagrams(runs):
    root, out, _, calibrated = runs
    metrics = evaluate_run(out / "calibrated", plots=True, data_root=str(root))
    for key in ("temperature", "ece", "nll", "ece_uncalibrated", "nll_uncalibrated"):
        assert metrics[key] == pytest.approx(calibrated[key], rel=1e-6, abs=1e-9), key
    figures = out / "calibrated" / "figures"
    for name in ("reliability-test.png", "reliability-uncalibrated-test.png"):
        assert (figures / name).stat().st_size > 1000
    assert str(figures / "reliability-uncalibrated-test.png") in metrics["figures"]


def test_a_training_prior_model_is_calibrated_to_its_own_prior_and_posthoc_then_refused(runs, tmp_path):
    root = runs[0]
    results = fit(load_config(None, [*TINY, "posthoc.kind=none", "posthoc.calibrate=temperature"]), tmp_path / "ce",
                  data_root=str(root))
    run = load_run(tmp_path / "ce", str(root))
    assert run.spec["logit_prior"] == "train" and [f["kind"] for f in run.spec["folds"]] == ["temperature"]
    # The validation split is balanced, the logits are calibrated to the training prior: the NLL is re-weighted.
    t = results["temperature"]
    z_val, y_val = collect_logits(run.model, run.data.val, torch.device("cpu"))
    prior = torch.tensor(run.data.class_counts, dtype=torch.float64) / sum(run.data.class_counts)
    assert t == pytest.approx(fit_temperature(z_val * t, y_val, prior), rel=1e-4)
    with pytest.raises(ConfigError, match="temperature folded in"):
        run_posthoc(str(tmp_path / "ce"), kind="additive", tau=1.0, data_root=str(root))


def test_calibration_without_a_validation_split_is_refused_before_training(tmp_path, runs):
    root = runs[0]
    cfg = load_config(None, [*TINY, "data.val_per_class=0", "posthoc.kind=none", "posthoc.calibrate=temperature"])
    with pytest.raises(ConfigError, match="posthoc.calibrate: temperature is fitted on the validation split"):
        fit(cfg, tmp_path / "run", data_root=str(root))
    assert not (tmp_path / "run").exists()


def test_calibrate_takes_only_its_choices():
    with pytest.raises(ConfigError, match="posthoc.calibrate: 'platt' is not allowed; choose one of: none, temperature"):
        load_config(None, ["posthoc.calibrate=platt"])
    assert math.isfinite(BOUNDS[1])
