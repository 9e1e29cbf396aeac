"""ImageNet-sized ResNets (`resnet10`, `resnet50`, `resnext50_32x4d`, `resnet152`) in torchvision's layout.

Module names match torchvision's (conv1, bn1, layer1..4, downsample.0/1), so a torchvision-format state
dict loads key for key; its `fc.weight`/`fc.bias` go to the head when the shapes match.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from longtail.checkpoint import load_checkpoint
from longtail.config import ModelConfig
from longtail.errors import ConfigError
from longtail.models.registry import register
from longtail.models.resnet_cifar import BasicBlock

log = logging.getLogger(__name__)


class Bottleneck(nn.Module):
    """torchvision's bottleneck (stride on the 3x3 conv, "ResNet v1.5"); grouped 3x3 for ResNeXt."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, groups: int = 1, width_per_group: int = 64):
        super().__init__()
        width = int(planes * width_per_group / 64) * groups
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """7x7 stride-2 stem + max-pool, four stages (widths 64..512 x expansion), global average pooling."""

    def __init__(self, bottleneck: bool, layers: tuple[int, int, int, int], in_channels: int = 3,
                 groups: int = 1, width_per_group: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        expansion = Bottleneck.expansion if bottleneck else 1
        stages, cin = [], 64
        for planes, stride, n in zip((64, 128, 256, 512), (1, 2, 2, 2), layers):
            blocks = []
            for i in range(n):
                s = stride if i == 0 else 1
                if bottleneck:
                    blocks.append(Bottleneck(cin, planes, s, groups, width_per_group))
                else:
                    blocks.append(BasicBlock(cin, planes, s))
                cin = planes * expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = 512 * expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self._pretrained_fc: Optional[dict[str, torch.Tensor]] = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def load_backbone(self, path: str | Path) -> None:
        """Load a state dict with torchvision's names (docs/large_datasets.md#pretrained-backbones); keep its
        `fc.*` tensors for `init_head`."""
        try:
            state = load_checkpoint(path, kind="model file")
        except ConfigError as exc:
            raise ConfigError(f"model.pretrained: {exc}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # the common {"state_dict": ...} wrapping
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"model.pretrained: {path} is not a state dict (a mapping of names to tensors)")
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from (Distributed)DataParallel
        fc = {k: v for k, v in state.items() if k.startswith("fc.")}
        backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        # files saved before BN counted its batches lack num_batches_tracked; it only matters with momentum=None
        missing = sorted(k for k in set(own) - set(backbone) if not k.endswith("num_batches_tracked"))
        unexpected = sorted(set(backbone) - set(own))
        mismatched = [f"{k}: file {tuple(backbone[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in own if k in backbone and backbone[k].shape != own[k].shape]
        if missing or unexpected or mismatched:
            problems = []
            for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", mismatched)):
                if items:
                    shown = ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
                    problems.append(f"{title}: {shown}")
            raise ConfigError(
                f"model.pretrained: {path} does not fit this backbone ({'; '.join(problems)}); "
                "expected a state dict of the same architecture (conv1, bn1, layer1..4, fc; the key layout is in "
                "docs/large_datasets.md#pretrained-backbones)"
            )
        self.load_state_dict(backbone, strict=False)
        self._pretrained_fc = fc

    def init_head(self, head: nn.Module) -> None:
        """Copy the pretrained classifier into `head` when it is a linear head of the same shape."""
        fc, self._pretrained_fc = self._pretrained_fc, None
        if fc is None:
            return
        own = {k: v for k, v in head.state_dict().items() if k in ("weight", "bias")}
        given = {k.removeprefix("fc."): v for k, v in fc.items()}
        trainable_weight = isinstance(getattr(head, "weight", None), nn.Parameter)
        if trainable_weight and set(given) == set(own) and all(given[k].shape == own[k].shape for k in own):
            head.load_state_dict(given, strict=False)
            log.info("model.pretrained: classifier loaded from fc.* (%s)", ", ".join(sorted(own)))
            return
        shapes = {k: tuple(v.shape) for k, v in given.items()}
        log.info("model.pretrained: classifier not loaded (file fc %s vs head %s %s); the head starts fresh",
                 shapes, type(head).__name__, {k: tuple(v.shape) for k, v in own.items()})


def _build(model_cfg: ModelConfig, in_channels: int, bottleneck: bool, layers: tuple[int, int, int, int],
           groups: int = 1, width_per_group: int = 64) -> ResNet:
    model = ResNet(bottleneck, layers, in_channels, groups, width_per_group)
    if model_cfg.pretrained is not None:
        model.load_backbone(model_cfg.pretrained)
    return model


@register("resnet10")
def resnet10(num_classes: int, in_channels: int, image_size: int, model_cfg: ModelConfig) -> ResNet:
    """One basic block per stage, 512-d features (the OLTR / decoupling ImageNet-LT baseline); model.pretrained:
    a state dict file."""
    return _build(model_cfg, in_channels, False, (1, 1, 1, 1))


@register("resnet50")
def resnet50(num_classes: int, in_channels: int, image_size: int, model_cfg: ModelConfig) -> ResNet:
    """Bottleneck [3, 4, 6, 3], 2048-d features; model.pretrained: a state dict file (docs/large_datasets.md)."""
    return _build(model_cfg, in_channels, True, (3, 4, 6, 3))


@register("resnext50_32x4d")
def resnext50_32x4d(num_classes: int, in_channels: int, image_size: int, model_cfg: ModelConfig) -> ResNet:
    """ResNeXt-50 32x4d (grouped bottlenecks), 2048-d features; model.pretrained: a state dict file."""
    return _build(model_cfg, in_channels, True, (3, 4, 6, 3), groups=32, width_per_group=4)


@register("resnet152")
def resnet152(num_classes: int, in_channels: int, image_size: int, model_cfg: ModelConfig) -> ResNet:
    """Bottleneck [3, 8, 36, 3], 2048-d features (Places-LT's backbone); model.pretrained: a state dict file."""
    return _build(model_cfg, in_channels, True, (3, 8, 36, 3))
