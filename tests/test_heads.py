import pytest
import torch
import torch.nn.functional as F

from longtail.config import ModelConfig
from longtail.errors import ConfigError
from longtail.models.heads import CosineHead, ETFHead, LinearHead, build_head, scale_head


@pytest.mark.parametrize("d,k", [(64, 10), (99, 100), (9, 10), (512, 100)])
def test_etf_geometry(d, k):
    w = ETFHead(d, k, seed=3).weight
    assert w.shape == (k, d)
    assert torch.allclose(w.norm(dim=1), torch.ones(k), atol=1e-5)
    cos = w @ w.t()
    off = cos[~torch.eye(k, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / (k - 1)), atol=1e-5)


def test_etf_weight_is_a_seeded_buffer_and_bias_trains():
    head = ETFHead(16, 5, seed=1)
    assert "weight" in head.state_dict() and "weight" not in dict(head.named_parameters())
    assert [n for n, p in head.named_parameters() if p.requires_grad] == ["bias"]
    assert torch.equal(head.weight, ETFHead(16, 5, seed=1).weight)
    assert not torch.allclose(head.weight, ETFHead(16, 5, seed=2).weight)
    head(torch.randn(4, 16)).sum().backward()
    assert head.bias.grad is not None


def test_etf_needs_k_minus_1_dims():
    with pytest.raises(ConfigError, match=r">= 99.*resnet34_cifar"):
        ETFHead(64, 100)
    with pytest.raises(ConfigError, match="resnet34_cifar"):
        build_head(ModelConfig(head="etf"), 64, 100)


def test_cosine_head_is_scaled_cosine():
    head = CosineHead(8, 4, scale=16.0)
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(4), atol=1e-5)  # LDAM-DRW's renormed init
    x = torch.randn(3, 8)
    expected = 16.0 * F.cosine_similarity(x[:, None, :], head.weight[None, :, :], dim=2)
    out = head(x)
    assert torch.allclose(out, expected, atol=1e-5)
    assert out.abs().max() <= 16.0 + 1e-4


def test_build_head_picks_the_configured_head():
    lin = build_head(ModelConfig(head="linear", head_bias=False), 8, 3)
    assert isinstance(lin, LinearHead) and lin.bias is None and lin.weight.shape == (3, 8)
    assert isinstance(build_head(ModelConfig(head="cosine", head_scale=30.0), 8, 3), CosineHead)
    etf = build_head(ModelConfig(head="etf", etf_seed=4), 8, 3)
    assert isinstance(etf, ETFHead) and torch.equal(etf.weight, ETFHead(8, 3, seed=4).weight)
    with pytest.raises(ConfigError, match="head_scale"):
        build_head(ModelConfig(head="linear", head_scale=2.0), 8, 3)


def test_scale_head_multiplies_the_logits_of_every_head_kind_in_place():
    x = torch.randn(5, 8)
    for head in (CosineHead(8, 4), LinearHead(8, 4), LinearHead(8, 4, bias=False), ETFHead(8, 4, seed=2)):
        if isinstance(head, ETFHead):
            head.bias.data.normal_()
        before = head(x).detach()
        assert scale_head(head, 30.0) is head
        assert torch.allclose(head(x), 30.0 * before, rtol=1e-5, atol=1e-5), type(head).__name__
    cos = scale_head(CosineHead(8, 4, scale=2.0), 30.0)
    assert cos.scale == 60.0 and torch.allclose(cos.weight.norm(dim=1), torch.ones(4), atol=1e-5)


def test_scale_head_by_1_is_a_no_op_for_any_head_and_refuses_others():
    class Custom(torch.nn.Module):
        def forward(self, x):
            return x

    custom = Custom()
    assert scale_head(custom, 1.0) is custom  # losses without a scale never touch a user's head
    with pytest.raises(TypeError, match="Custom"):
        scale_head(custom, 30.0)
    with pytest.raises(ValueError, match="> 0"):
        scale_head(LinearHead(8, 4), 0.0)
