"""CIFAR-sized ResNets: `resnet32` (the LDAM-DRW model) and `resnet34_cifar` (the WB/EWB backbone)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longtail.config import ModelConfig
from longtail.models.heads import LinearHead
from longtail.models.registry import no_pretrained, register


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _stage(block: type[nn.Module], cin: int, cout: int, stride: int, n: int) -> nn.Sequential:
    """`n` blocks; only the first changes width and resolution."""
    return nn.Sequential(block(cin, cout, stride), *[block(cout, cout, 1) for _ in range(n - 1)])


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels; no parameters."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.pad = (cout - cin) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BlockA(nn.Module):
    """Basic residual block with an option-A shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = ZeroPadShortcut(cin, cout) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet32(nn.Module):
    """3 stages x 5 blocks, widths 16/32/64, global average pooling: 64-d features."""

    lora_targets = ["*"]  # finetune.mode lora: every Conv2d of the backbone (the head trains in full)

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _stage(BlockA, 16, 16, 1, 5)
        self.layer2 = _stage(BlockA, 16, 32, 2, 5)
        self.layer3 = _stage(BlockA, 32, 64, 2, 5)
        self.feature_dim = 64
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def init_head(self, head: nn.Module) -> None:
        """LDAM-DRW initialises its linear classifier Kaiming-normal, like the convolutions."""
        if isinstance(head, LinearHead):
            nn.init.kaiming_normal_(head.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: projection (1x1 conv + BN) shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet34Cifar(nn.Module):
    """torchvision ResNet-34 ([3, 4, 6, 3] basic blocks) with a 3x3 stride-1 stem and no max-pool: 512-d."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _stage(BasicBlock, 64, 64, 1, 3)
        self.layer2 = _stage(BasicBlock, 64, 128, 2, 4)
        self.layer3 = _stage(BasicBlock, 128, 256, 2, 6)
        self.layer4 = _stage(BasicBlock, 256, 512, 2, 3)
        self.feature_dim = 512
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register("resnet32")
def resnet32(num_classes: int, in_channels: int, image_size: int, model_cfg: ModelConfig) -> ResNet32:
    """The CIFAR ResNet-32 of LDAM-DRW and WB (3 stages of 5 basic blocks), 64-d features, trained from scratch."""
    no_pretrained(model_cfg)
    return ResNet32(in_channels)


@register("resnet34_cifar")
def resnet34_cifar(num_classes: int, in_channels: int, image_size: int, model_cfg: ModelConfig) -> ResNet34Cifar:
    """ResNet-34 with a 3x3 stride-1 stem for 32-pixel images, 512-d features, trained from scratch."""
    no_pretrained(model_cfg)
    return ResNet34Cifar(in_channels)
