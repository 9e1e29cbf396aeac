"""`cifar10_mosaic_mlt`, `fashion_mnist_mosaic_mlt`: multi-label data made of 2 x 2 mosaics of real CIFAR-10 /
Fashion-MNIST images, tile classes drawn with long-tailed frequencies (docs/multilabel.md), so the multi-label
methods can be checked on data this machine holds.

Layer: building blocks (data). Imports the foundation, `data.core` and the other readers in `data/`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from longtail.config import DataConfig
from longtail.data.cifar import CIFAR10_DIR, RawDataset, read_cifar10
from longtail.data.core import (CIFAR_MEAN, CIFAR_STD, FASHION_MNIST_MEAN, FASHION_MNIST_STD, LTData, missing_dataset,
                                normalisation_stats, register_dataset)
from longtail.data.download import CIFAR10, download_archive, download_fashion_mnist
from longtail.data.idx import FASHION_MNIST_DIRS, FASHION_MNIST_FILES, fashion_mnist_dir, find_idx, read_fashion_mnist
from longtail.data.multilabel import THRESHOLDS, multi_hot
from longtail.data.policies import ImagePolicy
from longtail.data.splits import InMemorySplit
from longtail.errors import ConfigError


MOSAIC_GROUPS = ([0, 1, 2], [3, 4, 5], [6, 7, 8, 9])  # head / medium / tail by the profile's class rank


def tile_probabilities(num_classes: int, imbalance: float) -> np.ndarray:
    """The tile-class distribution: p_k proportional to IF^(-k / (C - 1)), CIFAR-LT's exponential profile."""
    p = float(imbalance) ** (-np.arange(num_classes) / (num_classes - 1))
    return p / p.sum()


def mosaic_tiles(labels: np.ndarray, probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n x 4 source-image indices: tile classes drawn i.i.d. from `probs`, each class's tiles taking its images
    in a seeded shuffled order, cycled when a class needs more tiles than it has images."""
    classes = rng.choice(len(probs), size=(n, 4), p=probs)
    tiles = np.empty((n, 4), dtype=np.int64)
    for k in range(len(probs)):
        where = classes == k
        own = rng.permutation(np.flatnonzero(labels == k))
        tiles[where] = own[np.arange(int(where.sum())) % len(own)]
    return tiles


def mosaic_images(images: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """N x C x H x W uint8 from C x H x W sources: each source image averaged over 2 x 2 pixel blocks (rounded)
    to H/2 x W/2, placed top-left, top-right, bottom-left, bottom-right."""
    _, c, h, w = images.shape
    small = images.reshape(-1, c, h // 2, 2, w // 2, 2).astype(np.uint16).sum(axis=(3, 5))
    small = ((small + 2) // 4).astype(np.uint8)
    t = small[tiles]  # n x 4 x 3 x 16 x 16
    top = np.concatenate([t[:, 0], t[:, 1]], axis=3)
    bottom = np.concatenate([t[:, 2], t[:, 3]], axis=3)
    return np.concatenate([top, bottom], axis=2)


def mosaic_data(cfg: DataConfig, raw: RawDataset, mean: tuple[float, ...], std: tuple[float, ...]) -> LTData:
    """Training mosaics with tile classes from the exp profile, test mosaics with uniform ones (docs/multilabel.md)."""
    if cfg.profile != "exp":
        raise ConfigError(f"data.profile: {cfg.name} draws tile classes from the exp profile; got {cfg.profile}")
    if cfg.val_per_class > 0:
        raise ConfigError(f"data.val_per_class: {cfg.name} has no per-class hold-out; set it to 0")
    num_classes = len(raw.class_names)
    # Separate seeded streams: the test mosaics do not change with the training image count or profile.
    train_tiles = mosaic_tiles(raw.train_labels, tile_probabilities(num_classes, cfg.imbalance),
                               cfg.mosaic_train_images, np.random.default_rng([cfg.subset_seed, 0]))
    test_tiles = mosaic_tiles(raw.test_labels, np.full(num_classes, 1 / num_classes), cfg.mosaic_test_images,
                              np.random.default_rng([cfg.subset_seed, 1]))
    mean, std = normalisation_stats(cfg.mean, mean, "data.mean"), normalisation_stats(cfg.std, std, "data.std")

    def split(images: np.ndarray, labels: np.ndarray, tiles: np.ndarray) -> InMemorySplit:
        multi = torch.from_numpy(multi_hot([sorted(set(row)) for row in labels[tiles].tolist()], num_classes))
        return InMemorySplit(torch.from_numpy(mosaic_images(images, tiles)), multi, torch.arange(len(tiles)),
                             mean, std, cfg.augment, num_classes, ImagePolicy.from_config(cfg))

    train = split(raw.train_images, raw.train_labels, train_tiles)
    test = split(raw.test_images, raw.test_labels, test_tiles)
    return LTData(
        name=cfg.name, num_classes=num_classes, class_counts=train.class_counts(), train=train, val=None, test=test,
        mean=mean, std=std, in_channels=raw.train_images.shape[1], image_size=raw.train_images.shape[2],
        default_thresholds=THRESHOLDS, indices=train.indices,
        indices_sha256=hashlib.sha256(np.ascontiguousarray(train_tiles, dtype="<i8").tobytes()).hexdigest(),
        val_indices=None, class_names=raw.class_names, imbalance=float(cfg.imbalance),
        thresholds_rule=f"{cfg.name}: head classes 0-2, medium 3-5, tail 6-9 (the profile's rank)",
        task="multi_label", class_groups=MOSAIC_GROUPS,
    )


@register_dataset("cifar10_mosaic_mlt")
def _cifar10_mosaic_mlt(cfg: DataConfig, root: Path, download: bool) -> LTData:
    if not (root / CIFAR10_DIR).is_dir():
        if not download:
            raise missing_dataset(cfg.name, root / CIFAR10_DIR)
        download_archive(CIFAR10, root, CIFAR10_DIR)
    return mosaic_data(cfg, read_cifar10(root), CIFAR_MEAN, CIFAR_STD)


@register_dataset("fashion_mnist_mosaic_mlt")
def _fashion_mnist_mosaic_mlt(cfg: DataConfig, root: Path, download: bool) -> LTData:
    if not find_idx(fashion_mnist_dir(root), FASHION_MNIST_FILES[0]).exists():
        if not download:
            raise missing_dataset(cfg.name, root / FASHION_MNIST_DIRS[0])
        download_fashion_mnist(root / FASHION_MNIST_DIRS[0])
    return mosaic_data(cfg, read_fashion_mnist(root), FASHION_MNIST_MEAN, FASHION_MNIST_STD)
