"""Datasets: read the files, pick the long-tailed subset, hold the splits (each a torch `Dataset`), and the
training samplers (torch `Sampler`s, `longtail.data.samplers`).

`build_data(data_cfg, root, download)` looks `data_cfg.name` up in a registry; other dataset kinds
(list files, folders) add themselves with `@register_dataset(name)`.

The identity of a long-tailed subset is `indices_sha256`: the SHA-256 of the selected original train
indices, in selection order (class by class), each written as a little-endian int64 (8 bytes) —
`hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from longtail.config import DataConfig
from longtail.data.cifar import CIFAR10_DIR, CIFAR100_DIR, RawDataset, read_cifar10, read_cifar100
# The core's names, as the package has always offered them (`from longtail.data import build_data, LTData`).
from longtail.data.core import (CIFAR_MEAN, CIFAR_STD, FASHION_MNIST_MEAN, FASHION_MNIST_STD, Builder,  # noqa: F401
                                LTData, build_data, dataset_names, default_thresholds_rule, indices_sha256,
                                missing_dataset, normalisation_stats, recorded_imbalance, register_dataset,
                                resize_inputs, resolve_root)
from longtail.data.download import CIFAR10, CIFAR100, download_archive, download_fashion_mnist
from longtail.data.idx import FASHION_MNIST_DIRS, FASHION_MNIST_FILES, fashion_mnist_dir, find_idx, read_fashion_mnist
from longtail.data.policies import ImagePolicy
from longtail.data.profiles import lt_subset
from longtail.data.samplers import (SAMPLERS, ClassAwareSampler, ClassBalancedSampler, EpochSampler,  # noqa: F401
                                    InstanceSampler, SqrtSampler)
from longtail.data.splits import InMemorySplit
from longtail.errors import ConfigError
from longtail.metrics import default_thresholds


def from_raw(name: str, raw: RawDataset, data_cfg: DataConfig, mean: tuple[float, ...],
             std: tuple[float, ...]) -> LTData:
    """Pick the long-tailed subset of an in-memory dataset and wrap its splits."""
    if data_cfg.class_names is not None:
        raise ConfigError(f"data.class_names: {name} has its own class names (from its files); the key is for "
                          "list-file datasets (imagenet_lt, places_lt, inat2018), whose lists hold only ids")
    num_classes = len(raw.class_names)
    subset = lt_subset(raw.train_labels, num_classes, data_cfg)
    mean = normalisation_stats(data_cfg.mean, mean, "data.mean")
    std = normalisation_stats(data_cfg.std, std, "data.std")

    def split(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> InMemorySplit:
        return InMemorySplit(torch.from_numpy(images[indices]), torch.from_numpy(labels[indices]),
                             torch.from_numpy(indices), mean, std, data_cfg.augment, num_classes,
                             ImagePolicy.from_config(data_cfg))

    train = split(raw.train_images, raw.train_labels, subset.train)
    val = split(raw.train_images, raw.train_labels, subset.val) if data_cfg.val_per_class > 0 else None
    test = split(raw.test_images, raw.test_labels, np.arange(len(raw.test_labels), dtype=np.int64))
    return LTData(
        name=name, num_classes=num_classes, class_counts=subset.counts, train=train, val=val, test=test,
        mean=mean, std=std, in_channels=raw.train_images.shape[1], image_size=raw.train_images.shape[2],
        default_thresholds=default_thresholds(name), indices=train.indices,
        indices_sha256=indices_sha256(subset.train), val_indices=val.indices if val is not None else None,
        class_names=raw.class_names, imbalance=recorded_imbalance(data_cfg, subset.counts),
        thresholds_rule=default_thresholds_rule(name, num_classes),
    )


@register_dataset("cifar10_lt")
def _cifar10_lt(data_cfg: DataConfig, root: Path, download: bool) -> LTData:
    if not (root / CIFAR10_DIR).is_dir():
        if not download:
            raise missing_dataset(data_cfg.name, root / CIFAR10_DIR)
        download_archive(CIFAR10, root, CIFAR10_DIR)
    return from_raw(data_cfg.name, read_cifar10(root), data_cfg, CIFAR_MEAN, CIFAR_STD)


@register_dataset("cifar100_lt")
def _cifar100_lt(data_cfg: DataConfig, root: Path, download: bool) -> LTData:
    if not (root / CIFAR100_DIR).is_dir():
        if not download:
            raise missing_dataset(data_cfg.name, root / CIFAR100_DIR)
        download_archive(CIFAR100, root, CIFAR100_DIR)
    return from_raw(data_cfg.name, read_cifar100(root), data_cfg, CIFAR_MEAN, CIFAR_STD)


@register_dataset("fashion_mnist_lt")
def _fashion_mnist_lt(data_cfg: DataConfig, root: Path, download: bool) -> LTData:
    if not find_idx(fashion_mnist_dir(root), FASHION_MNIST_FILES[0]).exists():
        if not download:
            raise missing_dataset(data_cfg.name, root / FASHION_MNIST_DIRS[0])
        download_fashion_mnist(root / FASHION_MNIST_DIRS[0])
    return from_raw(data_cfg.name, read_fashion_mnist(root), data_cfg, FASHION_MNIST_MEAN, FASHION_MNIST_STD)

from longtail.data import folder, listfile, mosaic, multilabel  # noqa: E402,F401  (they register their datasets)
