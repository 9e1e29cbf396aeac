"""Post-hoc logit adjustment: formulas, tau search, folding into the head, the engine step and the CLI."""
import json
import math

import pytest
import torch
import yaml

from longtail.checkpoint import load_checkpoint
from longtail.config import load_config
from longtail.engine import collect_logits, fit, load_run
from longtail.errors import ConfigError
from longtail.methods.posthoc import adjust_logits, fold_into_head, run_posthoc, search_tau, tau_grid
from longtail.models import build_model
from longtail.models.heads import CosineHead, ETFHead, LinearHead
from tiny import TINY_MLP

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

PRIOR = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)


def test_adjust_logits_matches_the_formulas():
    z = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    mult = adjust_logits(z, PRIOR, "multiplicative", 0.5)
    assert torch.allclose(mult, torch.tensor([[1 / 0.6**0.5, -2 / 0.3**0.5, 0.5 / 0.1**0.5]], dtype=torch.float64))
    add = adjust_logits(z, PRIOR, "additive", 2.0)
    assert torch.allclose(add, z - 2.0 * torch.log(PRIOR))
    assert torch.equal(adjust_logits(z, PRIOR, "multiplicative", 0.0), z)
    with pytest.raises(ConfigError, match="multiplicative, additive"):
        adjust_logits(z, PRIOR, "none", 1.0)


def test_tau_grid_includes_both_ends():
    grid = tau_grid([0.0, 2.0, 0.05])
    assert len(grid) == 41 and grid[0] == 0.0 and grid[-1] == 2.0 and grid[13] == 0.65
    assert tau_grid([0.0, 1.0, 0.3]) == [0.0, 0.3, 0.6, 0.9]


def test_search_tau_finds_the_smallest_best_tau():
    # Two classes, prior 0.9 / 0.1, additive: class 0 wins while a > tau * log(9) = 2.197 tau.
    prior = torch.tensor([0.9, 0.1], dtype=torch.float64)
    a = torch.tensor([1.0, 2.0, 3.0, 0.5])
    logits = torch.stack([a, torch.zeros(4)], dim=1)
    targets = torch.tensor([0, 0, 0, 1])
    tau, curve = search_tau(logits, targets, prior, "additive", [0.0, 1.0, 0.1])
    assert tau == pytest.approx(0.3)  # 0.3 and 0.4 both separate all four; the smaller wins
    assert len(curve) == 11 and curve[0] == [0.0, 50.0] and curve[3][1] == 100.0
    assert curve[5][1] == pytest.approx(100 * (2 / 3 + 1) / 2)  # tau 0.5: 2.197 * 0.5 > 1 loses a = 1


def _heads():
    torch.manual_seed(0)
    with_bias = LinearHead(5, 3, bias=True)
    no_bias = LinearHead(5, 3, bias=False)
    etf = ETFHead(5, 3, seed=1)
    with torch.no_grad():
        etf.bias.copy_(torch.tensor([0.3, -0.1, 0.2]))
    return [with_bias, no_bias, etf]


@pytest.mark.parametrize("kind,tau", [("multiplicative", 1.6), ("additive", 1.0), ("additive", 0.0)])
def test_folded_head_gives_the_adjusted_logits(kind, tau):
    features = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    for head in _heads():
        folded = fold_into_head(head, PRIOR, kind, tau)
        assert type(folded) is LinearHead
        expected = adjust_logits(head(features).double(), PRIOR, kind, tau)
        assert torch.allclose(folded(features).double(), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(folded(features).argmax(1), expected.argmax(1))


def test_multiplicative_fold_of_a_biasless_head_stays_biasless():
    folded = fold_into_head(LinearHead(4, 3, bias=False), PRIOR, "multiplicative", 1.0)
    assert folded.bias is None
    assert fold_into_head(LinearHead(4, 3, bias=False), PRIOR, "additive", 1.0).bias is not None


def test_cosine_head_is_refused():
    with pytest.raises(ConfigError, match="CosineHead.*cannot be folded"):
        fold_into_head(CosineHead(4, 3, scale=30.0), PRIOR, "multiplicative", 1.0)


# ----------------------------------------------------------------------------- end to end

TINY = [*TINY_MLP, "data.val_per_class=5", "train.epochs=2", "eval.batch_size=256"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("runs") / "plain"
    fit(load_config(None, TINY), out, data_root=data_root)
    return out


def test_engine_folds_the_searched_tau_into_an_etf_head(tmp_path, data_root):
    cfg = load_config(None, [*TINY, "model.head=etf", "posthoc.kind=multiplicative"])
    results = fit(cfg, tmp_path / "run", data_root=data_root)
    record = results["posthoc"]
    assert record["kind"] == "multiplicative" and record["searched"]
    assert record["tau"] in tau_grid(cfg.posthoc.grid) and len(record["curve"]) == 41
    spec = yaml.safe_load((tmp_path / "run" / "model.yaml").read_text())
    assert spec["model"]["head"] == "linear"

    # The exported model's logits are the trained (unadjusted) model's logits, adjusted.
    run = load_run(tmp_path / "run", data_root)
    raw = build_model(cfg.model, 10, 1, 28)
    raw.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"])
    device = torch.device("cpu")
    exported, targets = collect_logits(run.model, run.data.test, device)
    unadjusted, _ = collect_logits(raw, run.data.test, device)
    prior = torch.tensor(run.data.class_counts, dtype=torch.float64)
    expected = adjust_logits(unadjusted.double(), prior / prior.sum(), "multiplicative", record["tau"])
    assert torch.allclose(exported.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(exported.argmax(1), expected.argmax(1))


def test_posthoc_without_validation_split_or_tau_is_an_error(tmp_path, data_root):
    overrides = [o for o in TINY if not o.startswith("data.val_per_class")]
    cfg = load_config(None, [*overrides, "train.epochs=1", "posthoc.kind=additive"])
    with pytest.raises(ConfigError, match="posthoc.tau.*data.val_per_class"):
        fit(cfg, tmp_path / "run", data_root=data_root)


def test_cli_posthoc_writes_a_derived_run_and_leaves_the_original(plain_run, data_root):
    before = (plain_run / "model.pt").read_bytes()
    results = run_posthoc(str(plain_run), kind="additive", tau=1.0, data_root=data_root)
    out = plain_run / "posthoc-additive"
    assert (plain_run / "model.pt").read_bytes() == before
    saved = json.loads((out / "results.json").read_text())
    assert saved["posthoc"]["tau"] == 1.0 and not saved["posthoc"]["searched"]
    assert saved["config"]["posthoc"] == {"kind": "additive", "tau": 1.0, "grid": [0.0, 2.0, 0.05], "calibrate": "none"}
    spec = yaml.safe_load((out / "model.yaml").read_text())
    assert spec["folds"] == [{"kind": "logit_adjustment", "form": "additive", "tau": 1.0}]
    assert spec["logit_prior"] == "uniform"  # a CE model adjusted by z - log pi
    assert math.isclose(saved["top1"], results["top1"]) and "before" in saved["posthoc"]

    original, derived = load_run(plain_run, data_root), load_run(out, data_root)
    device = torch.device("cpu")
    z, _ = collect_logits(original.model, original.data.test, device)
    z_adj, _ = collect_logits(derived.model, derived.data.test, device)
    prior = torch.tensor(original.data.class_counts, dtype=torch.float64)
    assert torch.allclose(z_adj.double(), z.double() - torch.log(prior / prior.sum()), atol=1e-4)

    with pytest.raises(ConfigError, match=r"already has post-hoc adjustment \(additive, tau 1.0\)"):
        run_posthoc(str(out), data_root=data_root)


def test_cli_posthoc_searches_tau_by_default(plain_run, data_root):
    results = run_posthoc(str(plain_run), data_root=data_root)
    assert results["posthoc"]["kind"] == "multiplicative" and results["posthoc"]["searched"]
    best = max(point[1] for point in results["posthoc"]["curve"])
    assert [results["posthoc"]["tau"], best] in results["posthoc"]["curve"]
