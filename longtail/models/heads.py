"""Classifier heads: features (N, d) -> logits (N, K). Every head keeps its matrix as `weight` (K x d)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longtail.config import ModelConfig
from longtail.errors import ConfigError


class LinearHead(nn.Linear):
    """A plain linear classifier (an `nn.Linear`, so layer-matching code treats it as one)."""

    def __init__(self, d: int, num_classes: int, bias: bool = True):
        super().__init__(d, num_classes, bias=bias)


class CosineHead(nn.Module):
    """Cosine similarity of normalised features and class vectors, times `scale` (LDAM-DRW's NormedLinear)."""

    def __init__(self, d: int, num_classes: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, d))
        with torch.no_grad():
            # uniform(-1, 1), then every class vector rescaled to unit norm, as the reference code does
            self.weight.uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, scale={self.scale}"


def simplex_etf(d: int, num_classes: int, seed: int) -> torch.Tensor:
    """A K x d simplex ETF: unit rows with pairwise cosine -1/(K-1), randomly rotated by `seed`.

    The spec's W = (U sqrt(K/(K-1)) (I - 11^T/K))^T only uses U on the (K-1)-dim complement of 1, so
    U = V B^T with V (d x (K-1), orthonormal columns from the QR of a seeded Gaussian) and B an
    orthonormal basis of that complement gives the same frame and needs only d >= K-1.
    """
    k = num_classes
    if k < 2:
        raise ConfigError(f"model.head: etf needs at least 2 classes, got {k}")
    if d < k - 1:
        raise ConfigError(
            f"model.head: etf for {k} classes needs features with >= {k - 1} dims (a simplex ETF spans K-1 "
            f"dims), but the backbone gives {d}; use a wider backbone (e.g. resnet32 has 64 dims: use "
            f"resnet34_cifar with 512; ImageNet-LT needs >= 999, e.g. resnet50 with 2048) or model.head: linear"
        )
    g = torch.Generator().manual_seed(seed)
    v, _ = torch.linalg.qr(torch.randn(d, k - 1, generator=g, dtype=torch.float64))
    centering = torch.eye(k, dtype=torch.float64) - 1.0 / k
    b, _ = torch.linalg.qr(centering[:, : k - 1])  # the first K-1 centred basis vectors span the complement
    return (math.sqrt(k / (k - 1)) * b @ v.t()).float()


class ETFHead(nn.Module):
    """A fixed simplex-ETF classifier: `weight` is a buffer (saved, never trained); `bias` trains."""

    def __init__(self, d: int, num_classes: int, seed: int = 0, bias: bool = True):
        super().__init__()
        self.register_buffer("weight", simplex_etf(d, num_classes, seed))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, bias={self.bias is not None}"


def scale_head(head: nn.Module, factor: float) -> nn.Module:
    """Multiply the logits of `head` by `factor`, in place (returns `head`): the scale of a cosine head,
    the weight and bias of a linear or ETF head. The engine folds the loss's logit scale (LDAM's 30) into
    the exported head with it, so that the exported model gives the logits the loss saw. A factor of 1
    leaves any head untouched."""
    factor = float(factor)
    if factor == 1.0:
        return head
    if not factor > 0:
        raise ValueError(f"scale_head: the factor must be > 0 (it must not reorder the logits), got {factor}")
    if isinstance(head, CosineHead):
        head.scale = head.scale * factor
    elif isinstance(head, (nn.Linear, ETFHead)):
        with torch.no_grad():
            head.weight.mul_(factor)  # an ETF head's fixed frame is a buffer: saved in model.pt as scaled
            if head.bias is not None:
                head.bias.mul_(factor)
    else:
        raise TypeError(f"scale_head: cannot scale a {type(head).__name__} head; fold it into a linear, cosine "
                        "or etf head first")
    return head


def build_head(model_cfg: ModelConfig, d: int, num_classes: int) -> nn.Module:
    """The head named by `model.head`; `head_scale` is the cosine head's scale (cosine heads have no bias)."""
    if model_cfg.head != "cosine" and model_cfg.head_scale != 1.0:
        raise ConfigError(
            f"model.head_scale: only the cosine head takes a scale, but model.head is {model_cfg.head!r}; "
            "set model.head_scale: 1.0 or model.head: cosine"
        )
    if model_cfg.head == "linear":
        return LinearHead(d, num_classes, bias=model_cfg.head_bias)
    if model_cfg.head == "cosine":
        return CosineHead(d, num_classes, scale=model_cfg.head_scale)
    if model_cfg.head == "etf":
        return ETFHead(d, num_classes, seed=model_cfg.etf_seed, bias=model_cfg.head_bias)
    raise ConfigError(f"model.head: unknown head {model_cfg.head!r}; choose one of: linear, cosine, etf")
