"""Gradient accumulation (`train.accum_steps`), the device-side step loop's options, and small-batch checks."""
import json

import pytest
import torch
from torch import nn

from longtail.config import load_config
from longtail.engine import fit
from longtail.errors import ConfigError

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

BASE = [
    "data.name=fashion_mnist_lt", "data.imbalance=5", "data.augment=none", "train.epochs=2", "optim.lr=0.05",
    "eval.batch_size=64", "schedule.name=cosine", "optim.lr_scaling=linear", "optim.base_batch_size=64",
]


class NoNormNet(nn.Module):
    """A model without BatchNorm: its loss on a batch is the mean of its losses on the halves."""

    def __init__(self, in_features: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU())
        self.feature_dim = 32

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def no_norm_net(num_classes, in_channels, image_size, model_cfg):
    return NoNormNet(in_channels * image_size * image_size)


def _weights(run):
    return torch.load(run / "model.pt", weights_only=True)


def test_two_accumulated_micro_batches_equal_one_batch_of_twice_the_size(tmp_path, data_root):
    model = f"model.name={__name__}:no_norm_net"
    # 199 images: 4 steps of 64 (the last of 7 images) = 4 groups of two 32s (the last a group of one 7)
    big = fit(load_config(None, [*BASE, model, "data.batch_size=64"]), tmp_path / "big", data_root=data_root)
    accum = fit(load_config(None, [*BASE, model, "data.batch_size=32", "train.accum_steps=2"]), tmp_path / "accum",
                data_root=data_root)
    a, b = _weights(tmp_path / "big"), _weights(tmp_path / "accum")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
    assert accum["effective_batch_size"] == big["effective_batch_size"] == 64
    assert accum["effective_lr"] == pytest.approx(big["effective_lr"]) == pytest.approx(0.05)  # 0.05 x 32 x 2 / 64
    records = [json.loads(line) for line in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()]
    big_records = [json.loads(line) for line in (tmp_path / "big" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([r["lr"] for r in big_records])  # steps count optimiser steps
    assert records[-1]["train_loss"] == pytest.approx(big_records[-1]["train_loss"], rel=1e-5)


def test_accumulation_with_a_partial_group_and_mid_epoch_checkpoints(tmp_path, data_root):
    # batch 16: 13 micro-batches per epoch, accumulated by 3 -> 5 optimiser steps, the last of one micro-batch
    cfg = load_config(None, [*BASE, "model.name=mlp", "model.width=16", "data.batch_size=16", "train.accum_steps=3",
                             "train.checkpoint_every=4"])
    results = fit(cfg, tmp_path / "run", data_root=data_root)
    assert results["effective_batch_size"] == 48
    assert results["effective_lr"] == pytest.approx(0.05 * 48 / 64)


def test_a_batch_of_one_is_refused_before_work_where_batchnorm_trains(tmp_path, data_root):
    with pytest.raises(ConfigError, match="data.batch_size: 1 .*BatchNorm"):
        fit(load_config(None, [*BASE, "model.name=mlp", "model.width=16", "data.batch_size=1"]), tmp_path / "bn",
            data_root=data_root)
    assert not (tmp_path / "bn").exists()
    # Without BatchNorm a batch of one trains (one epoch of 199 steps).
    results = fit(load_config(None, [*BASE, f"model.name={__name__}:no_norm_net", "data.batch_size=1",
                                     "train.epochs=1"]), tmp_path / "plain", data_root=data_root)
    records = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert results["epoch"] == 1 and "train_loss" in records[0]


def test_holding_the_data_on_the_device_changes_nothing_on_cpu(tmp_path, data_root):
    common = [*BASE, "model.name=mlp", "model.width=16", "data.batch_size=16", "data.augment=crop_flip"]
    fit(load_config(None, [*common, "data.on_device=false"]), tmp_path / "host", data_root=data_root)
    fit(load_config(None, [*common, "data.on_device=true"]), tmp_path / "device", data_root=data_root)
    a, b = _weights(tmp_path / "host"), _weights(tmp_path / "device")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_speed_options_are_validated():
    cfg = load_config(None, ["train.amp_dtype=bfloat16", "data.on_device=true", "train.compile=true"])
    assert cfg.train.amp_dtype == "bfloat16" and cfg.data.on_device == "true" and cfg.train.compile
    for bad, key in (("train.amp_dtype=float8", "train.amp_dtype"), ("train.accum_steps=0", "train.accum_steps"),
                     ("train.checkpoint_every=-1", "train.checkpoint_every"), ("data.on_device=gpu", "data.on_device")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])
