import math

import pytest
import torch

from longtail import losses
from longtail.config import LossConfig
from longtail.errors import ConfigError

Z = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
Y = torch.tensor([0, 1])
COUNTS = [100, 10, 1]


def log_softmax_row(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


def ce_by_hand(rows: list[list[float]], ys: list[int], w: list[float] | None = None) -> float:
    w = w or [1.0] * len(rows[0])
    num = sum(-w[y] * log_softmax_row(r)[y] for r, y in zip(rows, ys))
    return num / sum(w[y] for y in ys)


def test_cross_entropy_matches_hand_computation():
    assert losses.cross_entropy(Z, Y).item() == pytest.approx(ce_by_hand(Z.tolist(), [0, 1]), rel=1e-6)


def test_class_balanced_weights_formula_and_sum():
    beta = 0.99
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    expected = [r * 3 / sum(raw) for r in raw]
    w = losses.class_balanced_weights(COUNTS, beta)
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert w.sum().item() == pytest.approx(3.0, rel=1e-6)
    assert w[2] > w[1] > w[0]  # rarer classes weigh more
    with pytest.raises(ConfigError, match="every class"):
        losses.class_balanced_weights([5, 0], beta)


def test_class_balanced_ce_is_weighted_ce():
    w = losses.class_balanced_weights(COUNTS, 0.9999).tolist()
    got = losses.class_balanced_ce(Z, Y, COUNTS, beta=0.9999).item()
    assert got == pytest.approx(ce_by_hand(Z.tolist(), [0, 1], w), rel=1e-6)


def test_focal_loss_matches_lin_et_al():
    gamma = 1.0
    expected = 0.0
    for row, y in zip(Z.tolist(), [0, 1]):
        log_p = log_softmax_row(row)[y]
        expected += -((1 - math.exp(log_p)) ** gamma) * log_p
    expected /= 2
    assert losses.focal_loss(Z, Y, gamma=gamma).item() == pytest.approx(expected, rel=1e-6)
    # gamma = 0 is plain (weighted) cross-entropy
    w = torch.tensor([1.0, 2.0, 0.5])
    assert losses.focal_loss(Z, Y, gamma=0.0, weight=w).item() == pytest.approx(
        losses.cross_entropy(Z, Y, weight=w).item(), rel=1e-6
    )


def test_ldam_margins_and_loss():
    m = losses.ldam_margins(COUNTS, max_margin=0.5)
    raw = [n**-0.25 for n in COUNTS]
    assert m.tolist() == pytest.approx([0.5 * r / max(raw) for r in raw], rel=1e-6)
    assert m.max().item() == pytest.approx(0.5)
    rows = Z.tolist()
    shifted = [[30 * (v - (m[y].item() if k == y else 0.0)) for k, v in enumerate(r)] for r, y in zip(rows, [0, 1])]
    got = losses.ldam_loss(Z, Y, COUNTS, max_margin=0.5, scale=30.0).item()
    assert got == pytest.approx(ce_by_hand(shifted, [0, 1]), rel=1e-5)


def test_logit_adjusted_and_balanced_softmax():
    tau = 0.7
    prior = [n / sum(COUNTS) for n in COUNTS]
    la_rows = [[v + tau * math.log(p) for v, p in zip(r, prior)] for r in Z.tolist()]
    got = losses.logit_adjusted_loss(Z, Y, COUNTS, tau=tau).item()
    assert got == pytest.approx(ce_by_hand(la_rows, [0, 1]), rel=1e-6)
    bs_rows = [[v + math.log(n) for v, n in zip(r, COUNTS)] for r in Z.tolist()]
    assert losses.balanced_softmax_loss(Z, Y, COUNTS).item() == pytest.approx(ce_by_hand(bs_rows, [0, 1]), rel=1e-6)


def test_bce_on_one_hot_targets():
    def bce(z: float, t: float) -> float:
        p = 1 / (1 + math.exp(-z))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    terms = [bce(v, 1.0 if k == y else 0.0) for r, y in zip(Z.tolist(), [0, 1]) for k, v in enumerate(r)]
    assert losses.bce_loss(Z, Y).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_drw_switches_weights_on_at_the_resolved_epoch():
    cfg = LossConfig(name="ldam", drw_start=0.8)
    fn = losses.build_loss(cfg, COUNTS, epochs=10)
    assert fn.drw_epoch == 8
    plain = losses.ldam_loss(Z, Y, COUNTS)
    weighted = losses.ldam_loss(Z, Y, COUNTS, weight=losses.class_balanced_weights(COUNTS, cfg.beta))
    assert fn(Z, Y, 0.79).item() == pytest.approx(plain.item(), rel=1e-6)
    assert fn(Z, Y, 0.8).item() == pytest.approx(weighted.item(), rel=1e-6)
    assert weighted.item() != pytest.approx(plain.item(), rel=1e-3)
    # an epoch number (>= 1) converts through the number of epochs
    by_epoch = losses.build_loss(LossConfig(name="ce", drw_start=3), COUNTS, epochs=4)
    assert by_epoch.weight(0.74) is None and by_epoch.weight(0.75) is not None


def test_build_loss_and_errors():  # every name: tests/test_loss_contract.py
    assert losses.build_loss(LossConfig(name="cb"), COUNTS, 5)(Z, Y, 0.0).item() == pytest.approx(
        losses.class_balanced_ce(Z, Y, COUNTS).item(), rel=1e-6
    )
    with pytest.raises(ConfigError, match="loss.name"):
        losses.build_loss(LossConfig(name="nope"), COUNTS, 5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="drw_start"):
        losses.build_loss(LossConfig(name="cb", drw_start=0.8), COUNTS, 5)
    with pytest.raises(ConfigError, match="beta"):
        losses.build_loss(LossConfig(beta=1.0, drw_start=0.5), COUNTS, 5)


def test_losses_follow_logits_dtype_and_gradients():
    z = Z.double().requires_grad_()
    fn = losses.build_loss(LossConfig(name="la", drw_start=0.0), COUNTS, epochs=5)
    loss = fn(z, Y, 0.5)
    loss.backward()
    assert loss.dtype == torch.float64 and z.grad is not None and z.grad.abs().sum() > 0


def test_logit_scale_is_ldams_scale_and_1_otherwise():
    for name in losses.NAMES:
        cfg = LossConfig(name=name, ldam_scale=16.0)
        expected = 16.0 if name == "ldam" else 1.0
        assert losses.logit_scale(cfg) == expected
        assert losses.build_loss(cfg, COUNTS, epochs=5).logit_scale == expected
    # It is the scale the loss applies to the logits, margins aside: LDAM without margins is CE on s * z.
    no_margin = losses.ldam_loss(Z, Y, COUNTS, max_margin=0.0, scale=16.0)
    assert no_margin.item() == pytest.approx(losses.cross_entropy(16.0 * Z, Y).item(), rel=1e-6)


@pytest.mark.parametrize("scale", [0.0, -30.0])
def test_ldam_scale_must_be_positive(scale):
    # Refused whichever loss is chosen, as every ranged `loss` key is: a mistake is caught before it matters.
    for name in ("ldam", "ce"):
        with pytest.raises(ConfigError, match="loss.ldam_scale: must be > 0"):
            losses.build_loss(LossConfig(name=name, ldam_scale=scale), COUNTS, 5)
    with pytest.raises(ValueError, match=r"LDAMLoss\(scale="):
        losses.LDAMLoss(COUNTS, scale=scale)
