"""Losses for long-tailed training, in three forms (one implementation):

- plain functions `f(logits, targets, counts, ..., weight=None)` (`functions`), which compose with anything;
- an `nn.Module` per loss, built from class counts and called as `loss(logits, targets)` (`modules`): the
  losses a user's own training loop takes, and the ones the engine trains with;
- `build_loss(loss_cfg, class_counts, epochs)`, the `loss` config section as the `LossFn(logits, targets,
  progress)` the methods call (`configured`), which wraps the configured Module.

Layer: building blocks. This package's modules import the foundation, `mixing` and each other.
"""
from longtail.losses.configured import (MULTILABEL_NAMES, NAMES, ConfiguredLoss, LossFn, MultiLabelLoss, build_loss,
                                        check_loss_config, hyper_parameters, logit_scale)
from longtail.losses.functions import (Counts, asymmetric_loss, at_least_float32, balanced_softmax_loss, bce_loss,
                                       class_balanced_ce, class_balanced_weights, cross_entropy, db_bias, db_weights,
                                       distribution_balanced_loss, focal_bce_loss, focal_loss, ldam_loss, ldam_margins,
                                       logit_adjusted_loss)
from longtail.losses.modules import (LOSSES, MULTILABEL_LOSSES, AsymmetricLoss, BalancedSoftmaxLoss, BCELoss,
                                     ClassBalancedBCELoss, ClassBalancedLoss, ClassIdLoss, CountsLoss, CrossEntropyLoss,
                                     DBFocalLoss, DistributionBalancedLoss, FocalBCELoss, FocalLoss, LDAMLoss,
                                     LogitAdjustedLoss)

__all__ = [
    "AsymmetricLoss", "BCELoss", "BalancedSoftmaxLoss", "ClassBalancedBCELoss", "ClassBalancedLoss", "ClassIdLoss",
    "ConfiguredLoss", "Counts", "CountsLoss", "CrossEntropyLoss", "DBFocalLoss", "DistributionBalancedLoss",
    "FocalBCELoss", "FocalLoss", "LDAMLoss", "LOSSES", "LogitAdjustedLoss", "LossFn", "MULTILABEL_LOSSES",
    "MULTILABEL_NAMES", "MultiLabelLoss", "NAMES", "asymmetric_loss", "at_least_float32", "balanced_softmax_loss",
    "bce_loss", "build_loss", "check_loss_config", "class_balanced_ce", "class_balanced_weights", "cross_entropy", "db_bias", "db_weights",
    "distribution_balanced_loss", "focal_bce_loss", "focal_loss", "hyper_parameters", "ldam_loss", "ldam_margins",
    "logit_adjusted_loss", "logit_scale",
]
