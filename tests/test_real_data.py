"""Checks on the real files under $LONGTAIL_DATA (skipped when they are not there)."""
import os
from pathlib import Path

import numpy as np
import pytest

from longtail.config import DataConfig
from longtail.data import build_data
from longtail.data.describe import describe

ROOT = Path(os.environ.get("LONGTAIL_DATA", "/nonexistent"))
needs_cifar10 = pytest.mark.skipif(not (ROOT / "cifar-10-batches-py").is_dir(),
                                   reason="real CIFAR-10 not found: set $LONGTAIL_DATA to a root with cifar-10-batches-py/")
needs_fmnist = pytest.mark.skipif(not (ROOT / "fashion-mnist").is_dir(),
                                  reason="real Fashion-MNIST not found: set $LONGTAIL_DATA to a root with fashion-mnist/")

# Measured once on the real training files with selection ldam, subset_seed 0 (index-based, so it holds
# for the original archive and for the rebuilt copy alike, whose training order is the original one).
CIFAR10_LT_IF100_SHA256 = "4bf45bff8878d2786e47dccd702f96ff33b2b11d8c7da3b5015f10937290f866"


@needs_cifar10
def test_cifar10_lt_if100():
    data = build_data(DataConfig(name="cifar10_lt", imbalance=100), ROOT)
    assert data.class_counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert data.train.class_counts() == data.class_counts and len(data.train) == 12406
    assert data.indices_sha256 == CIFAR10_LT_IF100_SHA256
    assert len(data.test) == 10000 and data.test.class_counts() == [1000] * 10
    assert data.train.images.shape[1:] == (3, 32, 32)
    assert 80 < data.train.images.float().mean() < 160  # real pixels, not zeros


@needs_cifar10
def test_cifar10_lt_groups():
    d = describe(DataConfig(name="cifar10_lt", imbalance=100), ROOT)
    assert d["groups"] == {"many": 4, "medium": 3, "few": 3}


@needs_fmnist
def test_fashion_mnist_sizes():
    data = build_data(DataConfig(name="fashion_mnist_lt", imbalance=1, profile="none"), ROOT)
    assert len(data.train) == 60000 and len(data.test) == 10000
    assert data.class_counts == [6000] * 10 and data.test.class_counts() == [1000] * 10
    assert np.array_equal(np.sort(data.indices.numpy()), np.arange(60000))
    lt = build_data(DataConfig(name="fashion_mnist_lt", imbalance=100), ROOT)
    assert lt.class_counts[0] == 6000 and lt.class_counts[-1] == 60
