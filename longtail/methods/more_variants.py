"""MORE's variants (docs/methods/more.md#variants): the project's readings of the open questions, each off at
its default. Frequency bands with one low-rank part each (`more.groups`), the rank shared out by a measured
importance (`more.rank_allocation`), the orthogonality penalty, the general-only loss, and the keys' checks.
`longtail.methods.more` uses them.

Layer: methods. Imports the foundation and the building blocks.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from longtail.config import Config
from longtail.distributed import world_size
from longtail.errors import ConfigError
from longtail.lowrank import LowRank
from longtail.methods.base import RunInfo
from longtail.mixing import MixedTargets
from longtail.task import SINGLE_LABEL, get_task


def check_variants(cfg: Config, info: RunInfo) -> None:
    """The variant keys (docs/methods/more.md#variants) against their ranges and against each other."""
    more = cfg.more
    for key in ("general_lr_scale", "general_loss_weight", "orthogonal_weight"):
        if getattr(more, key) < 0:
            raise ConfigError(f"more.{key}: must be >= 0, got {getattr(more, key)}")
    f = more.freeze_general_at
    if f is not None and not (0 < f < 1 or 1 <= int(f) < cfg.train.epochs):
        raise ConfigError(f"more.freeze_general_at: a fraction of training in (0, 1), an epoch in 1..{cfg.train.epochs - 1}"
                          f" or null, got {f}")
    if f is not None and more.general_lr_scale == 0:
        raise ConfigError("more.freeze_general_at: with more.general_lr_scale 0 nothing trains before the boundary; "
                          "set one of them only")
    if f is not None and world_size() > 1 and not cfg.train.find_unused_parameters:
        raise ConfigError("more.freeze_general_at: on several processes each phase leaves one set of parameters "
                          "without a gradient, which DDP must be told of; add train.find_unused_parameters=true")
    if not 1 <= more.groups <= info.num_classes:
        raise ConfigError(f"more.groups: must be in 1..{info.num_classes} (the number of classes), got {more.groups}")
    if more.grouping == "features" and more.groups == 1:
        raise ConfigError("more.grouping: features cuts the classes into more.groups bands; with more.groups 1 "
                          "there is one band, so set more.groups to 2 or more, or leave more.grouping at frequency")
    if cfg.finetune.mode == "lora":
        for key, default in (("groups", 1), ("rank_allocation", "uniform")):
            if getattr(more, key) != default:
                raise ConfigError(f"more.{key}: with finetune.mode=lora MORE's low-rank part is the LoRA part, one "
                                  f"per layer of finetune.lora_rank; remove more.{key} or use finetune.mode=full")


def phase_boundary(cfg: Config) -> float | None:
    """`more.freeze_general_at` as the fraction of training where the second phase starts: a fraction below 1 as
    it is (counted in optimiser steps), an epoch number as that epoch's first step."""
    f = cfg.more.freeze_general_at
    return f if f is None or f < 1 else int(f) / cfg.train.epochs


def importance_ranks(model: nn.Module, uniform: dict[str, int], loss: Callable[[nn.Module], torch.Tensor]
                     ) -> dict[str, int]:
    """`more.rank_allocation: importance`: the budget of the uniform rule (`uniform`: module name -> its r),
    shared out in proportion to each layer's first-order importance sum |W * dL/dW| (the loss change a removal
    of W would cause, to first order), measured by `loss` on a float64 copy; each r_l in [1, min(out, fan_in)]."""
    names = list(uniform)
    probe = copy.deepcopy(model).double()  # the model itself, its BN statistics and gradients stay untouched
    with torch.random.fork_rng(devices=[]):
        loss(probe).backward()
    modules = dict(probe.named_modules())
    grads = {n: modules[n].weight.grad for n in names}  # None: the layer does not reach the loss
    score = {n: 0.0 if g is None else float((modules[n].weight.detach() * g).abs().sum()) for n, g in grads.items()}
    budget = sum(uniform.values())
    total = sum(score.values()) or 1.0
    ranks = {}
    for n in names:
        shape = modules[n].weight.shape
        ranks[n] = min(max(1, round(budget * score[n] / total)), shape[0], math.prod(shape[1:]))
    return ranks


def frequency_bands(class_counts: list[int], groups: int) -> list[list[int]]:
    """`more.groups`: class ids by training count, most frequent first (ties by id), in `groups` bands of
    (nearly) equal numbers of classes."""
    order = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    size, extra = divmod(len(order), groups)
    bands, start = [], 0
    for g in range(groups):
        end = start + size + (g < extra)
        bands.append(order[start:end])
        start = end
    return bands


def feature_bands(means: torch.Tensor, class_counts: list[int], groups: int) -> list[list[int]]:
    """`more.grouping: features`: the classes cut into `groups` bands of similar class-mean features (`means`:
    classes x features), by k-means on the unit-normalised means. Deterministic: the first centre is the most
    frequent class, each next one the class farthest from the centres so far (ties by id); a band left empty
    takes the class farthest from its centre. Bands are ordered by their training count, most frequent first."""
    x = F.normalize(means.double(), dim=1)
    n = len(x)
    chosen = [min(range(n), key=lambda c: (-class_counts[c], c))]
    while len(chosen) < groups:
        gap = torch.cdist(x, x[chosen]).min(dim=1).values
        gap[chosen] = -1
        chosen.append(int(gap.argmax()))  # argmax returns the first maximum: ties by id
    centres = x[chosen]
    assign = None
    for _ in range(100):
        distance = torch.cdist(x, centres)
        new = distance.argmin(dim=1)
        for g in range(groups):
            if not (new == g).any():
                own = distance.gather(1, new[:, None]).squeeze(1)
                own[[c for c in range(n) if (new == new[c]).sum() == 1]] = -1  # never empty another band
                new[int(own.argmax())] = g
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centres = torch.stack([x[assign == g].mean(dim=0) for g in range(groups)])
    bands = [[c for c in range(n) if assign[c] == g] for g in range(groups)]
    return sorted(bands, key=lambda band: (-sum(class_counts[c] for c in band), band[0]))


def band_prior(prior: torch.Tensor, band: list[int]) -> torch.Tensor:
    """The weights of one band's part: pi_y for its own classes, the largest prior for every other class, so the
    part must leave the other bands' outputs alone as MORE asks of the head. One band with every class: pi."""
    own = torch.zeros_like(prior, dtype=torch.bool)
    own[band] = True
    return torch.where(own, prior, prior.max())


def orthogonal_penalty(model: nn.Module) -> torch.Tensor:
    """sum over decomposed weights and their parts of ||s B A W_g^T||_F^2 / ||W_g||_F^2: how far the update
    reads the input directions W_g reads. From r x r products: ||B M||_F^2 = tr(B^T B M M^T), M = A W_g^T."""
    terms = []
    for module in model.modules():
        chain = getattr(getattr(module, "parametrizations", None), "weight", None)
        if chain is None:
            continue
        w = chain.original.flatten(1)
        for part in chain:
            if isinstance(part, LowRank):
                m = part.A @ w.T
                terms.append(part.scale ** 2 * ((part.B.T @ part.B) * (m @ m.T)).sum() / w.pow(2).sum())
    return sum(terms)


def general_loss(z_gen: torch.Tensor, targets: Any, class_prior: torch.Tensor, task: str = SINGLE_LABEL) -> torch.Tensor:
    """`more.general_loss_weight`'s term: sum_i pi_{y_i} l_i / sum_i pi_{y_i}, l the plain cross-entropy (BCE for
    multi-hot targets) of the general-only logits, weighted toward frequent classes as L_MORE is."""
    if isinstance(targets, MixedTargets):
        return targets.combine(lambda t: general_loss(z_gen, t, class_prior, task))
    z = z_gen.float()
    if targets.ndim == 2:
        per_sample = F.binary_cross_entropy_with_logits(z, targets.to(z), reduction="none").mean(dim=1)
    else:
        per_sample = F.cross_entropy(z, targets, reduction="none")
    w = get_task(task).more_weights(targets, class_prior)
    return (w * per_sample).sum() / w.sum()
