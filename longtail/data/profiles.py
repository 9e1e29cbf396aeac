"""Long-tailed profiles: how many images each class keeps, and which ones (docs/protocol.md).

Works on any labels array in file order (CIFAR, Fashion-MNIST, folder datasets).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longtail.config import DataConfig
from longtail.errors import ConfigError


@dataclass
class Subset:
    """Original file indices kept for train and val, class by class in selection order."""

    train: np.ndarray  # int64
    val: np.ndarray  # int64, empty without a val split
    counts: list[int]  # train images per class


def target_counts(profile: str, n_max: int, num_classes: int, imbalance: float,
                  minority_fraction: float = 0.5, val_per_class: int = 0,
                  natural: list[int] | None = None) -> list[int]:
    """Train images per class. `exp`: n_max * (1/IF)^(i/(C-1)); `step`: the last int(mu*C) classes get
    n_max/IF; `none`: the natural counts. With a val split, n_max shrinks by val_per_class and counts
    are rounded instead of truncated (EWB's protocol)."""
    if num_classes < 2:
        raise ConfigError(f"a long-tailed dataset needs at least 2 classes, got {num_classes}")
    if profile == "none":
        if natural is None:
            raise ValueError("profile 'none' needs the natural per-class counts")
        return [n - val_per_class for n in natural]
    top = n_max - val_per_class
    to_int = round if val_per_class > 0 else int
    if profile == "exp":
        return [to_int(top * (1.0 / imbalance) ** (i / (num_classes - 1))) for i in range(num_classes)]
    if profile == "step":
        minority = int(minority_fraction * num_classes)
        return [top] * (num_classes - minority) + [to_int(top / imbalance)] * minority
    raise ConfigError(f"data.profile: {profile!r} is not allowed; choose one of: exp, step, none")


def select(labels: np.ndarray, counts: list[int], selection: str, val_per_class: int = 0,
           seed: int = 0, profile: str = "exp") -> Subset:
    """Pick counts[c] train (then val_per_class val) images of each class c (`profile` only shapes
    the error messages: under `none` the counts are the natural ones, so data.imbalance is not why).

    `ldam`: seed numpy's legacy generator once, then per class in order shuffle the class's indices
    (file order) and keep the first ones, exactly as LDAM-DRW's IMBALANCECIFAR does with
    np.random.seed + np.random.shuffle (a private RandomState gives the same stream without touching
    the global one). `first`: the first images of each class in file order.
    """
    if selection not in ("ldam", "first"):
        raise ConfigError(f"data.selection: {selection!r} is not allowed; choose one of: ldam, first")
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    train, val = [], []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        if n < 1 and profile == "none" and len(idx) == 0:
            raise ConfigError(f"class {c} has no training images; data.profile=none keeps the natural counts")
        if n < 1 and profile == "none":
            raise ConfigError(
                f"class {c} has {len(idx)} images and data.val_per_class={val_per_class} leaves none of them for "
                f"training; lower data.val_per_class to at most {len(idx) - 1} (data.profile=none keeps every "
                f"class's natural count)")
        if n < 1:
            raise ConfigError(
                f"class {c} would keep {n} training images; lower data.imbalance or data.val_per_class "
                f"(the largest class has too few images for this profile)")
        if len(idx) < n + val_per_class:
            raise ConfigError(
                f"class {c} has {len(idx)} images but the profile asks for {n} train + {val_per_class} val; "
                f"lower data.imbalance / data.val_per_class or use data.profile=none")
        if selection == "ldam":
            rng.shuffle(idx)
        train.append(idx[:n])
        val.append(idx[n:n + val_per_class])
    return Subset(np.concatenate(train).astype(np.int64), np.concatenate(val).astype(np.int64), list(counts))


def lt_subset(labels: np.ndarray, num_classes: int, cfg: DataConfig) -> Subset:
    """The long-tailed train (and val) subset that `cfg` describes; n_max is the largest class in `labels`."""
    natural = np.bincount(np.asarray(labels), minlength=num_classes).tolist()
    counts = target_counts(cfg.profile, max(natural), num_classes, cfg.imbalance, cfg.minority_fraction,
                           cfg.val_per_class, natural)
    return select(labels, counts, cfg.selection, cfg.val_per_class, cfg.subset_seed, cfg.profile)
