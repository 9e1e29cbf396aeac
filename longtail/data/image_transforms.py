"""Pillow decoding and the standard ImageNet-style transforms, written with torch tensor ops.

Train (`augment: crop_flip`): random-resized crop (scale 0.08-1, ratio 3/4-4/3) to image_size, horizontal
flip, colour jitter (brightness/contrast/saturation 0.4, random order), normalise; `resized_crop_flip` is the
same without the jitter (LIFT's train transform). Test: resize the shorter side to 256/224 x image_size,
centre crop, normalise. `augment: flip` is the test geometry plus a flip. `eval.tta: lift_crops` tests on
LIFT's five crops instead: the shorter side resized to image_size + 24, then `five_crops`.
Training then applies `data.policy` and `data.cutout` (`longtail.data.policies`, the ops the in-memory
datasets use), on the image in [0, 1] before normalisation.
Each sample's randomness comes from its own generator seeded by (seed, epoch, sample index), so a batch
is the same whatever the number of workers or processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from longtail.data.policies import ImagePolicy, gray

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# LIFT's test-time ensembling (`tte`, tte_mode fivecrop): Resize(resolution + expand), FiveCrop(resolution),
# the crops' logits averaged (github.com/shijxcs/LIFT, trainer.py build_data_loader and test; utils/config.py
# expand = 24).
LIFT_EXPAND = 24


def decode_image(path: str | Path, mode: str = "RGB") -> torch.Tensor:
    """The image as uint8 C x H x W in Pillow mode `mode` (RGB: 3 channels, L: 1), a channels-last view,
    which resizes fastest."""
    with Image.open(path) as img:
        array = np.asarray(img.convert(mode)).copy()
    if array.ndim == 2:  # single-channel modes come back as H x W
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1)


def eval_resize(size: int) -> int:
    """The shorter side an evaluation image is resized to before its centre crop to `size` (256 for 224)."""
    return size * 256 // 224


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """An independent generator for one sample in one epoch."""
    high, low = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(high) << 32 | int(low))


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def random_resized_crop_box(height: int, width: int, generator: torch.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering `scale` of the area with aspect `ratio` (10 tries, then centre)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    # no try fitted: the whole image, cropped to the nearest allowed aspect ratio
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 3 x H x W image (as Pillow's BILINEAR does)."""
    return F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True,
                         align_corners=False)[0]


def resize_shorter(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so that the shorter side is `size`, keeping the aspect ratio."""
    h, w = image.shape[-2:]
    if h <= w:
        return resize(image, size, int(size * w / h))
    return resize(image, int(size * h / w), size)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The centre size x size window of a C x H x W image or an N x C x H x W batch."""
    h, w = image.shape[-2:]
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    return image[..., top:top + size, left:left + size]


def five_crops(image: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's FiveCrop: the four corner and the centre size x size windows, in that order (top-left,
    top-right, bottom-left, bottom-right, centre), stacked before the channel axis: C x H x W -> 5 x C x S x S,
    N x C x H x W -> N x 5 x C x S x S."""
    h, w = image.shape[-2:]
    corners = [image[..., :size, :size], image[..., :size, w - size:], image[..., h - size:, :size],
               image[..., h - size:, w - size:]]
    return torch.stack([*corners, center_crop(image, size)], dim=-4)


def color_jitter(x: torch.Tensor, generator: torch.Generator, strength: float = 0.4) -> torch.Tensor:
    """Brightness, contrast and saturation, each scaled by a factor in [1-s, 1+s], in random order."""
    factors = [_uniform(generator, max(0.0, 1 - strength), 1 + strength) for _ in range(3)]
    for op in torch.randperm(3, generator=generator).tolist():
        f = factors[op]
        if op == 0:
            x = x * f
        elif op == 1:
            x = f * x + (1 - f) * gray(x[None])[0].mean()
        else:
            x = f * x + (1 - f) * gray(x[None])[0]
        x = x.clamp(0, 1)
    return x


@dataclass(frozen=True)
class ImageTransform:
    """uint8 3 x H x W image -> normalised float 3 x S x S (picklable, so DataLoader workers get a copy)."""

    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    augment: str = "none"  # crop_flip | resized_crop_flip | flip | none
    tta: str = "none"  # lift_crops: the evaluation transform gives LIFT's five crops (5 x 3 x S x S)
    policy: ImagePolicy = ImagePolicy()

    @property
    def random(self) -> bool:
        """Whether the transform draws anything (and needs the sample's generator)."""
        return self.augment != "none" or self.policy.active

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        size = self.image_size
        if self.augment in ("crop_flip", "resized_crop_flip"):
            top, left, h, w = random_resized_crop_box(image.shape[1], image.shape[2], generator)
            image = resize(image[:, top:top + h, left:left + w], size, size)
        elif self.tta == "lift_crops":
            image = five_crops(resize_shorter(image, size + LIFT_EXPAND), size)
        else:
            image = center_crop(resize_shorter(image, eval_resize(size)), size)
        x = image.float().div_(255)
        if self.augment != "none" and torch.rand((), generator=generator).item() < 0.5:
            x = x.flip(2)
        if self.augment == "crop_flip":
            x = color_jitter(x, generator)
        if self.policy.active:
            x = self.policy(x[None], generator)[0]
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return ((x - mean) / std).contiguous()
