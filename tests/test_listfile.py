"""List-file datasets on tiny generated image trees: parsing, remap, errors with file:line, skip mode,
size checks, the image transforms, and batches through the shared samplers."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from PIL import Image

from longtail import progress
from longtail.inference import collect_features
from longtail.config import DataConfig, ModelConfig
from longtail.data import ClassBalancedSampler, build_data
from longtail.data.image_transforms import (IMAGENET_MEAN, IMAGENET_STD, ImageTransform, color_jitter, decode_image,
                                            random_resized_crop_box, sample_generator)
from longtail.data.listfile import Benchmark, PathRemap, build_listfile, check_size
from longtail.errors import ConfigError
from longtail.methods.weight_balancing import CachedFeatures
from longtail.models import build_model

TINY = Benchmark("tiny", "Tiny_LT", 3, {"train": ("train.txt", 9), "val": ("val.txt", 3), "test": ("test.txt", 3)})
TRAIN_COUNTS = [5, 3, 1]


def write_image(path: Path, label: int, size: tuple[int, int] = (40, 30), seed: int = 0) -> None:
    """A small noisy image whose mean colour depends on the label (PNG or JPEG by suffix)."""
    rng = np.random.default_rng(seed)
    base = np.array([60 + 80 * label, 120, 200 - 80 * label], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_tiny(root: Path, train_counts=TRAIN_COUNTS, prefix: str = "") -> Path:
    """root/Tiny_LT/{train,val,test}.txt and the images they list (train/cK/iN.jpg, test/cK/...png)."""
    base = root / "Tiny_LT"
    lines = {"train": [], "val": [], "test": []}
    for c, n in enumerate(train_counts):
        for i in range(n):
            rel = f"train/c{c}/i{i}.jpg"
            write_image(base / rel, c, size=(40 + 7 * i, 30 + 5 * c), seed=10 * c + i)
            lines["train"].append(f"{prefix}{rel} {c}")
        for split in ("val", "test"):
            rel = f"{split}/c{c}/x.png"
            write_image(base / rel, c, seed=100 + c)
            lines[split].append(f"{prefix}{rel} {c}")
    for split, rows in lines.items():
        (base / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return base


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"profile": "none", "image_size": 16, "batch_size": 4, **kw})


def test_reads_lists_with_natural_counts_and_line_indices(tmp_path):
    write_tiny(tmp_path)
    data = build_listfile(cfg(), tmp_path, TINY)
    assert data.class_counts == TRAIN_COUNTS
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 3)
    assert sorted(data.train.indices.tolist()) == list(range(9))  # 0-based lines of the train file
    assert data.train.labels.tolist() == [0] * 5 + [1] * 3 + [2]
    assert data.mean == IMAGENET_MEAN and data.in_channels == 3 and data.image_size == 16
    x, y, idx = next(data.test.batches(8, sampler=None, seed=0, epoch=0))
    assert x.dtype == torch.float32 and x.shape == (3, 3, 16, 16)
    assert y.tolist() == [0, 1, 2] and idx.tolist() == [0, 1, 2]
    assert torch.equal(data.test.to_input(x, "cpu", train=False), x)


def test_exp_profile_subsamples_the_train_list(tmp_path):
    write_tiny(tmp_path, train_counts=[8, 8, 8])
    data = build_listfile(cfg(profile="exp", imbalance=8), tmp_path, TINY)
    assert data.class_counts == [8, 2, 1]  # int(8 * (1/8) ** (i/2))


def test_profile_none_records_the_measured_imbalance(tmp_path):
    write_tiny(tmp_path)
    data = build_listfile(cfg(), tmp_path, TINY)  # data.imbalance keeps its default, 100
    assert data.imbalance == 5.0  # 5 / 1 train images, as ImageNet-LT's 1280 / 5 = 256
    # the 10-class protocol is CIFAR-10-LT's and Fashion-MNIST-LT's, not every dataset of <= 10 classes
    assert data.thresholds_rule == "standard (> 100 / < 20): tiny, 3 classes"
    assert data.default_thresholds == (100, 20)
    write_tiny(tmp_path / "flat", train_counts=[8, 8, 8])
    assert build_listfile(cfg(), tmp_path / "flat", TINY).imbalance == 1.0
    assert build_listfile(cfg(profile="exp", imbalance=8), tmp_path / "flat", TINY).imbalance == 8.0


def test_path_remap_longest_prefix_and_absolute(tmp_path):
    remap = PathRemap({"data_256/": "train/", "data_256/a/": "easy/", "d": "D"})
    assert remap("data_256/a/x.jpg") == "easy/x.jpg" and remap("data_256/b/x.jpg") == "train/b/x.jpg"
    assert remap("dx.jpg") == "Dx.jpg" and remap("val/x.jpg") == "val/x.jpg"
    base = write_tiny(tmp_path, prefix="places365_standard/")
    data = build_listfile(cfg(path_remap={"places365_standard/": str(base) + "/"}), tmp_path, TINY)
    assert len(data.train) == 9
    with pytest.raises(ConfigError, match="empty old prefix"):
        build_listfile(cfg(path_remap={"": "x/"}), tmp_path, TINY)


@pytest.mark.parametrize("line, message", [
    ("train/c0/i0.jpg", r"train.txt:3: expected 'relative/path label'"),
    ("train/c0/i0.jpg zero", r"train.txt:3: the label 'zero' is not an integer"),
    ("train/c0/i0.jpg 3", r"train.txt:3: label 3 is outside 0..2"),
    ("train/c0/i0.jpg -1", r"train.txt:3: label -1 is outside 0..2"),
    ("train/c0/nope.jpg 0", r"train.txt:3: image .*nope.jpg does not exist"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    base = write_tiny(tmp_path)
    rows = (base / "train.txt").read_text().splitlines()
    rows.insert(2, line)
    (base / "train.txt").write_text("\n".join(rows) + "\n")
    with pytest.raises(ConfigError, match=message):
        build_listfile(cfg(), tmp_path, TINY)


def test_skip_mode_counts_and_logs_every_kind(tmp_path, caplog):
    base = write_tiny(tmp_path)
    rows = (base / "train.txt").read_text().splitlines()
    rows += ["broken", "train/c0/i0.jpg 7", "train/c1/gone.jpg 1", ""]
    (base / "train.txt").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        data = build_listfile(cfg(on_bad_sample="skip"), tmp_path, TINY)
    assert len(data.train) == 9 and data.class_counts == TRAIN_COUNTS
    assert "skipped 3 bad sample(s)" in caplog.text
    assert "train.txt:10: expected" in caplog.text and "train.txt:12: image" in caplog.text
    # 12 non-blank lines against a published 9: the size check warns
    assert "12 lines, but the published tiny train split has 9" in caplog.text


def test_unreadable_image_errors_or_is_skipped_at_decode_time(tmp_path, caplog):
    base = write_tiny(tmp_path)
    (base / "test/c1/x.png").write_bytes(b"not an image")
    data = build_listfile(cfg(), tmp_path, TINY)
    with pytest.raises(ConfigError, match=r"test.txt:2: cannot read image .*x.png"):
        list(data.test.batches(8, sampler=None, seed=0, epoch=0))
    data = build_listfile(cfg(on_bad_sample="skip"), tmp_path, TINY)
    with caplog.at_level(logging.WARNING):
        batches = list(data.test.batches(2, sampler=None, seed=0, epoch=0))
    assert [b[2].tolist() for b in batches] == [[0], [2]]  # the bad sample is dropped from its batch
    assert "skipped 1 bad sample(s)" in caplog.text


def test_skip_that_would_desynchronise_processes_is_an_error(tmp_path):
    base = write_tiny(tmp_path, train_counts=[2, 1, 1])  # 4 images: rank 0 takes 2 per epoch with world=2
    data = build_listfile(cfg(on_bad_sample="skip"), tmp_path, TINY)
    order = torch.cat([i for _, _, i in data.train.batches(2, sampler="instance", seed=0, epoch=0, rank=0, world=2)])
    (base / data.train.items.paths[order[0]]).write_bytes(b"not an image")
    assert len(next(data.train.batches(2, sampler="instance", seed=0, epoch=0))[1]) == 1  # one process: skipped
    with pytest.raises(ConfigError, match=r"batch of rank 0 kept 1 of 2 images .* 2 processes"):
        list(data.train.batches(2, sampler="instance", seed=0, epoch=0, rank=0, world=2))


def test_cached_features_refuse_a_split_with_skipped_images(tmp_path):
    base = write_tiny(tmp_path)
    data = build_listfile(cfg(on_bad_sample="skip", augment="none"), tmp_path, TINY)
    model = build_model(ModelConfig(name="mlp", width=8), 3, 3, 16)
    assert len(CachedFeatures(data.train, collect_features(model, data.train, torch.device("cpu"))[0])) == 9
    (base / "train/c0/i1.jpg").write_bytes(b"not an image")
    features, _ = collect_features(model, data.train, torch.device("cpu"))
    with pytest.raises(ConfigError, match="cache_features: features for 8 of the 9 training images"):
        CachedFeatures(data.train, features)


def test_missing_split_file_and_size_check(tmp_path, caplog):
    with pytest.raises(ConfigError, match=r"split file .*train.txt does not exist .*docs/large_datasets.md"):
        build_listfile(cfg(), tmp_path, TINY)
    with caplog.at_level(logging.WARNING):
        assert check_size(Path("l.txt"), 115_846, 115_846, "imagenet_lt", "train")
        assert not check_size(Path("l.txt"), 1000, 115_846, "imagenet_lt", "train")
    assert caplog.text.count("published imagenet_lt train split has 115846") == 1


def test_val_list_choices(tmp_path):
    base = write_tiny(tmp_path, train_counts=[5, 5, 5])
    (base / "val.txt").unlink()
    assert build_listfile(cfg(), tmp_path, TINY).val is None  # the default val list is optional
    with pytest.raises(ConfigError, match="val.txt does not exist"):
        build_listfile(cfg(val_list="val.txt"), tmp_path, TINY)  # an explicit one is not
    data = build_listfile(cfg(val_per_class=1), tmp_path, TINY)
    assert len(data.val) == 3 and data.class_counts == [4, 4, 4]
    assert not set(data.val.indices.tolist()) & set(data.train.indices.tolist())


def test_imagenet_lt_through_the_registry(tmp_path, caplog):
    """Default file names under <root>/ImageNet_LT, 1000 classes, iNat-style missing val, size warnings."""
    base = tmp_path / "ImageNet_LT"
    for c in range(3):
        write_image(base / f"train/n{c}/a.JPEG", c)
    (base / "ImageNet_LT_train.txt").write_text("".join(f"train/n{c % 3}/a.JPEG {c}\n" for c in range(1000)))
    (base / "ImageNet_LT_test.txt").write_text("train/n0/a.JPEG 0\ntrain/n1/a.JPEG 999\n")
    with caplog.at_level(logging.WARNING):
        data = build_data(cfg(name="imagenet_lt"), tmp_path)
    assert data.num_classes == 1000 and data.class_counts == [1] * 1000 and data.val is None
    assert data.default_thresholds == (100, 20) and len(data.test) == 2
    assert "published imagenet_lt train split has 115846" in caplog.text
    assert "published imagenet_lt test split has 50000" in caplog.text


def test_samplers_and_rank_slices(tmp_path):
    write_tiny(tmp_path, train_counts=[12, 3, 1])
    data = build_listfile(cfg(), tmp_path, TINY)
    seen = torch.cat([y for _, y, _ in data.train.batches(4, sampler="class_balanced", seed=0, epoch=0)])
    assert len(seen) == 16 and torch.bincount(seen, minlength=3).min() >= 2  # vs 1 of 16 for class 2 naturally
    parts = [torch.cat([i for _, _, i in data.train.batches(3, sampler="instance", seed=1, epoch=2, rank=r, world=2)])
             for r in range(2)]
    assert sorted(torch.cat(parts).tolist()) == list(range(16)) and len(parts[0]) == len(parts[1]) == 8
    assert data.train.num_batches(3, world=2) == 3 and data.train.num_batches(3, world=2, drop_last=True) == 2


def test_a_file_split_is_a_dataset_of_evaluation_images(tmp_path):
    base = write_tiny(tmp_path)
    data = build_listfile(cfg(), tmp_path, TINY)
    x, y, _ = next(data.train.batches(9, sampler=None, seed=0, epoch=0))
    image, label = data.train[6]
    assert torch.equal(image, x[6]) and label == y[6] == 1  # what evaluation decodes: resized, normalised
    sampler = ClassBalancedSampler(data.train.labels, data.num_classes, seed=0)
    xs, ys = next(iter(DataLoader(data.train, batch_size=4, sampler=sampler)))
    assert xs.shape == (4, 3, 16, 16) and ys.tolist() == data.train.labels[list(sampler)[:4]].tolist()
    (base / "train/c1/i0.jpg").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=r"train.txt:6: cannot read image .*i0.jpg"):
        data.train[5]


def test_batches_are_the_same_with_and_without_workers(tmp_path):
    write_tiny(tmp_path)
    serial = build_listfile(cfg(num_workers=0), tmp_path, TINY)
    parallel = build_listfile(cfg(num_workers=2), tmp_path, TINY)
    a = list(serial.train.batches(4, sampler="instance", seed=3, epoch=1))
    b = list(parallel.train.batches(4, sampler="instance", seed=3, epoch=1))
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    c = torch.cat([x for x, _, _ in serial.train.batches(4, sampler="instance", seed=3, epoch=2)])
    assert not torch.equal(torch.cat([x for x, _, _ in a]), c)  # another epoch, other augmentations


# --------------------------------------------------------------------------- transforms


def test_transform_shapes_for_odd_sizes_and_modes(tmp_path):
    Image.new("L", (7, 50), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (300, 20), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    for name in ("gray.png", "rgba.png"):
        image = decode_image(tmp_path / name)
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        for augment in ("crop_flip", "flip", "none"):
            out = ImageTransform(24, augment=augment)(image, sample_generator(0, 0, 1))
            assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_test_transform_resizes_shorter_side_then_centre_crops():
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    image[:, :, 100:] = 255  # right half white
    out = ImageTransform(56, mean=(0, 0, 0), std=(1, 1, 1))(image, None)
    assert out.shape == (3, 56, 56)  # 100x200 -> 64x128 -> centre 56x56: columns 36..91 of 128
    assert torch.allclose(out[:, :, :27], torch.zeros(1)) and torch.allclose(out[:, :, 29:], torch.ones(1))


def test_transform_normalises_with_imagenet_statistics():
    colour = torch.tensor(IMAGENET_MEAN) * 255
    image = colour.round().to(torch.uint8).view(3, 1, 1).expand(3, 40, 40).contiguous()
    out = ImageTransform(16)(image, None)
    assert out.abs().max() < 0.5 / 255 / min(IMAGENET_STD)


def test_train_transform_is_deterministic_per_sample_and_epoch(tmp_path):
    write_image(tmp_path / "a.jpg", 1, size=(64, 48))
    image = decode_image(tmp_path / "a.jpg")
    t = ImageTransform(32, augment="crop_flip")
    first = t(image, sample_generator(5, 0, 7))
    assert torch.equal(first, t(image, sample_generator(5, 0, 7)))
    assert not torch.equal(first, t(image, sample_generator(5, 1, 7)))
    assert not torch.equal(first, t(image, sample_generator(5, 0, 8)))


def test_random_resized_crop_box_stays_in_range():
    g = torch.Generator().manual_seed(0)
    for h, w in ((100, 100), (30, 400), (400, 30), (1, 1)):
        for _ in range(50):
            top, left, ch, cw = random_resized_crop_box(h, w, g)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch >= 1 and cw >= 1
            if (h, w) == (100, 100):
                assert 0.08 * 1e4 * 0.9 <= ch * cw and 3 / 4 * 0.9 <= cw / ch <= 4 / 3 * 1.1


def test_color_jitter_zero_strength_is_identity_and_clamps():
    x = torch.rand(3, 8, 8)
    assert torch.allclose(color_jitter(x, torch.Generator().manual_seed(0), strength=0.0), x)
    y = color_jitter(x, torch.Generator().manual_seed(0))
    assert y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)


def test_reading_a_list_reports_its_lines_and_the_folders_it_checks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)  # stderr is no terminal here: a plain line per item
    write_tiny(tmp_path)
    build_listfile(cfg(), tmp_path, TINY)
    ends = [line.split(",")[0] for line in capsys.readouterr().err.splitlines() if " in " in line]
    assert "read train.txt: 9 lines in 0s" in ends
    assert "check images of train.txt: 3 folders in 0s" in ends  # train/c0, c1, c2


def test_the_policy_and_cutout_run_in_the_workers_seeded_per_sample(tmp_path):
    """data.augment: none with a policy still draws: from each sample's generator, whatever the workers."""
    write_tiny(tmp_path)
    data = build_listfile(cfg(augment="none", policy="randaugment", randaugment_m=20, cutout=6), tmp_path, TINY)

    def epoch(workers: int) -> torch.Tensor:
        data.train.num_workers = workers
        return torch.cat([x for x, _, _ in data.train.batches(4, sampler="instance", seed=3, epoch=1)])

    first = epoch(0)
    assert torch.equal(first, epoch(0)) and torch.equal(first, epoch(2))
    plain = torch.cat([x for x, _, _ in data.train.batches(4, sampler=None)])
    assert first.shape == plain.shape and not torch.equal(first.sort(0).values, plain.sort(0).values)
    assert not torch.equal(first, torch.cat([x for x, _, _ in data.train.batches(4, sampler="instance", seed=3,
                                                                                 epoch=2)]))


def test_a_test_list_naming_an_image_twice_is_refused(tmp_path):
    base = write_tiny(tmp_path)
    (base / "test.txt").write_text((base / "test.txt").read_text() + "test/c0/x.png 0\n")
    with pytest.raises(ConfigError, match=r"tiny test split: image test/c0/x.png is listed twice \(lines 1 and 4 of "):
        build_listfile(cfg(), tmp_path, TINY)
