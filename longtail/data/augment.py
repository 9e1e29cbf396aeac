"""Batched on-device augmentation: random crop with zero padding and horizontal flip; the random-resized crop
and the resize to a 224-pixel model's input size (`to_model_size`).

The random draws come from a (CPU) generator and only the indexing runs on the batch's device, so a
seeded run augments identically on CPU and GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from longtail.data.image_transforms import LIFT_EXPAND, center_crop, eval_resize, five_crops, random_resized_crop_box


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4,
              crop: bool = True, flip: bool = True) -> torch.Tensor:
    """Per image: a random H x W window of the zero-padded image (torchvision's RandomCrop(size,
    padding)) and a horizontal flip with probability 1/2. x: N x C x H x W float."""
    n, c, h, w = x.shape
    pad = padding if crop else 0
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flipped = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.where(flipped[:, None], torch.arange(w - 1, -1, -1), torch.arange(w))
    rows, cols = rows.to(x.device), cols.to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    # Two gathers select each image's rows, then its (possibly reversed) columns: no loop over images.
    x = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def resized_crop_flip(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image: a random-resized crop box (scale 0.08-1, ratio 3/4-4/3, torchvision's RandomResizedCrop)
    chosen at the image's own size, resized bilinearly to size x size, and mirrored with probability 1/2 —
    the whole batch in one grid_sample on x's device. N x C x H x W float -> N x C x size x size.

    Each image equals F.interpolate(crop, size, mode="bilinear", align_corners=False) of its crop, flipped or
    not: the sample positions are interpolate's, clamped to the crop as interpolate clamps them. No
    antialiasing, which only matters when a crop is larger than `size` (never when upsampling 32-pixel
    CIFAR images to a 224-pixel model)."""
    n, _, h, w = x.shape
    boxes = torch.tensor([random_resized_crop_box(h, w, generator) for _ in range(n)], dtype=torch.float64)
    flipped = torch.rand(n, generator=generator) < 0.5
    top, left, bh, bw = (v[:, None] for v in boxes.unbind(1))
    out = torch.arange(size, dtype=torch.float64) + 0.5
    ys = top + ((out * bh / size - 0.5).clamp(min=0)).minimum(bh - 1)
    xs = left + ((out * bw / size - 0.5).clamp(min=0)).minimum(bw - 1)
    xs = torch.where(flipped[:, None], xs.flip(1), xs)
    # pixel coordinates -> grid_sample's [-1, 1] (align_corners=False: -1 and 1 are the outer pixel edges)
    gy, gx = (2 * ys + 1) / h - 1, (2 * xs + 1) / w - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(x, grid.to(x.device, x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a batch of square images to size x size, antialiased when downsizing (as Pillow)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])


def resize_shorter_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a float batch so that the shorter side is `size` (the aspect kept), antialiased when
    downsizing (as Pillow); for square images the same as `resize_batch`."""
    h, w = x.shape[-2:]
    out = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    return F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=size < min(h, w))


def eval_geometry(x: torch.Tensor, size: int, tta: str = "none") -> torch.Tensor:
    """The evaluation geometry of images resized to a model's size, on float N x C x h x w in [0, 1]: the shorter
    side resized to 256/224 x size and the centre crop; `tta: lift_crops`: resized to size + 24 and LIFT's five
    crops (N x 5 x C x size x size). `eval` (in-memory data) and `predict` (model.yaml's transform `resize_on:
    float`) both call it, so predict gives eval's probabilities."""
    if tta == "lift_crops":
        return five_crops(resize_shorter_batch(x, size + LIFT_EXPAND), size)
    return center_crop(resize_shorter_batch(x, eval_resize(size)), size)


def to_model_size(x: torch.Tensor, size: int | None, augment: str, train: bool,
                  generator: torch.Generator | None = None, tta: str = "none") -> torch.Tensor:
    """The geometric first step of in-memory input preparation (float N x C x h x w on the device, before any
    policy, normalisation or mixing), for a model that takes `size`-pixel images (None: the images' own).

    Training, in LIFT's order for CIFAR-100-LT (github.com/shijxcs/LIFT, trainer.py: RandomResizedCrop(224) and
    RandomHorizontalFlip on the 32-pixel image, no padded crop): `resized_crop_flip` chooses the crop at h
    pixels and resizes it to `size`, then flips; `crop_flip` / `flip` pad-crop and/or flip at h pixels first,
    then resize. Evaluation with a resize: the test geometry of LIFT and of the list-file datasets, a resize
    to 256/224 x size and the centre crop; `tta: lift_crops` resizes to size + 24 and gives the five crops
    (N x 5 x C x size x size)."""
    own = x.shape[-1]
    if train:
        if augment == "resized_crop_flip":
            return resized_crop_flip(x, size or own, generator)
        if augment != "none":
            x = crop_flip(x, generator, crop=augment == "crop_flip")
        return x if size is None else resize_batch(x, size)
    return x if size is None else eval_geometry(x, size, tta)
