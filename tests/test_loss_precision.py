"""Every loss computes in float32 whatever the logits' dtype (train.amp with float16 or bfloat16): the same value
as on the logits cast to float32, and never NaN (ASL below a logit of about -17 was NaN in float16)."""
import pytest
import torch

from longtail.config import LossConfig
from longtail.losses import MULTILABEL_NAMES, NAMES, ConfiguredLoss, MultiLabelLoss
from longtail.methods.more import more_loss

COUNTS = [60, 20, 8, 3]


def logits_and_targets(multilabel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 4, generator=g) * 6
    z[:, 3] = -20.0  # sigmoid(-20) is 0 in float16
    if multilabel:
        y = (torch.rand(16, 4, generator=g) < 0.4).long()
        y[0], y[1] = torch.tensor([1, 1, 1, 0]), torch.tensor([0, 0, 0, 1])  # each class on and off some image
        return z, y
    return z, torch.arange(16) % 4


def registered_losses():
    for name in NAMES:
        yield name, False
    for name in MULTILABEL_NAMES:
        yield name, True


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,multilabel", list(registered_losses()))
def test_each_loss_is_computed_in_float32_for_half_precision_logits(name, multilabel, dtype):
    cfg = LossConfig(name=name)
    loss = MultiLabelLoss(cfg, COUNTS, 100) if multilabel else ConfiguredLoss(cfg, COUNTS, epochs=10)
    z, y = logits_and_targets(multilabel)
    half = z.to(dtype)
    reference = loss(half.float(), y, 0.5)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            value = loss(half, y, 0.5)
        assert value.dtype == torch.float32 and torch.isfinite(value), (name, autocast)
        torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["l2", "kl"])
def test_more_discrepancy_is_computed_in_float32(dtype, kind):
    z, y = logits_and_targets(False)
    z_gen = z.flip(0)
    prior = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
    value = more_loss(z.to(dtype), z_gen.to(dtype), y, prior, kind)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, more_loss(z.to(dtype).float(), z_gen.to(dtype).float(), y, prior, kind))
