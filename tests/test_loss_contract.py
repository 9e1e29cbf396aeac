"""Every loss in the registry (`losses.NAMES` on class ids, `losses.MULTILABEL_NAMES` on multi-hot targets),
at the start of training and after DRW's switch: a finite scalar, differentiable with a finite, non-zero
gradient, float64 logits kept in float64, and a mixed batch (mixup / CutMix) scored as lam loss(a) +
(1 - lam) loss(b). Parametrised over the registry, so a loss added there is covered without editing this file;
float32 under autocast is tests/test_loss_precision.py's."""
import typing

import pytest
import torch

from longtail.config import LossConfig
from longtail.losses import MULTILABEL_NAMES, NAMES, ConfiguredLoss, MultiLabelLoss
from longtail.mixing import MixedTargets

COUNTS = [60, 20, 8, 3]
G = torch.Generator().manual_seed(0)
LOGITS = torch.randn(8, 4, generator=G) * 3
SINGLE = torch.arange(8) % 4
MULTI = (torch.rand(8, 4, generator=G) < 0.4).long()
MULTI[0], MULTI[1] = torch.tensor([1, 1, 1, 0]), torch.tensor([0, 0, 0, 1])  # each class on and off some image


def test_the_registry_is_every_loss_the_config_accepts():
    assert set(NAMES) | set(MULTILABEL_NAMES) == set(typing.get_args(typing.get_type_hints(LossConfig)["name"]))


def build(name: str, multilabel: bool):
    if multilabel:
        return MultiLabelLoss(LossConfig(name=name), COUNTS, num_images=100), MULTI
    drw = None if name == "cb" else 0.5  # cb is class-balanced throughout; the others switch at half-way
    return ConfiguredLoss(LossConfig(name=name, drw_start=drw), COUNTS, epochs=10), SINGLE


@pytest.mark.parametrize("progress", [0.0, 0.9])
@pytest.mark.parametrize("name,multilabel", [(n, False) for n in NAMES] + [(n, True) for n in MULTILABEL_NAMES])
def test_every_loss_is_a_finite_differentiable_scalar_in_the_logits_dtype(name, multilabel, progress):
    loss, targets = build(name, multilabel)
    z = LOGITS.double().requires_grad_()
    value = loss(z, targets, progress)
    assert value.shape == () and value.dtype == torch.float64 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0

    partner = targets.flip(0)
    lam = torch.tensor(0.3)
    mixed = loss(LOGITS, MixedTargets(targets, partner, lam), progress)
    expected = lam * loss(LOGITS, targets, progress) + (1 - lam) * loss(LOGITS, partner, progress)
    torch.testing.assert_close(mixed, expected)
