"""Temperature scaling (Guo et al. 2017): one T > 0 divides every logit, fitted on the validation split.

softmax(z / T) keeps every prediction and changes only the confidence. T minimises the validation NLL
under the prior the logits are calibrated to (`longtail.priors.logit_prior`): each validation sample is
weighted by pi_logit(y) / (the share of y in the validation split). A balanced validation split would
otherwise push a model calibrated to the training prior to flatten its head classes, mixing the prior
(a choice made at prediction time, `longtail predict --prior`) into its confidence. With uniform
logits and a balanced split every weight is 1: the plain NLL.

z / T folds into every head exactly: a linear or ETF head's weight and bias / T, a cosine head's scale
/ T (`longtail.models.scale_head`), unlike logit adjustment, which a cosine head cannot take.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from longtail.metrics import expected_calibration_error

log = logging.getLogger(__name__)

BOUNDS = (0.01, 100.0)  # the temperatures searched
_GOLDEN = (math.sqrt(5) - 1) / 2


def weighted_nll(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, temperature: float) -> float:
    """sum_i w_i NLL_i / sum_i w_i of softmax(z / T), float64."""
    per_sample = F.cross_entropy(logits.double() / temperature, targets, reduction="none")
    return float((weights * per_sample).sum() / weights.sum())


def sample_weights(targets: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """pi(y_i) / share of y_i among `targets`: the validation split re-weighted to the class prior `prior`."""
    share = torch.bincount(targets, minlength=len(prior)).double() / len(targets)
    return prior.double()[targets] / share[targets]


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor) -> float:
    """The T in `BOUNDS` minimising the NLL of softmax(logits / T) on (logits, targets) re-weighted to `prior`.

    The NLL is convex in 1 / T (a log-sum-exp of functions linear in it, minus one), so it has one
    minimum along log T, which a golden-section search brackets to float precision.
    """
    if len(targets) == 0:
        raise ValueError("fit_temperature: no validation samples")
    z = logits.detach().to("cpu", torch.float64)
    y = targets.detach().to("cpu", torch.int64)
    w = sample_weights(y, prior)
    lo, hi = math.log(BOUNDS[0]), math.log(BOUNDS[1])
    for _ in range(80):  # the bracket shrinks by 0.618 a step: 80 steps reach float64 resolution
        a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
        if weighted_nll(z, y, w, math.exp(a)) < weighted_nll(z, y, w, math.exp(b)):
            hi = b
        else:
            lo = a
    temperature = math.exp((lo + hi) / 2)
    # Without a single validation error the NLL falls towards T = 0 (the search stops where float64 no longer
    # tells the values apart); logits worse than chance push T to the upper end.
    if bool((z.argmax(1) == y).all()) or not BOUNDS[0] * 1.01 < temperature < BOUNDS[1] / 1.01:
        log.warning("posthoc.calibrate: T = %.4g has no minimum inside %s-%s (the model classifies every validation "
                    "sample correctly, or no better than chance); the calibrated model may be over- or "
                    "under-confident, and a larger validation split fits T better", temperature, *BOUNDS)
    return temperature


def calibration_record(logits: torch.Tensor, targets: torch.Tensor, temperature: Optional[float],
                       ece_bins: int) -> dict:
    """results.json's `temperature`, `ece_uncalibrated`, `nll_uncalibrated` (null without calibration), from the
    calibrated logits: the uncalibrated ones are those logits times T."""
    if temperature is None:
        return {"temperature": None, "ece_uncalibrated": None, "nll_uncalibrated": None}
    raw = logits.detach().to("cpu", torch.float64) * temperature
    return {"temperature": temperature, "ece_uncalibrated": expected_calibration_error(raw, targets, ece_bins),
            "nll_uncalibrated": float(F.cross_entropy(raw, targets.to("cpu", torch.int64)))}
