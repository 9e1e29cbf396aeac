"""Readers for the official CIFAR-10 / CIFAR-100 python archives (`cifar-10-batches-py`, `cifar-100-python`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longtail.data.safe_pickle import load_pickle
from longtail.errors import ConfigError

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"


@dataclass
class RawDataset:
    """A dataset as stored on disk: uint8 images N x C x H x W, int64 labels, in file order."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


def _entry(path: Path, record: dict, key: str):
    if key not in record:
        raise ConfigError(f"{path}: missing the entry '{key}' (found: {', '.join(map(str, record))})")
    return record[key]


def _read_dict(path: Path) -> dict:
    record = load_pickle(path)
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: expected a pickled dict, found {type(record).__name__}")
    return record


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    record = _read_dict(path)
    data = _entry(path, record, "data")
    labels = np.asarray(_entry(path, record, label_key), dtype=np.int64)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise ConfigError(f"{path}: 'data' must be a uint8 array of shape N x 3072, got {type(data).__name__} {shape}")
    if labels.shape != (len(data),):
        raise ConfigError(f"{path}: {len(data)} images but {labels.size} entries in '{label_key}'")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"{path}: '{label_key}' must lie in 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _names(path: Path, key: str, num_classes: int) -> list[str]:
    names = [str(n) for n in _entry(path, _read_dict(path), key)]
    if len(names) != num_classes:
        raise ConfigError(f"{path}: '{key}' lists {len(names)} classes, expected {num_classes}")
    return names


def read_cifar10(root: str | Path) -> RawDataset:
    folder = Path(root) / CIFAR10_DIR
    parts = [_read_batch(folder / f"data_batch_{k}", "labels", 10) for k in range(1, 6)]
    test_images, test_labels = _read_batch(folder / "test_batch", "labels", 10)
    return RawDataset(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
        test_images, test_labels, _names(folder / "batches.meta", "label_names", 10),
    )


def read_cifar100(root: str | Path) -> RawDataset:
    """CIFAR-100 with its 100 fine labels."""
    folder = Path(root) / CIFAR100_DIR
    train_images, train_labels = _read_batch(folder / "train", "fine_labels", 100)
    test_images, test_labels = _read_batch(folder / "test", "fine_labels", 100)
    return RawDataset(train_images, train_labels, test_images, test_labels,
                      _names(folder / "meta", "fine_label_names", 100))
