"""The `loss` config section -> the loss Module (`longtail.losses.modules`) and the `LossFn` the methods call.

Methods call `base_loss(logits, targets, progress)`, `progress` being the fraction of training done at the
step; `ConfiguredLoss` tells its Module the epoch that step is in (`set_epoch`) and calls it. The Module is the
one a user builds by hand: the engine has no other implementation of any loss.

A loss may multiply the model's logits by a constant before its softmax (LDAM's scale, with the model
ending in a scale-1 cosine head). `logit_scale(loss_cfg)` names that constant; the engine folds it into
the head of the exported model (`longtail.models.scale_head`), so `model.pt` gives the logits the loss
saw (margins aside: they are training-only) and its ECE and NLL are those of the trained softmax.

Layer: building blocks. Imports the foundation and the other loss modules.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from longtail.config import LossConfig, resolve_epochs
from longtail.errors import ConfigError
from longtail.losses.modules import (LOSSES, MULTILABEL_LOSSES, RANGES, ClassIdLoss, CountsLoss,
                                     DistributionBalancedLoss, out_of_range)

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
NAMES = tuple(LOSSES)  # on class ids
MULTILABEL_NAMES = tuple(MULTILABEL_LOSSES)  # on multi-hot targets


def logit_scale(loss_cfg: LossConfig) -> float:
    """The constant the configured loss multiplies the model's logits by at inference time (its margins
    and class weights aside): `ldam_scale` for `ldam`, 1 for every other loss. The exported model's head
    carries it, so that the exported logits are the ones whose softmax the loss trained."""
    return float(loss_cfg.ldam_scale) if loss_cfg.name == "ldam" else 1.0


def check_loss_config(loss_cfg: LossConfig) -> None:
    """Every `loss` key with a range (`RANGES`, the rules the Modules check their arguments by), whichever loss
    is chosen, so a bad value is refused before any work starts."""
    for key in RANGES:
        problem = out_of_range(key, getattr(loss_cfg, key))
        if problem:
            raise ConfigError(f"loss.{key}: {problem}, got {getattr(loss_cfg, key)}")


def hyper_parameters(module: type[CountsLoss], loss_cfg: LossConfig) -> dict:
    """The Module's constructor arguments read from the config (`config_keys`)."""
    return {arg: getattr(loss_cfg, key) for arg, key in module.config_keys.items()}


class ConfiguredLoss:
    """`loss(logits, targets, progress)`: the configured loss Module on class ids (`self.module`). Class-balanced
    weights apply throughout for `cb`, and from the epoch `loss.drw_start` resolves to on (deferred
    re-weighting) when it is set."""

    def __init__(self, loss_cfg: LossConfig, class_counts: Sequence[int], epochs: int):
        if loss_cfg.name not in NAMES:
            raise ConfigError(f"loss.name: unknown loss {loss_cfg.name!r}; choose one of: {', '.join(NAMES)}")
        check_loss_config(loss_cfg)
        self.cfg = loss_cfg
        self.drw_epoch: Optional[int] = None  # the resolved DRW start, for the record
        kwargs = hyper_parameters(LOSSES[loss_cfg.name], loss_cfg)
        if loss_cfg.drw_start is not None:
            if loss_cfg.name == "cb":
                raise ConfigError("loss.drw_start: the cb loss is class-balanced from the start; "
                                  "set loss.drw_start: null or use it with ce, focal, ldam, la, bs or bce")
            if loss_cfg.drw_start < 0:
                raise ConfigError(f"loss.drw_start: must be >= 0 (a fraction of training below 1, else an epoch), "
                                  f"got {loss_cfg.drw_start}")
            self.drw_epoch = kwargs["drw_start"] = resolve_epochs(loss_cfg.drw_start, epochs)
        self.module: ClassIdLoss = LOSSES[loss_cfg.name](class_counts, **kwargs)
        self.epochs = epochs

    @property
    def logit_scale(self) -> float:
        """The inference-time scale this loss applies to the logits (`logit_scale(loss_cfg)`)."""
        return logit_scale(self.cfg)

    @property
    def class_weights(self) -> Optional[torch.Tensor]:
        """The class-balanced weights of `cb` or DRW (whether in force yet or not); None for neither."""
        return self.module.class_weights

    def epoch_at(self, progress: float) -> int:
        """The epoch (from 0) a step at `progress` (fraction of training done) belongs to: the last e with
        e / epochs <= progress, the float comparison DRW's switch has always been decided by. `progress * epochs`
        alone rounds across it (15 / 22 * 22 < 15), so its integer part is corrected by one either way."""
        e = min(int(progress * self.epochs), self.epochs - 1)
        if e / self.epochs > progress:
            return e - 1
        if e + 1 < self.epochs and (e + 1) / self.epochs <= progress:
            return e + 1
        return e

    def weight(self, progress: float) -> Optional[torch.Tensor]:
        """The per-class weights in force at `progress`, or None."""
        self.module.set_epoch(self.epoch_at(progress))
        return self.module.weight

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, progress: float) -> torch.Tensor:
        self.module.set_epoch(self.epoch_at(progress))
        return self.module(logits, targets)


class MultiLabelLoss:
    """`loss(logits, multi_hot, progress)`: the configured multi-label loss Module (`longtail.task` picks it);
    none of them has a schedule, so `progress` is not used."""

    logit_scale = 1.0

    def __init__(self, loss_cfg: LossConfig, class_counts: Sequence[int], num_images: int):
        if loss_cfg.name not in MULTILABEL_NAMES:
            raise ConfigError(f"loss.name: unknown multi-label loss {loss_cfg.name!r}; choose one of: "
                              f"{', '.join(MULTILABEL_NAMES)}")
        check_loss_config(loss_cfg)
        counts = torch.as_tensor(class_counts, dtype=torch.float32)
        if loss_cfg.name in ("cb_bce", "dbl", "db_focal") and not ((counts >= 1) & (counts < num_images)).all():
            raise ConfigError(f"loss.name: {loss_cfg.name} needs every class on at least one training image and "
                              f"off at least one (its weights use n_k and N - n_k); counts {counts.long().tolist()} "
                              f"of {num_images} images")
        self.cfg = loss_cfg
        module = MULTILABEL_LOSSES[loss_cfg.name]
        kwargs = hyper_parameters(module, loss_cfg)
        if issubclass(module, DistributionBalancedLoss):
            kwargs["num_images"] = num_images
        self.module: CountsLoss = module(class_counts, **kwargs)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, progress: float) -> torch.Tensor:
        return self.module(logits, targets)


def build_loss(loss_cfg: LossConfig, class_counts: Sequence[int], epochs: int) -> LossFn:
    """The configured loss as `LossFn(logits, targets, progress)`."""
    if epochs < 1:
        raise ConfigError(f"train.epochs: must be >= 1, got {epochs}")
    return ConfiguredLoss(loss_cfg, class_counts, epochs)
