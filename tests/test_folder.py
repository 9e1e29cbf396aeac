"""ImageFolder-style datasets on tiny generated trees: class ids, natural counts, LT subsampling, errors."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from longtail.config import DataConfig
from longtail.data import build_data
from longtail.errors import ConfigError


def write_folder(root: Path, counts: dict[str, int], splits=("train", "test"), test_per_class: int = 1) -> Path:
    for split in splits:
        for name, n in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n if split == "train" else test_per_class):
                Image.new("RGB", (20 + i, 16), (10 * i, 100, 200)).save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"name": "folder", "profile": "none", "image_size": 16, **kw})


def test_sorted_class_names_and_natural_counts(tmp_path):
    write_folder(tmp_path, {"zebra": 2, "ant": 6, "moth": 3})
    (tmp_path / "train/ant/notes.txt").write_text("not an image")
    (tmp_path / "train/ant/.hidden.jpg").write_bytes(b"")
    (tmp_path / "train/.cache").mkdir()
    (tmp_path / "train/ant/.ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train/ant/.ipynb_checkpoints/copy.jpg")
    data = build_data(cfg(), tmp_path)
    assert data.class_names == ["ant", "moth", "zebra"]
    assert data.class_counts == [6, 3, 2]
    assert data.val is None and len(data.test) == 3
    assert data.train.labels.tolist() == [0] * 6 + [1] * 3 + [2] * 2
    x, y, _ = next(data.train.batches(11, sampler="instance", seed=0, epoch=0))
    assert x.shape == (11, 3, 16, 16) and sorted(y.tolist()) == data.train.labels.tolist()


def test_exp_profile_subsamples_natural_counts(tmp_path):
    write_folder(tmp_path, {"a": 10, "b": 10, "c": 10})
    data = build_data(cfg(profile="exp", imbalance=10, selection="first"), tmp_path)
    assert data.class_counts == [10, 3, 1]  # int(10 * 0.1 ** (i / 2))
    assert data.train.indices.tolist() == list(range(10)) + [10, 11, 12] + [20]  # first files of each class


def test_profile_none_records_the_measured_imbalance_and_thresholds_rule(tmp_path):
    write_folder(tmp_path, {"a": 6, "b": 3, "c": 2})
    data = build_data(cfg(), tmp_path)
    assert data.imbalance == 3.0 and cfg().imbalance == 100  # measured, not the unused data.imbalance
    assert build_data(cfg(val_per_class=1), tmp_path).imbalance == 5.0  # 5 / 1 after the hold-out
    assert data.thresholds_rule == "standard (> 100 / < 20): folder, 3 classes"
    assert data.default_thresholds == (100, 20)  # 1000 / 200 is CIFAR-10-LT's protocol, not every 3-class set
    with pytest.raises(ConfigError, match="lower data.val_per_class to at most 1") as info:
        build_data(cfg(val_per_class=2), tmp_path)
    assert "data.imbalance" not in str(info.value)


def test_val_folder_and_val_per_class(tmp_path):
    write_folder(tmp_path, {"a": 4, "b": 3}, splits=("train", "val", "test"))
    assert len(build_data(cfg(), tmp_path).val) == 2
    held_out = build_data(cfg(val_per_class=1), tmp_path)
    assert held_out.class_counts == [3, 2] and held_out.val.labels.tolist() == [0, 1]


def test_unknown_class_in_test_errors_or_is_skipped(tmp_path, caplog):
    write_folder(tmp_path, {"a": 2, "b": 2})
    write_folder(tmp_path, {"stranger": 1}, splits=("test",))
    with pytest.raises(ConfigError, match=r"test/stranger: class folder not among the training classes"):
        build_data(cfg(), tmp_path)
    with caplog.at_level(logging.WARNING):
        data = build_data(cfg(on_bad_sample="skip"), tmp_path)
    assert len(data.test) == 2 and "skipped 1 bad sample(s)" in caplog.text


def test_layout_errors(tmp_path):
    with pytest.raises(ConfigError, match="no train/ and test/ folders"):
        build_data(cfg(), tmp_path)
    write_folder(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "train/empty").mkdir()
    with pytest.raises(ConfigError, match=r"train/empty: class folder without images"):
        build_data(cfg(), tmp_path)


def test_eval_pass_is_deterministic_and_in_file_order(tmp_path):
    write_folder(tmp_path, {"a": 3, "b": 2}, test_per_class=2)
    data = build_data(cfg(augment="crop_flip"), tmp_path)
    first = list(data.test.batches(3, sampler=None, seed=0, epoch=0))
    again = list(data.test.batches(3, sampler=None, seed=9, epoch=4))
    assert [b[2].tolist() for b in first] == [[0, 1, 2], [3]]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # no augmentation in evaluation
