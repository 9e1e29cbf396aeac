"""The plain loss functions every loss Module wraps: `f(logits, targets, counts, ...)`.

`counts` are the training images per class (ce, focal and bce accept and ignore them, so every loss
has the same call signature). `weight` is an optional per-class weight (as in
`F.cross_entropy`): a weighted loss is sum_i w_{y_i} l_i / sum_i w_{y_i} for every loss here, so
weighting means the same thing whichever loss it is applied to.

Layer: building blocks. Imports the foundation (errors).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from longtail.errors import ConfigError

Counts = Union[torch.Tensor, Sequence[int]]


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (AMP) as float32; float32 and float64 ones as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _counts_on(counts: Counts, logits: torch.Tensor) -> torch.Tensor:
    # float32 even for half-precision logits: a dataset's total count overflows float16
    return torch.as_tensor(counts, dtype=torch.float32, device=logits.device)


def _weighted_mean(per_sample: torch.Tensor, targets: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    if weight is None:
        return per_sample.mean()
    w = weight.to(per_sample)[targets]
    return (w * per_sample).sum() / w.sum()


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, counts: Optional[Counts] = None, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    return F.cross_entropy(logits, targets, weight=None if weight is None else weight.to(logits))


def class_balanced_weights(counts: Counts, beta: float) -> torch.Tensor:
    """Cui et al.'s inverse effective numbers, w_k = (1 - beta) / (1 - beta^n_k), rescaled to sum to C."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    if (n < 1).any():
        counts_list = n.long().tolist()
        raise ConfigError(f"class-balanced weights need >= 1 training image in every class; counts: {counts_list}")
    w = (1.0 - beta) / (1.0 - beta**n)
    return (w * len(n) / w.sum()).float()


def class_balanced_ce(
    logits: torch.Tensor, targets: torch.Tensor, counts: Counts, beta: float = 0.9999
) -> torch.Tensor:
    return cross_entropy(logits, targets, weight=class_balanced_weights(counts, beta))


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    counts: Optional[Counts] = None,
    gamma: float = 1.0,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Lin et al.: -(1 - p_t)^gamma log p_t on the softmax probability of the target class."""
    log_pt = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    return _weighted_mean(-((1.0 - log_pt.exp()) ** gamma) * log_pt, targets, weight)


def ldam_margins(counts: Counts, max_margin: float = 0.5) -> torch.Tensor:
    """Per-class margins proportional to n_k^(-1/4), the largest (rarest class) equal to `max_margin`."""
    m = torch.as_tensor(counts, dtype=torch.float64) ** -0.25
    return (m * (max_margin / m.max())).float()


def ldam_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    counts: Counts,
    max_margin: float = 0.5,
    scale: float = 30.0,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cao et al.: CE on scale * (z - m_y e_y); the margin only lowers the target logit."""
    margins = ldam_margins(counts, max_margin).to(logits)
    z = logits - F.one_hot(targets, logits.shape[1]).to(logits) * margins[targets][:, None]
    return cross_entropy(scale * z, targets, weight=weight)


def logit_adjusted_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    counts: Counts,
    tau: float = 1.0,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Menon et al.: CE on z + tau log pi, pi the training class prior."""
    n = _counts_on(counts, logits)
    return cross_entropy(logits + tau * torch.log(n / n.sum()), targets, weight=weight)


def balanced_softmax_loss(
    logits: torch.Tensor, targets: torch.Tensor, counts: Counts, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Ren et al.: CE on z + log n."""
    return cross_entropy(logits + torch.log(_counts_on(counts, logits)), targets, weight=weight)


def bce_loss(
    logits: torch.Tensor, targets: torch.Tensor, counts: Optional[Counts] = None, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over classes and samples: on one-hot targets for class
    ids (N), on the targets themselves for multi-hot ones (N x C; `weight` is then per class)."""
    if targets.ndim == 2:
        per_entry = F.binary_cross_entropy_with_logits(logits, targets.to(logits), reduction="none")
        return (per_entry if weight is None else per_entry * weight.to(logits)).mean()
    onehot = F.one_hot(targets, logits.shape[1]).to(logits)
    per_sample = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").mean(dim=1)
    return _weighted_mean(per_sample, targets, weight)


# ----------------------------------------------------------------------------- multi-label (N x C multi-hot)
# Every multi-label loss is a mean over the N x C binary terms (DB-Loss's reduction), so their scales are
# comparable and a learning rate tuned for `bce` is a sensible start for the others.


def focal_bce_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Lin et al.'s sigmoid focal loss without the alpha balance: mean of (1 - p_t)^gamma BCE."""
    y = targets.to(logits)
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return ((1 - torch.exp(-bce)) ** gamma * bce).mean()  # exp(-bce) = p_t


def db_weights(targets: torch.Tensor, counts: torch.Tensor, alpha: float, beta: float, mu: float) -> torch.Tensor:
    """DB-Loss's re-balanced weighting (N x C): r_ik = (1 / n_k) / sum_{j in y_i} (1 / n_j), the ratio of the
    class-level to the instance-level sampling probability under class-aware sampling, smoothed to
    alpha + sigmoid(beta (r - mu)). A sample with no positive label has r = inf: weight 1 + alpha."""
    y = targets.to(counts.dtype)
    freq_inv = 1.0 / counts
    repeat_rate = (y * freq_inv).sum(dim=1, keepdim=True)
    r = freq_inv[None, :] / repeat_rate.clamp(min=torch.finfo(counts.dtype).tiny)
    return torch.sigmoid(beta * (r - mu)) + alpha


def db_bias(counts: torch.Tensor, num_images: int, kappa: float) -> torch.Tensor:
    """The negative-tolerant regularisation's class-specific bias nu_k = -kappa log(N / n_k - 1), the logit
    of the class prior times kappa (N training images, n_k of them with label k)."""
    return -kappa * torch.log(num_images / counts - 1)


def distribution_balanced_loss(
    logits: torch.Tensor, targets: torch.Tensor, counts: Counts, num_images: int, alpha: float = 0.1,
    beta: float = 10.0, mu: float = 0.3, neg_scale: float = 5.0, kappa: float = 0.05, focal_gamma: Optional[float] = None,
    focal_balance: float = 2.0,
) -> torch.Tensor:
    """Wu et al. (ECCV 2020), as their `ResampleLoss` computes it: logits shifted by nu / lambda, negative
    terms computed on lambda-scaled logits with weight / lambda (the negative-tolerant regularisation),
    every term weighted by `db_weights`; with `focal_gamma`, DB-Focal: focal_balance (1 - p_t)^gamma times it."""
    n = _counts_on(counts, logits)
    y = targets.to(logits)
    w = db_weights(targets, n, alpha, beta, mu)
    z = logits + db_bias(n, num_images, kappa) / neg_scale
    z = z * y + z * (1 - y) * neg_scale
    w = w * y + w * (1 - y) / neg_scale
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    if focal_gamma is None:
        return (w * bce).mean()
    return (focal_balance * (1 - torch.exp(-bce)) ** focal_gamma * w * bce).mean()


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0,
                    clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """Ridnik et al. (ICCV 2021): -[y (1-p)^g+ log p + (1-y) p_m^g- log(1 - p_m)], p_m = max(p - clip, 0), as a mean
    over the N x C terms (their code sums them: the same loss up to the constant N x C)."""
    y = targets.to(logits)
    p = torch.sigmoid(logits)
    p_m = (p - clip).clamp(min=0) if clip > 0 else p
    pos = y * (1 - p) ** gamma_pos * torch.log(p.clamp(min=eps))
    neg = (1 - y) * p_m ** gamma_neg * torch.log((1 - p_m).clamp(min=eps))
    return -(pos + neg).mean()
