"""Multi-label: the task module, losses against hand-computed values, AP against torchmetrics, the class-aware
sampler, MORE's multi-label weighting and KL, the datasets (list / CSV, VOC-MLT, COCO-MLT, CIFAR-10 mosaics)
from tiny files in their exact formats, and training end to end."""
from __future__ import annotations

import json
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchmetrics.functional.classification import binary_average_precision

from fake_data import write_cifar10, write_fashion_mnist
from longtail.analysis import analyze_run
from longtail.cli import main
from longtail.config import DataConfig, from_dict
from longtail.data import build_data
from longtail.data.describe import describe, format_description
from longtail.data.mosaic import mosaic_images, mosaic_tiles, tile_probabilities
from longtail.data.multilabel import read_class_split
from longtail.data.samplers import class_aware_order, epoch_order, rank_slice
from longtail.engine import evaluate_run, fit
from longtail.errors import ConfigError
from longtail.losses import (asymmetric_loss, bce_loss, class_balanced_weights, distribution_balanced_loss,
                             focal_bce_loss, MultiLabelLoss)
from longtail.methods.more import discrepancy, more_loss, sample_weights
from longtail.methods.posthoc import run_posthoc
from longtail.metrics import average_precision, f1_scores, gather_unique, summarize_multilabel
from longtail.report import report
from longtail.task import MULTI, SINGLE


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce(z: float, y: int) -> float:
    return -math.log(sig(z)) if y else -math.log(1 - sig(z))


# ----------------------------------------------------------------------------- losses


def test_bce_on_multi_hot_is_the_mean_over_every_binary_term():
    z, y = torch.tensor([[0.0, 2.0], [-1.0, 0.5]]), torch.tensor([[1, 0], [1, 1]])
    expected = (bce(0, 1) + bce(2, 0) + bce(-1, 1) + bce(0.5, 1)) / 4
    assert bce_loss(z, y).item() == pytest.approx(expected, rel=1e-6)


def test_focal_bce_by_hand():
    z, y = torch.tensor([[1.0, -0.5]]), torch.tensor([[1, 0]])
    p_t = [sig(1.0), 1 - sig(-0.5)]
    expected = ((1 - p_t[0]) ** 2 * bce(1.0, 1) + (1 - p_t[1]) ** 2 * bce(-0.5, 0)) / 2
    assert focal_bce_loss(z, y, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_cb_bce_weights_each_class_term_by_its_effective_number():
    counts, beta = [1, 3], 0.5
    raw = [(1 - beta) / (1 - beta ** 1), (1 - beta) / (1 - beta ** 3)]
    w = [2 * r / sum(raw) for r in raw]  # normalised to sum to the number of classes
    assert class_balanced_weights(counts, beta).tolist() == pytest.approx(w, rel=1e-6)
    cfg = from_dict({"loss": {"name": "cb_bce", "cb_bce_beta": beta}}).loss
    z, y = torch.tensor([[0.3, -0.2]]), torch.tensor([[0, 1]])
    expected = (w[0] * bce(0.3, 0) + w[1] * bce(-0.2, 1)) / 2
    assert MultiLabelLoss(cfg, counts, 4)(z, y, 0.0).item() == pytest.approx(expected, rel=1e-6)


def db_by_hand(z, y, counts, n_images, alpha, beta, mu, lam, kappa, focal=None):
    """DB-Loss's ResampleLoss, term by term, in plain Python."""
    total = 0.0
    for zi, yi in zip(z, y):
        repeat = sum(1 / counts[k] for k in range(len(counts)) if yi[k])
        for k in range(len(counts)):
            r = (1 / counts[k]) / repeat
            w = sig(beta * (r - mu)) + alpha
            zk = zi[k] - kappa * math.log(n_images / counts[k] - 1) / lam
            if not yi[k]:
                zk, w = zk * lam, w / lam
            term = w * bce(zk, yi[k])
            if focal is not None:
                p_t = math.exp(-bce(zk, yi[k]))
                term *= 2.0 * (1 - p_t) ** focal
            total += term
    return total / (len(z) * len(counts))


@pytest.mark.parametrize("focal", [None, 2.0])
def test_distribution_balanced_loss_by_hand(focal):
    z, y, counts = [[0.5, -1.0, 0.2], [1.5, 0.3, -2.0]], [[1, 0, 0], [1, 1, 0]], [2, 8, 5]
    got = distribution_balanced_loss(torch.tensor(z), torch.tensor(y), counts, 10, alpha=0.1, beta=10.0, mu=0.3,
                                     neg_scale=5.0, kappa=0.05, focal_gamma=focal, focal_balance=2.0)
    assert got.item() == pytest.approx(db_by_hand(z, y, counts, 10, 0.1, 10.0, 0.3, 5.0, 0.05, focal), rel=1e-5)


def test_distribution_balanced_loss_of_a_sample_without_labels_is_finite():
    z, y = torch.tensor([[0.5, -1.0]]), torch.tensor([[0, 0]])
    got = distribution_balanced_loss(z, y, [2, 8], 10)
    assert math.isfinite(got.item())
    # No positive: r is infinite, every weight 1 + alpha, before the negative scaling.
    expected = sum((1.1 / 5) * bce(5 * (zk - 0.05 * math.log(10 / n - 1) / 5), 0) for zk, n in ((0.5, 2), (-1.0, 8))) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_asymmetric_loss_by_hand():
    z, y = torch.tensor([[0.4, -0.3, 2.0]]), torch.tensor([[1, 0, 0]])
    p = [sig(v) for v in (0.4, -0.3, 2.0)]
    pos = (1 - p[0]) ** 1 * math.log(p[0])
    negs = [max(q - 0.05, 0) ** 4 * math.log(1 - max(q - 0.05, 0)) for q in p[1:]]
    expected = -(pos + sum(negs)) / 3
    assert asymmetric_loss(z, y, gamma_neg=4, gamma_pos=1, clip=0.05).item() == pytest.approx(expected, rel=1e-5)


def test_class_weighted_multilabel_losses_refuse_a_class_on_every_or_no_image():
    cfg = from_dict({"loss": {"name": "dbl"}}).loss
    with pytest.raises(ConfigError, match="dbl needs every class on at least one training image"):
        MultiLabelLoss(cfg, [0, 3], 4)


# ----------------------------------------------------------------------------- metrics


def test_average_precision_with_ties_by_hand_and_against_torchmetrics():
    scores, pos = torch.tensor([0.9, 0.8, 0.8, 0.1]), torch.tensor([1, 0, 1, 0])
    assert average_precision(scores, pos) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision(scores, torch.zeros(4)) is None
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.randint(0, 6, (40,), generator=gen).double() / 5  # many ties
        y = (torch.rand(40, generator=gen) < 0.3).long()
        if y.sum() == 0:
            continue
        assert average_precision(s, y) == pytest.approx(float(binary_average_precision(s, y)), abs=1e-6)  # float32 there


def test_f1_micro_and_macro_by_hand():
    pred = torch.tensor([[1, 0], [1, 1], [0, 0]]).bool()
    true = torch.tensor([[1, 0], [0, 1], [0, 1]]).bool()
    # class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 1 fp 0 fn 1 -> 2/3; micro: tp 2 fp 1 fn 1 -> 4/6
    micro, macro = f1_scores(pred, true)
    assert micro == pytest.approx(100 * 4 / 6) and macro == pytest.approx(100 * 2 / 3)


def test_f1_counts_a_logit_of_exactly_zero_as_negative_and_any_positive_logit_as_positive():
    # DB-Loss's eval_F1 predicts logit > 0; 1e-20 rounds to sigmoid 0.5 exactly in float64.
    logits = torch.tensor([[0.0, 1e-20], [0.0, 1e-20]])
    targets = torch.tensor([[1, 1], [0, 1]])
    m = summarize_multilabel(logits, targets, [50, 10], ([0], [1], []))
    # class 0: no prediction, 1 positive -> F1 0; class 1: both predicted, both positive -> F1 1
    assert m["macro_f1"] == pytest.approx(50.0) and m["micro_f1"] == pytest.approx(100 * 4 / 5)


def test_summarize_multilabel_groups_and_skips_classes_without_test_positives():
    logits = torch.tensor([[2.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    m = summarize_multilabel(logits, targets, [50, 10, 5], ([0], [1], [2]))
    assert m["per_class_ap"][0] == pytest.approx(100.0) and m["per_class_ap"][1] == pytest.approx(100.0)
    assert m["per_class_ap"][2] is None and m["map_tail"] is None
    assert m["map"] == pytest.approx(100.0) and m["map_head"] == pytest.approx(100.0)


def test_gather_unique_drops_padding_rows_of_multi_hot_targets():
    logits = torch.arange(10.0).view(5, 2)
    targets = torch.tensor([[1, 0], [0, 1], [1, 1], [1, 0], [0, 1]])
    idx = torch.tensor([2, 0, 1, 2, 0])  # two padded repeats
    z, y, i = gather_unique(logits, targets, idx)
    assert i.tolist() == [0, 1, 2] and y.tolist() == [[0, 1], [1, 1], [1, 0]]


# ----------------------------------------------------------------------------- sampler


def test_class_aware_sampler_cycles_classes_in_runs_of_three():
    multi = torch.zeros(20, 2, dtype=torch.long)
    multi[:18, 0] = 1
    multi[18:, 1] = 1  # class 1: 2 images, class 0: 18
    g = torch.Generator().manual_seed(0)
    order = class_aware_order(multi, 24, g)
    runs = order.view(-1, 3)
    from_class_1 = [bool(multi[r, 1].all()) for r in runs]
    assert sum(from_class_1) == 4  # every round draws each class once: 8 runs, 4 of class 1
    assert set(order[multi[order, 1] > 0].tolist()) == {18, 19}
    # Deterministic per (seed, epoch) and rank-sliced like the other samplers.
    a = epoch_order(multi, 2, "class_aware", seed=3, epoch=1)
    assert torch.equal(a, epoch_order(multi, 2, "class_aware", seed=3, epoch=1)) and len(a) == 20
    assert not torch.equal(a, epoch_order(multi, 2, "class_aware", seed=3, epoch=2))
    parts = torch.cat([rank_slice(a, r, 2) for r in range(2)])
    assert sorted(parts.tolist()) == sorted(a.tolist())


def test_class_aware_sampler_refuses_class_ids():
    with pytest.raises(ConfigError, match="class_aware samples by the positive labels"):
        epoch_order(torch.tensor([0, 1, 1]), 2, "class_aware", seed=0, epoch=0)


# ----------------------------------------------------------------------------- the task decides


@pytest.mark.parametrize("override, key", [
    ({"loss": {"name": "la"}}, "loss.name: la is a single-label"),
    ({"loss": {"name": "bce"}, "data": {"sampler": "class_balanced"}}, "data.sampler: class_balanced"),
    ({"loss": {"name": "bce"}, "method": {"name": "ewb"}}, "method.name: ewb"),
    ({"loss": {"name": "bce"}, "method": {"name": "tau_norm"}}, "method.name: tau_norm"),
    ({"loss": {"name": "bce"}, "model": {"head": "etf"}}, "model.head"),
    ({"loss": {"name": "bce"}, "posthoc": {"kind": "additive", "tau": 1.0}}, "posthoc.kind"),
    ({"loss": {"name": "bce", "drw_start": 0.8}}, "loss.drw_start"),
    ({"loss": {"name": "bce"}, "train": {"track_every": 1}}, "train.track_every"),
])
def test_multilabel_refuses_softmax_only_options_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MULTI.check(from_dict(override))


def test_single_label_refuses_multilabel_options():
    with pytest.raises(ConfigError, match="loss.name: dbl is a multi-label"):
        SINGLE.check(from_dict({"loss": {"name": "dbl"}}))
    with pytest.raises(ConfigError, match="data.sampler: class_aware"):
        SINGLE.check(from_dict({"data": {"sampler": "class_aware"}}))
    MULTI.check(from_dict({"loss": {"name": "db_focal"}, "data": {"sampler": "class_aware"}}))  # accepted


def test_dbl_without_class_aware_sampling_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        MULTI.check(from_dict({"loss": {"name": "dbl"}}))
    assert "class-aware sampling" in caplog.text


# ----------------------------------------------------------------------------- MORE


def test_more_multilabel_weights_and_bernoulli_kl_by_hand():
    prior = torch.tensor([0.6, 0.3, 0.1])
    y = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert sample_weights(y, prior, "multi_label").tolist() == pytest.approx([0.35, 0.1])
    z_full, z_gen = torch.tensor([[1.0, -1.0, 0.0], [0.5, 0.5, 0.5]]), torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])

    def kl(a: float, b: float) -> float:
        p, q = sig(a), sig(b)
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    per_sample = discrepancy(z_full, z_gen, "kl", "multi_label")
    assert per_sample.tolist() == pytest.approx([kl(1, 0) + kl(-1, 0) + 0.0, 0.0], abs=1e-7)
    assert more_loss(z_full, z_gen, y, prior, "kl", "multi_label").item() == pytest.approx(
        0.35 * (kl(1, 0) + kl(-1, 0)) / 2, rel=1e-6)
    assert discrepancy(z_full, z_gen, "l2", "multi_label").tolist() == pytest.approx([2.0, 0.0])


# ----------------------------------------------------------------------------- CIFAR-10 mosaics


def test_mosaic_images_place_downscaled_tiles_in_the_four_quadrants():
    images = np.stack([np.full((3, 32, 32), v, dtype=np.uint8) for v in (10, 20, 30, 40)])
    images[0, :, 0, 0] = 14  # a 2x2 block averaging (14 + 10 * 3) / 4 = 11
    out = mosaic_images(images, np.array([[0, 1, 2, 3]]))
    assert out.shape == (1, 3, 32, 32)
    assert out[0, 0, 0, 0] == 11 and out[0, 0, 5, 5] == 10
    assert out[0, 0, 0, 20] == 20 and out[0, 0, 20, 0] == 30 and out[0, 0, 31, 31] == 40


def test_mosaic_tiles_follow_their_classes_and_cycle_a_short_class():
    labels = np.repeat(np.arange(3), 4)
    tiles = mosaic_tiles(labels, np.array([0.8, 0.15, 0.05]), 50, np.random.default_rng(0))
    assert tiles.shape == (50, 4)
    used = tiles[labels[tiles] == 0]
    assert len(used) > 4 and set(used.tolist()) == {0, 1, 2, 3}  # 4 images of class 0, cycled
    p = tile_probabilities(10, 100)
    assert p.sum() == pytest.approx(1) and p[0] / p[9] == pytest.approx(100)


@pytest.fixture
def cifar_root(tmp_path):
    write_cifar10(tmp_path / "root", train_per_class=30, test_per_class=10, noise=True)
    return tmp_path / "root"


def test_cifar10_mosaic_is_deterministic_long_tailed_and_described(cifar_root):
    cfg = DataConfig(name="cifar10_mosaic_mlt", mosaic_train_images=400, mosaic_test_images=100)
    data = build_data(cfg, cifar_root)
    again = build_data(cfg, cifar_root)
    assert data.task == "multi_label" and data.train.labels.shape == (400, 10)
    assert data.indices_sha256 == again.indices_sha256
    assert torch.equal(data.train.images, again.train.images)
    assert build_data(DataConfig(name="cifar10_mosaic_mlt", mosaic_train_images=400, subset_seed=1),
                      cifar_root).indices_sha256 != data.indices_sha256
    counts = data.class_counts
    assert counts[0] > counts[4] > counts[9] and 1 <= data.train.labels.sum(1).min() <= data.train.labels.sum(1).max() <= 4
    test_counts = data.test.class_counts()
    assert max(test_counts) < 3 * min(test_counts)  # uniform tile classes
    text = format_description(describe(cfg, cifar_root))
    assert data.indices_sha256 in text and "head: 3 classes   medium: 3   tail: 4 (published split)" in text
    assert "400 images carrying" in text


def test_fashion_mnist_mosaic_has_one_channel_28_pixel_mosaics(tmp_path):
    write_fashion_mnist(tmp_path, train_per_class=20, test_per_class=4)
    data = build_data(DataConfig(name="fashion_mnist_mosaic_mlt", mosaic_train_images=50, mosaic_test_images=12),
                      tmp_path)
    assert data.train.images.shape == (50, 1, 28, 28) and data.in_channels == 1 and data.image_size == 28
    assert data.task == "multi_label" and data.test.labels.shape == (12, 10)


# ----------------------------------------------------------------------------- list and CSV


def write_image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_list_dataset(root: Path, lines: list[str], csv: bool = False) -> DataConfig:
    root.mkdir(parents=True, exist_ok=True)
    (root / "names.txt").write_text("cat\ndog\nbird\n")
    for i in range(6):
        write_image(root / "img" / f"{i}.png", i)
    name = "train.csv" if csv else "train.txt"
    (root / name).write_text("\n".join(lines) + "\n")
    (root / "test.txt").write_text("img/0.png cat\nimg/1.png dog,bird\n")
    return DataConfig(name="multilabel_list", root=str(root), profile="none", train_list=name, test_list="test.txt",
                      class_names="names.txt", image_size=8)


def test_multilabel_list_reads_text_and_csv_forms_alike(tmp_path):
    text = build_data(write_list_dataset(tmp_path / "a", ["img/0.png cat,dog", "img/1.png bird", "img/2.png"]))
    csv = build_data(write_list_dataset(tmp_path / "b", ["path,labels", 'img/0.png,"cat,dog"', "img/1.png,bird",
                                                         "img/2.png,"], csv=True))
    for data in (text, csv):
        assert data.task == "multi_label" and data.class_names == ["cat", "dog", "bird"]
        assert data.train.labels.tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 0]]
        assert data.class_counts == [1, 1, 1] and data.default_thresholds == (99, 20)
    x, y, idx = next(text.train.batches(3, sampler=None, seed=0, epoch=0))
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 0]]


@pytest.mark.parametrize("line, message", [
    ("img/0.png cat,,dog", r"train.txt:2: an empty label"),
    ("img/0.png horse", r"train.txt:2: label 'horse' is not one of the 3 classes"),
    ("img/9.png cat", r"train.txt:2: image .*9.png does not exist"),
])
def test_multilabel_list_errors_name_file_and_line_or_skip_and_count(tmp_path, line, message):
    cfg = write_list_dataset(tmp_path, ["img/1.png dog", line])
    with pytest.raises(ConfigError, match=message):
        build_data(cfg)
    cfg.on_bad_sample = "skip"
    data = build_data(cfg)
    assert len(data.train) == 1 and data.train.items.skipped == 1


def test_unlabelled_images_are_kept_as_negatives_or_refused(tmp_path, caplog):
    cfg = write_list_dataset(tmp_path, ["img/1.png dog,cat,bird", "img/2.png"])
    with caplog.at_level(logging.INFO):
        assert build_data(cfg).train.labels[1].sum() == 0
    assert "1 of 2 images have no label" in caplog.text
    cfg.on_unlabelled = "error"
    with pytest.raises(ConfigError, match=r"train.txt:2: img/2.png has no label"):
        build_data(cfg)


def test_a_training_list_without_any_label_is_refused_and_unseen_classes_are_named(tmp_path, caplog, capsys):
    cfg = write_list_dataset(tmp_path, ["img/1.png", "img/2.png"])
    with pytest.raises(ConfigError, match=r"multilabel_list: no training image has any label \(.*train.txt\)"):
        build_data(cfg)
    # through the CLI: one line, exit 2, no run directory
    config = tmp_path / "run.yaml"
    data = {k: getattr(cfg, k) for k in ("name", "root", "profile", "train_list", "test_list", "class_names",
                                         "image_size")}
    config.write_text(yaml.safe_dump({"data": data, "loss": {"name": "bce"}, "model": {"name": "mlp", "width": 8},
                                      "train": {"epochs": 1}}))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no training image has any label" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    with caplog.at_level(logging.WARNING):
        build_data(write_list_dataset(tmp_path / "b", ["img/1.png dog", "img/2.png"]))
    assert "2 of 3 classes have no positive training image, so nothing teaches them: cat, bird" in caplog.text


@pytest.mark.parametrize("split", ["test", "val"])
def test_an_evaluation_list_naming_an_image_twice_is_refused(tmp_path, split):
    cfg = write_list_dataset(tmp_path, ["img/0.png cat", "img/1.png dog,bird"])
    (tmp_path / "eval.txt").write_text("img/2.png cat\nimg/3.png dog\n\nimg/2.png cat\n")
    setattr(cfg, f"{split}_list", "eval.txt")
    with pytest.raises(ConfigError, match=rf"multilabel_list {split} split: image img/2.png is listed twice "
                                          r"\(lines 1 and 4 of .*eval.txt\)"):
        build_data(cfg)
    cfg.test_list, cfg.val_list = "test.txt", None
    (tmp_path / "train.txt").write_text("img/0.png cat\nimg/0.png cat\n")  # training repeats are a choice
    assert len(build_data(cfg).train) == 2


def test_csv_list_needs_its_header(tmp_path):
    with pytest.raises(ConfigError, match=r"train.csv:1: a CSV list starts with the header 'path,labels'"):
        build_data(write_list_dataset(tmp_path, ["file,tags", "img/0.png,cat"], csv=True))


# ----------------------------------------------------------------------------- VOC-MLT and COCO-MLT


def voc_xml(names: list[tuple[str, int]]) -> str:
    objects = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in names)
    return f"<annotation><size><width>12</width><height>12</height></size>{objects}</annotation>"


def write_class_split(path: Path, head, middle, tail) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"head": set(head), "middle": set(middle), "tail": set(tail)}, protocol=2))


def write_voc(root: Path) -> None:
    devkit = root / "VOCdevkit"
    train = {"2008_000001": [("person", 0), ("dog", 1)], "2008_000002": [("cat", 0)], "2008_000003": [("person", 0)]}
    test = {"000001": [("aeroplane", 0)], "000002": [("person", 0), ("tvmonitor", 1)]}
    for year, images in (("VOC2012", train), ("VOC2007", test)):
        for image_id, objects in images.items():
            (devkit / year / "Annotations").mkdir(parents=True, exist_ok=True)
            (devkit / year / "Annotations" / f"{image_id}.xml").write_text(voc_xml(objects))
            write_image(devkit / year / "JPEGImages" / f"{image_id}.jpg")
    (devkit / "longtail2012").mkdir(parents=True, exist_ok=True)
    (devkit / "longtail2012" / "img_id.txt").write_text("\n".join(train) + "\n")
    (devkit / "VOC2007" / "ImageSets" / "Main").mkdir(parents=True)
    (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("\n".join(test) + "\n")
    write_class_split(devkit / "longtail2012" / "class_split.pkl", range(0, 6), range(6, 12), range(12, 20))


def test_voc_mlt_reads_xml_with_difficult_objects_as_positives_and_the_published_split(tmp_path, caplog):
    write_voc(tmp_path)
    with caplog.at_level(logging.WARNING):
        data = build_data(DataConfig(name="voc_mlt", profile="none", image_size=8), tmp_path)
    assert "published voc_mlt train split has 1142" in caplog.text  # the users' files are checked
    person, dog, cat, tv = 14, 11, 7, 19
    assert data.train.labels[0, person] == 1 and data.train.labels[0, dog] == 1  # dog is "difficult"
    assert data.class_counts[person] == 2 and data.class_counts[cat] == 1
    assert data.test.labels[1, tv] == 1 and len(data.test) == 2
    assert data.class_groups == (list(range(6)), list(range(6, 12)), list(range(12, 20)))
    x, _, _ = next(data.test.batches(2, sampler=None, seed=0, epoch=0))
    assert x.shape == (2, 3, 8, 8)


def test_voc_unknown_class_in_xml_is_an_error_naming_the_file(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "VOCdevkit" / "VOC2012" / "Annotations" / "2008_000002.xml").write_text(voc_xml([("unicorn", 0)]))
    with pytest.raises(ConfigError, match=r"img_id.txt:2: .*2008_000002.xml has an object of class 'unicorn'"):
        build_data(DataConfig(name="voc_mlt", profile="none"), tmp_path)


def test_class_split_must_partition_the_classes_and_pickles_are_restricted(tmp_path):
    write_class_split(tmp_path / "split.pkl", [0, 1], [2], [2])
    with pytest.raises(ConfigError, match="exactly once"):
        read_class_split(tmp_path / "split.pkl", 3)
    (tmp_path / "evil.pkl").write_bytes(b"\x80\x02cos\nsystem\nq\x00.")
    with pytest.raises(ConfigError, match="refusing to unpickle the global 'os.system'"):
        read_class_split(tmp_path / "evil.pkl", 3)


def box(image_id: int, category_id: int, bbox=(1.0, 2.0, 5.0, 4.0), area: float = 20.0, crowd: int = 0) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "area": area, "iscrowd": crowd}


def write_coco(root: Path, extra_train_annotations: tuple = ()) -> None:
    base = root / "coco"
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 2, "name": "bicycle"}]
    train = {"images": [{"id": 10, "file_name": "a.jpg"}, {"id": 11, "file_name": "b.jpg"},
                        {"id": 12, "file_name": "c.jpg"}],
             "annotations": [box(10, 1), box(10, 3), box(11, 2), box(12, 1), *extra_train_annotations],
             "categories": cats}
    val = {"images": [{"id": 20, "file_name": "v.jpg"}, {"id": 21, "file_name": "w.jpg"}],
           "annotations": [box(20, 3)], "categories": cats}
    (base / "annotations").mkdir(parents=True)
    (base / "annotations" / "instances_train2017.json").write_text(json.dumps(train))
    (base / "annotations" / "instances_val2017.json").write_text(json.dumps(val))
    for name in ("a", "b", "c"):
        write_image(base / "train2017" / f"{name}.jpg")
    for name in ("v", "w"):
        write_image(base / "val2017" / f"{name}.jpg")
    (base / "longtail2017").mkdir()
    (base / "longtail2017" / "img_id.pkl").write_text("12\n10\n11\n")  # DB-Loss's file is text despite its name
    write_class_split(base / "longtail2017" / "class_split.pkl", [0], [1], [2])


def test_coco_mlt_reads_instances_json_in_id_list_order_with_categories_by_id(tmp_path):
    write_coco(tmp_path)
    data = build_data(DataConfig(name="coco_mlt", profile="none", image_size=8), tmp_path)
    assert data.class_names == ["person", "bicycle", "car"]  # sorted by category id
    assert data.train.items.paths == ["train2017/c.jpg", "train2017/a.jpg", "train2017/b.jpg"]
    assert data.train.labels.tolist() == [[1, 0, 0], [1, 0, 1], [0, 1, 0]]
    assert data.test.labels.tolist() == [[0, 0, 1], [0, 0, 0]]  # the unannotated val image is all-negative
    assert data.class_groups == ([0], [1], [2])
    (tmp_path / "coco" / "longtail2017" / "img_id.pkl").write_bytes(pickle.dumps([12, 99], protocol=2))
    with pytest.raises(ConfigError, match=r"img_id.pkl:2: image id '99' is not an image of"):
        build_data(DataConfig(name="coco_mlt", profile="none"), tmp_path)


def test_coco_labels_skip_degenerate_boxes_and_keep_crowd_ones_as_db_losss_reader(tmp_path):
    write_coco(tmp_path, extra_train_annotations=(
        box(12, 2, area=0.0), box(12, 2, bbox=(0, 0, 0.5, 9)), box(12, 2, bbox=(0, 0, 9, 0.9)),  # all skipped
        box(11, 3, area=900.0, crowd=1)))  # a crowd box counts
    data = build_data(DataConfig(name="coco_mlt", profile="none", image_size=8), tmp_path)
    assert data.train.labels.tolist() == [[1, 0, 0], [1, 0, 1], [0, 1, 1]]  # c.jpg stays person only


@pytest.mark.parametrize("broken,match", [
    (lambda r: r["images"][1].pop("file_name"), r"images\[1\] has no 'file_name'"),
    (lambda r: r["annotations"][2].pop("category_id"), r"annotations\[2\] \(id None\) has no 'category_id'"),
    (lambda r: r["annotations"][0].update(category_id=77), r"annotations\[0\].*category_id 77 is not one"),
    (lambda r: r["annotations"][0].update(bbox="wide"), r"annotations\[0\].*bbox 'wide'"),
])
def test_coco_entries_without_the_keys_read_are_errors_naming_the_entry(tmp_path, broken, match):
    write_coco(tmp_path)
    path = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    record = json.loads(path.read_text())
    broken(record)
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"instances_train2017.json: " + match):
        build_data(DataConfig(name="coco_mlt", profile="none", image_size=8), tmp_path)


def test_multilabel_datasets_refuse_a_profile(tmp_path):
    write_coco(tmp_path)
    with pytest.raises(ConfigError, match="data.profile: coco_mlt is multi-label"):
        build_data(DataConfig(name="coco_mlt"), tmp_path)


# ----------------------------------------------------------------------------- end to end


def mosaic_cfg(loss: str, **more) -> dict:
    return {"data": {"name": "cifar10_mosaic_mlt", "mosaic_train_images": 96, "mosaic_test_images": 40,
                     "batch_size": 32, "sampler": "class_aware"},
            "model": {"name": "mlp", "width": 16}, "loss": {"name": loss}, "more": more,
            "train": {"epochs": 2, "device": "cpu", "log_every": 1}, "eval": {"select": "best_test"}}


@pytest.mark.parametrize("loss, more", [("dbl", {}), ("asl", {"enabled": True, "discrepancy": "kl"}),
                                        ("focal_bce", {"enabled": True, "discrepancy": "l2"})])
def test_training_end_to_end_gives_map_and_exports_a_merged_model(cifar_root, tmp_path, loss, more):
    results = fit(from_dict(mosaic_cfg(loss, **more)), tmp_path / "run", data_root=str(cifar_root))
    assert results["task"] == "multi_label" and 0 < results["map"] <= 100
    assert {"map_head", "map_medium", "map_tail", "micro_f1", "macro_f1"} <= set(results)
    assert len(results["per_class_ap"]) == 10
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(records[0]["test"]) == {"map", "map_head", "map_medium", "map_tail", "micro_f1", "macro_f1"}
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert not any("parametrizations" in k for k in state)  # MORE merged: the base architecture
    again = evaluate_run(tmp_path / "run", plots=True, data_root=str(cifar_root))
    assert again["map"] == pytest.approx(results["map"])
    assert Path(again["figures"][0]).name == "ap_vs_frequency-test.png" and Path(again["figures"][0]).is_file()


def test_report_shows_map_columns_and_posthoc_and_analyze_refuse_multilabel_runs(cifar_root, tmp_path):
    for seed in (0, 1):
        cfg = mosaic_cfg("bce")
        cfg["train"].update(seed=seed, epochs=1)
        fit(from_dict(cfg), tmp_path / f"s{seed}", data_root=str(cifar_root))
    table = report([str(tmp_path / "s0"), str(tmp_path / "s1")])
    assert "| mAP | Head | Medium | Tail | macro-F1 |" in table and " ± " in table and len(table.splitlines()) == 3
    with pytest.raises(ConfigError, match="posthoc.kind: not for multi-label data"):
        run_posthoc(str(tmp_path / "s0"), tau=1.0, data_root=str(cifar_root))
    with pytest.raises(ConfigError, match="longtail analyze: .* is a multi-label run"):
        analyze_run(tmp_path / "s0", data_root=str(cifar_root))
    single = tmp_path / "single"
    single.mkdir()
    (single / "results.json").write_text(json.dumps({"config": from_dict({}).to_dict(), "top1": 50.0}))
    with pytest.raises(ConfigError, match="report single-label and multi-label runs separately"):
        report([str(tmp_path / "s0"), str(single)])


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="this torch build has no gloo backend for CPU processes")
def test_two_process_multilabel_run_equals_a_single_process_eval(cifar_root, tmp_path):
    import os
    import sys

    from launch import launch

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(LONGTAIL_DATA=str(cifar_root), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    config = tmp_path / "c.yaml"
    config.write_text("")
    overrides = ["data.name=cifar10_mosaic_mlt", "data.mosaic_train_images=64", "data.mosaic_test_images=41",
                 "data.batch_size=16", "data.sampler=class_aware", "model.name=mlp", "model.width=16",
                 "loss.name=db_focal", "more.enabled=true", "more.discrepancy=kl", "train.epochs=1",
                 "eval.batch_size=8"]
    out = tmp_path / "run"
    done, _ = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                      "-m", "longtail", "train", config, *overrides, "--out", out], env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["num_samples"] == 41  # 41 is odd: the padding repeat is dropped
    single = evaluate_run(out, data_root=str(cifar_root))
    # Two processes against one, other batch shapes: scores equal at float32 tolerance, so the metrics too.
    assert single["per_class_ap"] == pytest.approx(results["per_class_ap"], rel=1e-5, abs=1e-5)
    for key in ("map", "map_head", "map_medium", "map_tail", "micro_f1", "macro_f1"):
        assert single[key] == pytest.approx(results[key], rel=1e-5, abs=1e-5), key


REPO = Path(__file__).resolve().parents[1]
ML_CONFIGS = sorted(p for d in ("voc_mlt", "coco_mlt", "cifar10_mosaic_mlt", "fashion_mnist_mosaic_mlt")
                    for p in (REPO / "configs" / d).glob("*.yaml"))


@pytest.mark.parametrize("path", ML_CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in ML_CONFIGS])
def test_multilabel_configs_pass_the_task_check_and_are_documented(path):
    from longtail.config import load_config

    cfg = load_config(path)
    assert cfg.data.name == path.parent.name
    assert cfg.loss.name == path.stem or path.stem.startswith("clip_")  # the CLIP variants: tests/test_lift_configs.py
    MULTI.check(cfg)
    assert (cfg.data.sampler == "class_aware") == cfg.loss.name.startswith("db")  # DB-Loss trains class-aware
    assert f"configs/{path.parent.name}/" in (REPO / "docs" / "multilabel.md").read_text()


def test_predict_gives_the_classes_a_multilabel_model_scores_above_the_threshold(cifar_root, tmp_path):
    from longtail.predict import Predictor

    fit(from_dict(mosaic_cfg("bce")), tmp_path / "run", data_root=str(cifar_root))
    data = build_data(from_dict(mosaic_cfg("bce")).data, cifar_root)
    images = []
    for i in range(3):  # test mosaics as 32 x 32 RGB files
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(data.test.images[i].permute(1, 2, 0).numpy()).save(images[-1])
    with pytest.raises(ConfigError, match="prior='train': a multi-label model scores each class with its own sigmoid"):
        Predictor(tmp_path / "run", "train")
    predictor = Predictor(tmp_path / "run", threshold=0.3)
    x = torch.stack([data.test.to_input(data.test.images[i:i + 1], "cpu", train=False)[0] for i in range(3)])
    scores = predictor.probabilities(x)
    assert torch.allclose(scores, torch.sigmoid(predictor.model(x).double()))  # sigmoids, not a softmax
    for record, row in zip(predictor.predict(images, topk=10), scores):
        expected = sorted((k for k in range(10) if row[k] >= 0.3), key=lambda k: -row[k])
        assert [p["id"] for p in record["predictions"]] == expected
