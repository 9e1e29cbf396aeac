"""Base losses every method composes with: plain functions `f(logits, targets, counts, ...)`.

`counts` are the training images per class (ce, focal and bce accept and ignore them, so every loss
has the same call signature). `weight` is an optional per-class weight (as in
`F.cross_entropy`): a weighted loss is sum_i w_{y_i} l_i / sum_i w_{y_i} for every loss here, so
weighting means the same thing whichever loss it is applied to. `build_loss` turns the `loss`
config section into the `LossFn(logits, targets, progress)` the methods call.

A loss may multiply the model's logits by a constant before its softmax (LDAM's scale, with the model
ending in a scale-1 cosine head). `logit_scale(loss_cfg)` names that constant; the engine folds it into
the head of the exported model (`longtail.models.scale_head`), so `model.pt` gives the logits the loss
saw (margins aside: they are training-only) and its ECE and NLL are those of the trained softmax.

Both loss classes accept the `MixedTargets` of a mixup / CutMix batch (`longtail.mixing`) and return
lam L(logits, a) + (1 - lam) L(logits, b): every loss, its margins and class weights, per target.
Both compute in float32 at least, whatever the logits' dtype: under float16 autocast a sigmoid below about -17 is 0
and a 1e-8 clamp is 0 too, so ASL's log would be -inf (NaN once multiplied by a zero target).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from longtail.config import LossConfig, resolve_epochs
from longtail.errors import ConfigError
from longtail.mixing import MixedTargets

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


LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
NAMES = ("ce", "cb", "focal", "ldam", "la", "bs", "bce")  # on class ids
MULTILABEL_NAMES = ("bce", "focal_bce", "cb_bce", "dbl", "db_focal", "asl")  # on multi-hot targets


def logit_scale(loss_cfg: LossConfig) -> float:
    """The constant the configured loss multiplies the model's logits by at inference time (its margins
    and class weights aside): `ldam_scale` for `ldam`, 1 for every other loss. The exported model's head
    carries it, so that the exported logits are the ones whose softmax the loss trained."""
    return float(loss_cfg.ldam_scale) if loss_cfg.name == "ldam" else 1.0


class ConfiguredLoss:
    """`loss(logits, targets, progress)`: the configured base loss. Class-balanced weights apply
    throughout for `cb`, and from `drw_frac` of training on (deferred re-weighting) when
    `loss.drw_start` is set."""

    def __init__(self, loss_cfg: LossConfig, class_counts: Sequence[int], epochs: int):
        if loss_cfg.name not in NAMES:
            raise ConfigError(f"loss.name: unknown loss {loss_cfg.name!r}; choose one of: {', '.join(NAMES)}")
        if not 0.0 <= loss_cfg.beta < 1.0:
            raise ConfigError(f"loss.beta: must be in [0, 1), got {loss_cfg.beta}")
        if loss_cfg.gamma < 0:
            raise ConfigError(f"loss.gamma: must be >= 0, got {loss_cfg.gamma}")
        if loss_cfg.name == "ldam" and not loss_cfg.ldam_scale > 0:
            raise ConfigError(f"loss.ldam_scale: must be > 0, got {loss_cfg.ldam_scale}")
        self.cfg = loss_cfg
        self.counts = torch.as_tensor(class_counts, dtype=torch.float32)
        self.drw_epoch: Optional[int] = None  # the resolved DRW start, for the record
        self.weights_from: Optional[float] = None  # progress from which the class-balanced weights apply
        if loss_cfg.name == "cb":
            if loss_cfg.drw_start is not None:
                raise ConfigError("loss.drw_start: the cb loss is class-balanced from the start; "
                                  "set loss.drw_start: null or use it with ce, focal, ldam, la, bs or bce")
            self.weights_from = 0.0
        elif loss_cfg.drw_start is not None:
            if loss_cfg.drw_start < 0:
                raise ConfigError(f"loss.drw_start: must be >= 0 (a fraction of training below 1, else an epoch), "
                                  f"got {loss_cfg.drw_start}")
            self.drw_epoch = resolve_epochs(loss_cfg.drw_start, epochs)
            self.weights_from = self.drw_epoch / epochs
        self.class_weights = None
        if self.weights_from is not None:
            self.class_weights = class_balanced_weights(class_counts, loss_cfg.beta)

    @property
    def logit_scale(self) -> float:
        """The inference-time scale this loss applies to the logits (`logit_scale(loss_cfg)`)."""
        return logit_scale(self.cfg)

    def weight(self, progress: float) -> Optional[torch.Tensor]:
        """The per-class weights in force at `progress` (fraction of training done), or None."""
        if self.weights_from is not None and progress >= self.weights_from:
            return self.class_weights
        return None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, progress: float) -> torch.Tensor:
        logits = at_least_float32(logits)
        if isinstance(targets, MixedTargets):
            return targets.combine(lambda t: self(logits, t, progress))
        if self.counts.device != logits.device:
            self.counts = self.counts.to(logits.device)
            if self.class_weights is not None:
                self.class_weights = self.class_weights.to(logits.device)
        c, n, w = self.cfg, self.counts, self.weight(progress)
        if c.name == "focal":
            return focal_loss(logits, targets, n, gamma=c.gamma, weight=w)
        if c.name == "ldam":
            return ldam_loss(logits, targets, n, max_margin=c.ldam_max_margin, scale=c.ldam_scale, weight=w)
        if c.name == "la":
            return logit_adjusted_loss(logits, targets, n, tau=c.tau, weight=w)
        if c.name == "bs":
            return balanced_softmax_loss(logits, targets, n, weight=w)
        if c.name == "bce":
            return bce_loss(logits, targets, n, weight=w)
        return cross_entropy(logits, targets, n, weight=w)  # ce, and cb with its weights


class MultiLabelLoss:
    """`loss(logits, multi_hot, progress)`: the configured multi-label loss (`longtail.task` picks it)."""

    def __init__(self, loss_cfg: LossConfig, class_counts: Sequence[int], num_images: int):
        if loss_cfg.name not in MULTILABEL_NAMES:
            raise ConfigError(f"loss.name: unknown multi-label loss {loss_cfg.name!r}; choose one of: "
                              f"{', '.join(MULTILABEL_NAMES)}")
        counts = torch.as_tensor(class_counts, dtype=torch.float32)
        if loss_cfg.name in ("cb_bce", "dbl", "db_focal") and not ((counts >= 1) & (counts < num_images)).all():
            raise ConfigError(f"loss.name: {loss_cfg.name} needs every class on at least one training image and "
                              f"off at least one (its weights use n_k and N - n_k); counts {counts.long().tolist()} "
                              f"of {num_images} images")
        self.cfg, self.counts, self.num_images = loss_cfg, counts, num_images
        self.class_weights = class_balanced_weights(class_counts, loss_cfg.cb_bce_beta) if loss_cfg.name == "cb_bce" \
            else None
        self.logit_scale = 1.0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, progress: float) -> torch.Tensor:
        logits = at_least_float32(logits)
        if isinstance(targets, MixedTargets):
            return targets.combine(lambda t: self(logits, t, progress))
        c = self.cfg
        if c.name == "bce":
            return bce_loss(logits, targets)
        if c.name == "cb_bce":
            return bce_loss(logits, targets, weight=self.class_weights)
        if c.name == "focal_bce":
            return focal_bce_loss(logits, targets, c.focal_bce_gamma)
        if c.name == "asl":
            return asymmetric_loss(logits, targets, c.asl_gamma_neg, c.asl_gamma_pos, c.asl_clip)
        return distribution_balanced_loss(
            logits, targets, self.counts, self.num_images, c.db_alpha, c.db_beta, c.db_mu, c.db_neg_scale, c.db_kappa,
            focal_gamma=c.db_focal_gamma if c.name == "db_focal" else None, focal_balance=c.db_focal_balance)


def build_loss(loss_cfg: LossConfig, class_counts: Sequence[int], epochs: int) -> LossFn:
    """The configured loss as `LossFn(logits, targets, progress)`."""
    if epochs < 1:
        raise ConfigError(f"train.epochs: must be >= 1, got {epochs}")
    return ConfiguredLoss(loss_cfg, class_counts, epochs)
