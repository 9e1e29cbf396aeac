"""Every loss as an `nn.Module` built from class counts: `loss = LDAMLoss(counts)`, then `loss(logits, targets)`.

Each Module wraps its plain function (`longtail.losses.functions`) with the hyper-parameters it was built
with, whose defaults are the `loss` section's (`config_keys` names the key each argument comes from). The
engine trains with these same Modules (`longtail.losses.configured` builds them from the config).

What they all share (`CountsLoss.forward`): logits are computed in float32 at least, whatever their dtype
(under float16 autocast a sigmoid below about -17 is 0 and a 1e-8 clamp is 0 too, so ASL's log would be -inf);
the `MixedTargets` of a mixup / CutMix batch (`longtail.mixing`) give lam L(logits, a) + (1 - lam) L(logits, b),
margins and class weights per target; the counts (and class weights) follow the logits to their device.

The schedule: `set_epoch(epoch)` tells a loss which epoch (from 0) is about to train, as torch's
`DistributedSampler.set_epoch` does. Only deferred re-weighting (DRW, Cao et al., NeurIPS 2019) reads it: a
class-id loss built with `drw_start=E` weights each sample by Cui et al.'s class-balanced weight of its class
(`class_balanced_weights(counts, beta)`) from epoch E on. `ClassBalancedLoss` has those weights throughout.

Layer: building blocks. Imports the foundation and `mixing`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from longtail.losses.functions import (Counts, asymmetric_loss, at_least_float32, balanced_softmax_loss, bce_loss,
                                       class_balanced_weights, cross_entropy, distribution_balanced_loss,
                                       focal_bce_loss, focal_loss, ldam_loss, logit_adjusted_loss)
from longtail.mixing import MixedTargets


# Each hyper-parameter's range, by the `loss` config key it is read from: a Module checks its arguments by it
# (`CountsLoss.check`) and `longtail.losses.check_loss_config` the config's keys, so each rule is written once.
RANGES: dict[str, str] = {
    "tau": ">= 0", "beta": "[0, 1)", "gamma": ">= 0", "ldam_max_margin": ">= 0", "ldam_scale": "> 0",
    "focal_bce_gamma": ">= 0", "cb_bce_beta": "[0, 1)",
    "db_alpha": ">= 0", "db_beta": "> 0", "db_neg_scale": "> 0", "db_kappa": ">= 0", "db_focal_gamma": ">= 0",
    "db_focal_balance": "> 0", "asl_gamma_neg": ">= 0", "asl_gamma_pos": ">= 0", "asl_clip": "[0, 1)",
}


def out_of_range(key: str, value: float) -> Optional[str]:
    """What is wrong with `value` for the `loss` key `key` (`RANGES`), or None."""
    rule = RANGES.get(key)
    if rule is None or {">= 0": value >= 0, "> 0": value > 0, "[0, 1)": 0 <= value < 1}[rule]:
        return None
    return f"must be in {rule}" if rule.startswith("[") else f"must be {rule}"


class CountsLoss(nn.Module):
    """A loss built from the training images per class: `loss(logits, targets)` -> a scalar tensor."""

    config_keys: dict[str, str] = {}  # constructor argument -> the `loss` config key it is read from

    def check(self, **arguments: float) -> None:
        """Refuse an argument outside its range (`RANGES`), naming it."""
        for arg, value in arguments.items():
            problem = out_of_range(self.config_keys[arg], value)
            if problem:
                raise ValueError(f"{type(self).__name__}({arg}={value}): {problem}")

    def __init__(self, class_counts: Counts):
        super().__init__()
        # Not persistent: a loss held inside a model adds nothing to its state dict.
        self.register_buffer("counts", torch.as_tensor(class_counts, dtype=torch.float32), persistent=False)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch about to train (from 0), for a loss with a schedule (DRW); call it at the start of each."""
        self.epoch = epoch

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = at_least_float32(logits)
        if isinstance(targets, MixedTargets):
            return targets.combine(lambda t: self(logits, t))
        if self.counts.device != logits.device:
            self.to(logits.device)
        return self.compute(logits, targets)

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ClassIdLoss(CountsLoss):
    """A loss on class ids (N), with deferred re-weighting from epoch `drw_start` when it is given."""

    config_keys = {"beta": "beta"}

    def __init__(self, class_counts: Counts, drw_start: Optional[int] = None, beta: float = 0.9999):
        super().__init__(class_counts)
        if drw_start is not None and drw_start < 0:
            raise ValueError(f"drw_start: an epoch >= 0, got {drw_start}")
        self.check(beta=beta)
        self.drw_start = drw_start
        weights = class_balanced_weights(class_counts, beta) if drw_start is not None else None
        self.register_buffer("class_weights", weights, persistent=False)

    @property
    def weight(self) -> Optional[torch.Tensor]:
        """The per-class weights in force in the current epoch (`set_epoch`), or None."""
        if self.drw_start is not None and self.epoch >= self.drw_start:
            return self.class_weights
        return None


class CrossEntropyLoss(ClassIdLoss):
    """`ce`: softmax cross-entropy."""

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets, self.counts, weight=self.weight)


class ClassBalancedLoss(CrossEntropyLoss):
    """`cb`: cross-entropy weighted by Cui et al.'s class-balanced weights (CVPR 2019) throughout."""

    def __init__(self, class_counts: Counts, beta: float = 0.9999):
        super().__init__(class_counts, drw_start=0, beta=beta)


class FocalLoss(ClassIdLoss):
    """`focal`: Lin et al.'s focal loss on the softmax probability of the target class."""

    config_keys = {**ClassIdLoss.config_keys, "gamma": "gamma"}

    def __init__(self, class_counts: Counts, gamma: float = 1.0, drw_start: Optional[int] = None,
                 beta: float = 0.9999):
        super().__init__(class_counts, drw_start, beta)
        self.check(gamma=gamma)
        self.gamma = gamma

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, self.counts, gamma=self.gamma, weight=self.weight)


class LDAMLoss(ClassIdLoss):
    """`ldam`: Cao et al.'s label-distribution-aware margin loss; with `drw_start`, LDAM-DRW."""

    config_keys = {**ClassIdLoss.config_keys, "max_margin": "ldam_max_margin", "scale": "ldam_scale"}

    def __init__(self, class_counts: Counts, max_margin: float = 0.5, scale: float = 30.0,
                 drw_start: Optional[int] = None, beta: float = 0.9999):
        super().__init__(class_counts, drw_start, beta)
        self.check(max_margin=max_margin, scale=scale)
        self.max_margin, self.scale = max_margin, scale

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ldam_loss(logits, targets, self.counts, max_margin=self.max_margin, scale=self.scale,
                         weight=self.weight)


class LogitAdjustedLoss(ClassIdLoss):
    """`la`: Menon et al.'s logit-adjusted cross-entropy."""

    config_keys = {**ClassIdLoss.config_keys, "tau": "tau"}

    def __init__(self, class_counts: Counts, tau: float = 1.0, drw_start: Optional[int] = None,
                 beta: float = 0.9999):
        super().__init__(class_counts, drw_start, beta)
        self.check(tau=tau)
        self.tau = tau

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_loss(logits, targets, self.counts, tau=self.tau, weight=self.weight)


class BalancedSoftmaxLoss(ClassIdLoss):
    """`bs`: Ren et al.'s balanced softmax."""

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return balanced_softmax_loss(logits, targets, self.counts, weight=self.weight)


class BCELoss(ClassIdLoss):
    """`bce`: binary cross-entropy with logits, on one-hot class ids or on multi-hot targets (N x C)."""

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return bce_loss(logits, targets, self.counts, weight=self.weight)


class FocalBCELoss(CountsLoss):
    """`focal_bce` (multi-hot): Lin et al.'s sigmoid focal loss without the alpha balance."""

    config_keys = {"gamma": "focal_bce_gamma"}

    def __init__(self, class_counts: Counts, gamma: float = 2.0):
        super().__init__(class_counts)
        self.check(gamma=gamma)
        self.gamma = gamma

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_bce_loss(logits, targets, self.gamma)


class ClassBalancedBCELoss(CountsLoss):
    """`cb_bce` (multi-hot): BCE with each class's terms weighted by its class-balanced weight."""

    config_keys = {"beta": "cb_bce_beta"}

    def __init__(self, class_counts: Counts, beta: float = 0.9):
        super().__init__(class_counts)
        self.check(beta=beta)
        self.register_buffer("class_weights", class_balanced_weights(class_counts, beta), persistent=False)

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return bce_loss(logits, targets, weight=self.class_weights)


class DistributionBalancedLoss(CountsLoss):
    """`dbl` (multi-hot): Wu et al.'s distribution-balanced loss (ECCV 2020); `num_images` is N, the training
    images, whose ratio to each class count gives the negative-tolerant bias."""

    config_keys = {"alpha": "db_alpha", "beta": "db_beta", "mu": "db_mu", "neg_scale": "db_neg_scale",
                   "kappa": "db_kappa"}

    def __init__(self, class_counts: Counts, num_images: int, alpha: float = 0.1, beta: float = 10.0,
                 mu: float = 0.3, neg_scale: float = 5.0, kappa: float = 0.05):
        super().__init__(class_counts)
        self.check(alpha=alpha, beta=beta, neg_scale=neg_scale, kappa=kappa)
        self.num_images = num_images
        self.alpha, self.beta, self.mu, self.neg_scale, self.kappa = alpha, beta, mu, neg_scale, kappa
        self.focal_gamma: Optional[float] = None
        self.focal_balance = 2.0

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return distribution_balanced_loss(logits, targets, self.counts, self.num_images, self.alpha, self.beta,
                                          self.mu, self.neg_scale, self.kappa, focal_gamma=self.focal_gamma,
                                          focal_balance=self.focal_balance)


class DBFocalLoss(DistributionBalancedLoss):
    """`db_focal` (multi-hot): the distribution-balanced loss with its focal term, `balance` (1 - p_t)^gamma."""

    config_keys = {**DistributionBalancedLoss.config_keys, "gamma": "db_focal_gamma", "balance": "db_focal_balance"}

    def __init__(self, class_counts: Counts, num_images: int, alpha: float = 0.1, beta: float = 10.0,
                 mu: float = 0.3, neg_scale: float = 5.0, kappa: float = 0.05, gamma: float = 2.0,
                 balance: float = 2.0):
        super().__init__(class_counts, num_images, alpha, beta, mu, neg_scale, kappa)
        self.check(gamma=gamma, balance=balance)
        self.focal_gamma, self.focal_balance = gamma, balance


class AsymmetricLoss(CountsLoss):
    """`asl` (multi-hot): Ridnik et al.'s asymmetric loss (ICCV 2021); the counts are not used."""

    config_keys = {"gamma_neg": "asl_gamma_neg", "gamma_pos": "asl_gamma_pos", "clip": "asl_clip"}

    def __init__(self, class_counts: Counts, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05):
        super().__init__(class_counts)
        self.check(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return asymmetric_loss(logits, targets, self.gamma_neg, self.gamma_pos, self.clip)


# `loss.name` -> its Module: on class ids, and on multi-hot targets (`bce` serves both).
LOSSES: dict[str, type[ClassIdLoss]] = {
    "ce": CrossEntropyLoss, "cb": ClassBalancedLoss, "focal": FocalLoss, "ldam": LDAMLoss, "la": LogitAdjustedLoss,
    "bs": BalancedSoftmaxLoss, "bce": BCELoss,
}
MULTILABEL_LOSSES: dict[str, type[CountsLoss]] = {
    "bce": BCELoss, "focal_bce": FocalBCELoss, "cb_bce": ClassBalancedBCELoss, "dbl": DistributionBalancedLoss,
    "db_focal": DBFocalLoss, "asl": AsymmetricLoss,
}
