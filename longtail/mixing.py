"""Batch mixing (mixup, CutMix) and the targets that carry it to the loss.

A mixed batch's targets are `MixedTargets(a, b, lam)`: every image is lam of its own and 1 - lam of its
partner's (the batch permuted by a seeded randperm). Losses handle them in one place: each loss class
in `longtail.losses` computes lam L(logits, a) + (1 - lam) L(logits, b) (`MixedTargets.combine`), which
keeps LDAM's margins, the class-balanced / DRW weights and LA / BS's priors per target; MORE weights a
sample by lam pi_a + (1 - lam) pi_b the same way. For multi-hot targets this is BCE on the mixed targets
lam t_a + (1 - lam) t_b (BCE is linear in the target), and the same convex combination for the others.

Draws, all from the engine's augmentation generator (so a resumed run mixes exactly as the original):
- mixup (Zhang et al. 2018): lam ~ Beta(alpha, alpha); x = lam x + (1 - lam) x[perm];
- CutMix (Yun et al. 2019): lam ~ Beta(alpha, alpha), one box per batch of side ratio sqrt(1 - lam), its
  centre uniform over the pixels, clipped at the borders; x[perm]'s box is pasted, and lam is corrected to
  1 - box area / image area (timm's `correct_lam`);
- both alphas > 0: CutMix or mixup, each with probability 1/2 per batch (timm's switch_prob 0.5).
torch's Beta and Gamma samplers take no generator (they draw from the global one), so the one lam per batch
comes from a NumPy generator seeded by a draw from the augmentation generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch


class MixedTargets(NamedTuple):
    a: torch.Tensor  # each image's own targets
    b: torch.Tensor  # its partner's
    lam: torch.Tensor  # 0-dim, on the targets' device: the weight of `a`

    def combine(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """lam fn(a) + (1 - lam) fn(b): a loss, or per-sample weights, of the mixed batch."""
        return self.lam * fn(self.a) + (1 - self.lam) * fn(self.b)


def beta(alpha: float, generator: torch.Generator) -> float:
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of CutMix's box for a drawn lam (timm's rand_bbox)."""
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, (), generator=generator))
    cx = int(torch.randint(width, (), generator=generator))
    return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height), max(cx - cut_w // 2, 0),
            min(cx + cut_w // 2, width))


@dataclass(frozen=True)
class Mixer:
    """`data.mixup_alpha` / `data.cutmix_alpha` (0: off) on a normalised training batch."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    @classmethod
    def from_config(cls, data_cfg) -> "Mixer":
        return cls(data_cfg.mixup_alpha, data_cfg.cutmix_alpha)

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, MixedTargets]:
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha == 0 or bool(torch.rand((), generator=generator) < 0.5))
        lam = beta(self.cutmix_alpha if use_cutmix else self.mixup_alpha, generator)
        perm = torch.randperm(len(x), generator=generator)
        partner = x[perm.to(x.device)]
        if use_cutmix:
            h, w = x.shape[-2:]
            top, bottom, left, right = cutmix_box(h, w, lam, generator)
            x = x.clone()
            x[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (h * w)
        else:
            x = lam * x + (1 - lam) * partner
        return x, MixedTargets(y, y[perm.to(y.device)], torch.tensor(lam, device=y.device))
