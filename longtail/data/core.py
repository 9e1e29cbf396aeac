"""The dataset core every reader builds on: `LTData` (what a dataset is to the rest of the package), the
registry of dataset builders (`register_dataset`, `build_data`), and the helpers readers share.

Readers (`data/__init__`'s in-memory datasets, `folder`, `listfile`, `multilabel`) import this module, never
the `longtail.data` package, which imports them.

Layer: building blocks. Imports the foundation and the data modules below it (splits, policies, metrics).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from longtail.config import DataConfig
from longtail.data.splits import InMemorySplit, Split
from longtail.errors import ConfigError
from longtail.metrics import default_thresholds

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


@dataclass
class LTData:
    name: str
    num_classes: int
    class_counts: list[int]  # train images per class
    train: Split
    val: Optional[Split]
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_channels: int
    image_size: int
    default_thresholds: tuple[int, int]  # (many, few): Many > many, Few < few, Medium in between
    indices: torch.Tensor  # original train indices (int64), selection order
    indices_sha256: str
    val_indices: Optional[torch.Tensor]
    class_names: list[str]
    imbalance: float  # to record: data.imbalance, or under profile none the measured max/min train count
    thresholds_rule: str  # which rule gave default_thresholds and why (`default_thresholds_rule`)
    task: str = "single_label"  # or "multi_label": labels are N x C multi-hot (longtail.task decides the rest)
    class_groups: Optional[tuple[list[int], list[int], list[int]]] = None  # multi-label: a published head/medium/tail


Builder = Callable[[DataConfig, Path, bool], LTData]
_DATASETS: dict[str, Builder] = {}


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Decorator: `builder(data_cfg, root: Path, download: bool) -> LTData` serves `data.name: name`."""
    def add(builder: Builder) -> Builder:
        _DATASETS[name] = builder
        return builder
    return add


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def resolve_root(root: str | os.PathLike | None, data_cfg: DataConfig) -> Path:
    """The explicit root, else data.root, else $LONGTAIL_DATA, else ~/.cache/longtail-data."""
    chosen = root or data_cfg.root or os.environ.get("LONGTAIL_DATA") or "~/.cache/longtail-data"
    return Path(chosen).expanduser()


def build_data(data_cfg: DataConfig, root: str | os.PathLike | None = None, download: bool = False) -> LTData:
    if data_cfg.name not in _DATASETS:
        raise ConfigError(f"data.name: unknown dataset {data_cfg.name!r}; known: {', '.join(dataset_names())}")
    data = _DATASETS[data_cfg.name](data_cfg, resolve_root(root, data_cfg), download)
    if data_cfg.resize_to is not None:
        resize_inputs(data, data_cfg.resize_to)
    return data


def resize_inputs(data: LTData, size: int) -> None:
    """`data.resize_to`: in-memory images go into the model at `size` pixels, resized batch-wise on the device
    (`longtail.data.augment.to_model_size`); their own size leaves them as they are."""
    splits = [s for s in (data.train, data.val, data.test) if s is not None]
    if not all(isinstance(s, InMemorySplit) for s in splits):
        raise ConfigError(f"data.resize_to: resizes in-memory datasets (CIFAR, Fashion-MNIST, the mosaics) on the "
                          f"device; {data.name} decodes image files, whose input size is data.image_size")
    if size == data.image_size:
        return
    for split in splits:
        split.resize = size
    data.image_size = size


def indices_sha256(indices) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def recorded_imbalance(data_cfg: DataConfig, class_counts: list[int]) -> float:
    """The imbalance factor a run records: `data.imbalance` for a profile that imposes it (`exp`,
    `step`); under `profile: none`, which keeps the natural counts, the measured ratio of the largest
    to the smallest train class (ImageNet-LT 256, Places-LT 996, iNaturalist 2018 500, balanced 1)."""
    if data_cfg.profile == "none":
        return max(class_counts) / min(class_counts)
    return float(data_cfg.imbalance)


def default_thresholds_rule(dataset: str, num_classes: int) -> str:
    """Why `default_thresholds(dataset)` is what it is, in words for results.json and `longtail data`."""
    many, few = default_thresholds(dataset)
    if (many, few) == (100, 20):
        return f"standard (> {many} / < {few}): {dataset}, {num_classes} classes"
    return f"10-class protocol (> {many} / < {few}): {dataset}"


def normalisation_stats(given: Optional[list[float]], default: tuple[float, ...], key: str) -> tuple[float, ...]:
    if given is None:
        return default
    if len(given) != len(default):
        raise ConfigError(f"{key}: this dataset has {len(default)} channel(s), got {len(given)} values")
    return tuple(given)


def missing_dataset(name: str, expected: Path) -> ConfigError:
    return ConfigError(f"{name}: no dataset files at {expected}; pass --download to fetch the official archive, "
                       f"or point --data-root DIR (or $LONGTAIL_DATA) at a directory that has them")
