"""Batched on-device augmentation: random crop with zero padding and horizontal flip.

The random draws come from a (CPU) generator and only the indexing runs on the batch's device, so a
seeded run augments identically on CPU and GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
