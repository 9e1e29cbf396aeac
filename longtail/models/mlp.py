"""The EWB paper's BN-MLP for small inputs (Fashion-MNIST-LT): fast enough on CPU for full schedules."""
from __future__ import annotations

import torch
from torch import nn

from longtail.config import ModelConfig
from longtail.models.registry import no_pretrained, register


class MLP(nn.Module):
    """Flattened input -> 3 x [Linear without bias -> BatchNorm1d -> ReLU]; features are the last ReLU's output."""

    lora_targets = ["*"]  # finetune.mode lora: every Linear of the backbone (the head trains in full)

    def __init__(self, in_features: int, width: int = 1024):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            # no bias: the BatchNorm right after it has its own shift
            layers += [nn.Linear(in_features if i == 0 else width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.feature_dim = width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register("mlp")
def mlp(num_classes: int, in_channels: int, image_size: int, model_cfg: ModelConfig) -> MLP:
    """The EWB paper's BN-MLP (3 layers of model.width units) for small inputs such as Fashion-MNIST."""
    no_pretrained(model_cfg)
    return MLP(in_channels * image_size * image_size, model_cfg.width)
