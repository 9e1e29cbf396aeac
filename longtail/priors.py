"""Which class prior a model's logits are calibrated to, and how to move them to another one.

A softmax model trained by cross-entropy on a long-tailed set estimates p(y | x) under the training
prior pi. Under label shift (p(x | y) fixed, the prior changed) the posterior for a deployment prior
pi_t is softmax(z + log pi_t - log pi_logit), pi_logit being the prior the logits are calibrated to.
Training choices move pi_logit: a logit-adjusted loss with tau trains z + tau log pi, so z itself is
calibrated to pi^(1 - tau); an additive post-hoc adjustment z - tau log pi moves it by the same
exponent. Those shifts are exact; re-weighting, re-sampling, margins, multiplicative adjustment and
the classifier re-balancing methods pull towards uniform by an amount no formula gives.

`logit_prior(cfg, folds)` decides it for model.yaml (docs/deployment.md has the table);
`longtail predict` reads it, so that no correction is ever applied twice.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from longtail.config import Config
from longtail.errors import ArgumentError, ConfigError

LOGIT_PRIORS = ("train", "uniform", "approx_uniform")


def logit_prior(cfg: Config, folds: Sequence[dict]) -> tuple[str, str]:
    """(`train` | `uniform` | `approx_uniform`, the reason in words) for a run's exported logits.

    Tracked as an exponent a (logits calibrated to a prior proportional to pi^a: 1 is the training
    prior, 0 uniform) while every step is an exact shift; any inexact balancing step makes it
    `approx_uniform`, as does an exact exponent other than 0 or 1 (e.g. a logit-adjusted loss with tau 0.5).
    Temperature, LDAM's logit scale, the MORE merge and LWS's scale fold keep the prior they are given
    (LWS's scales are trained: its loss and sampler decide).
    """
    a, exact, why = 1.0, [], []
    sampler, loss = cfg.data.sampler, cfg.loss
    if sampler != "instance":
        why.append(f"data.sampler {sampler} re-balances the training stream")
    if loss.name == "la":
        a -= loss.tau
        exact.append(f"loss la (tau {loss.tau:g}) trains z + tau log pi")
    elif loss.name == "bs":
        a -= 1.0
        exact.append("loss bs (balanced softmax) trains z + log n")
    elif loss.name == "cb":
        why.append("loss cb weights classes by their effective numbers")
    elif loss.name == "ldam":
        why.append("loss ldam widens the margins of rare classes")
    if loss.drw_start is not None and loss.name != "cb":
        why.append("loss.drw_start re-weights classes (DRW)")
    if cfg.method.name == "wb_stage2":  # re-balances the classifier beyond its loss and sampler
        why.append("WB stage 2 re-balances the classifier (weight decay, MaxNorm)")
    for fold in folds:
        if fold["kind"] == "logit_adjustment" and fold["tau"] != 0:
            if fold["form"] == "additive":
                a -= fold["tau"]
                exact.append(f"additive post-hoc adjustment z - tau log pi (tau {fold['tau']:g})")
            else:
                why.append(f"multiplicative post-hoc adjustment z / pi^tau (tau {fold['tau']:g})")
        elif fold["kind"] == "tau_norm":
            why.append(f"tau-normalisation (tau {fold['tau']:g}) rescales the classifier rows")
    if why:
        return "approx_uniform", "; ".join(exact + why) + ": balanced towards uniform, by no exact amount"
    if math.isclose(a, 1.0, abs_tol=1e-9):
        return "train", "; ".join(exact) or f"loss {loss.name} on the instance sampler: the training prior"
    if math.isclose(a, 0.0, abs_tol=1e-9):
        return "uniform", "; ".join(exact) + ": calibrated to a uniform prior"
    return "approx_uniform", "; ".join(exact) + f": calibrated to a prior proportional to pi^{a:g}, not uniform"


def class_prior(class_counts: Sequence[float]) -> torch.Tensor:
    """Counts (or unnormalised probabilities) -> a float64 probability vector."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    return counts / counts.sum()


def read_prior_file(path: str | Path, num_classes: int) -> torch.Tensor:
    """A deployment prior from a file: one probability or count per line in class-id order, normalised."""
    path = Path(path)
    if not path.is_file():
        raise ArgumentError("prior", str(path), "not uniform, train, or an existing file (one probability or count "
                            "per line, in class-id order)")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    try:
        values = [float(line) for line in lines]
    except ValueError as exc:
        raise ArgumentError("prior", str(path), f"every line must be one number ({exc})") from None
    if len(values) != num_classes:
        raise ArgumentError("prior", str(path), f"{len(values)} numbers, but the model has {num_classes} classes "
                            "(one per line, in class-id order)")
    if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise ArgumentError("prior", str(path), "the numbers must be finite, >= 0 and not all 0")
    return class_prior(values)


def prior_vector(name: str, class_counts: Sequence[int]) -> torch.Tensor:
    """`uniform`, `train` (the class counts), or a file (`read_prior_file`)."""
    if name == "uniform":
        return torch.full((len(class_counts),), 1.0 / len(class_counts), dtype=torch.float64)
    if name == "train":
        return class_prior(class_counts)
    return read_prior_file(name, len(class_counts))


def logit_prior_vector(kind: str, class_counts: Sequence[int]) -> torch.Tensor:
    """The prior logits recorded as `kind` are calibrated to; `approx_uniform` is taken as uniform."""
    if kind not in LOGIT_PRIORS:
        raise ConfigError(f"model.yaml: logit_prior {kind!r} is not one of {', '.join(LOGIT_PRIORS)}")
    return prior_vector("train" if kind == "train" else "uniform", class_counts)


def prior_shift(target: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """log pi_target - log pi_logit: added to the logits, the posterior under the target prior.
    A class the target prior rules out (probability 0) gets -inf, so probability 0."""
    return target.log() - logit.log()
