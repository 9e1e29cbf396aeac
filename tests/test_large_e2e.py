"""Issue 5 end to end on small generated image trees.

A class-folder tree trained from a torchvision-format pretrained file, an ImageNet-LT list-file layout,
and the folder tree trained by 2 CPU processes under torchrun with MORE and the class-balanced sampler;
each run's exported model re-evaluated by `longtail eval` must reproduce its results.json.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from PIL import Image

from launch import launch
from longtail.config import ModelConfig, load_config
from longtail.engine import evaluate_run, fit, setup
from longtail.models.resnet import resnet10

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

COUNTS = {"bee": 12, "fox": 6, "owl": 3}  # sorted names, so class ids 0, 1, 2 follow this order
TEST_PER_CLASS = 3  # 9 test images: odd, so 2-process evaluation pads one duplicate that must not count
BATCH = 8  # no batch of one image (BatchNorm on 1 x 1 maps at 32 px): 21 -> 8+8+5, per rank 11 -> 8+3
TINY_RUN = ["data.image_size=32", "data.num_workers=0", f"data.batch_size={BATCH}", "data.profile=none",
            "train.epochs=1", "optim.lr=0.01", "eval.batch_size=8", "train.device=cpu"]


def write_image(path: Path, label: int, seed: int) -> None:
    """A 40 x 40 noisy image whose mean colour depends on the label; JPEG or PNG by suffix."""
    rng = np.random.default_rng(seed)
    base = np.array([40 + 80 * label, 120, 200 - 80 * label], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-40, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("my_data")
    for label, (name, n) in enumerate(COUNTS.items()):
        for i in range(n):
            write_image(root / "train" / name / f"{i:02d}.{'png' if i % 2 else 'jpg'}", label, seed=100 * label + i)
        for i in range(TEST_PER_CLASS):
            write_image(root / "test" / name / f"t{i}.jpg", label, seed=10_000 + 100 * label + i)
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A torchvision-format resnet10 state dict (conv1 ... layer4, fc) with non-default BN values throughout."""
    torch.manual_seed(123)
    backbone = resnet10(len(COUNTS), 3, 32, ModelConfig(name="resnet10"))
    state = backbone.state_dict()
    for key, value in state.items():
        if key.endswith(("running_var", "bn1.weight", "bn2.weight")) or ".1.weight" in key:
            value.uniform_(0.5, 1.5)
        elif key.endswith(("running_mean", ".bias")):
            value.normal_(0, 0.1)
    state["fc.weight"] = torch.randn(len(COUNTS), backbone.feature_dim) * 0.01
    state["fc.bias"] = torch.randn(len(COUNTS)) * 0.01
    path = tmp_path_factory.mktemp("weights") / "resnet10.pth"
    torch.save(state, path)
    return path


def assert_reproduced(results: dict, again: dict) -> None:
    # Recorded by training, re-scored by `eval` (another process, other threads): the accuracies count argmaxes,
    # which only a tie closer than float32 rounding could flip, so they match exactly; NLL at float32 tolerance.
    assert again["num_samples"] == results["num_samples"]
    assert again["per_class"] == results["per_class"]
    for key in ("top1", "balanced", "many", "medium", "few"):
        assert again[key] == results[key], key
    assert again["nll"] == pytest.approx(results["nll"], rel=1e-5)


def test_folder_run_from_pretrained_weights_reproduces_under_eval(folder, pretrained, tmp_path, caplog):
    overrides = ["data.name=folder", f"data.root={folder}", "model.name=resnet10",
                 f"model.pretrained={pretrained}", *TINY_RUN]
    file = torch.load(pretrained, weights_only=True)
    start = setup(load_config(None, overrides)).model.state_dict()
    assert {k for k in start if not k.startswith("head.")} == {k for k in file if not k.startswith("fc.")}
    for key, value in file.items():
        assert torch.equal(start[key.replace("fc.", "head.")], value), key  # backbone and the matching 3-class fc

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="longtail"):
        results = fit(load_config(None, overrides), out)
    assert "classifier loaded from fc" in caplog.text
    assert results["dataset"] == "folder" and results["class_counts"] == list(COUNTS.values())
    assert results["num_samples"] == TEST_PER_CLASS * len(COUNTS)
    assert results["world_size"] == 1 and results["effective_batch_size"] == BATCH
    trained = torch.load(out / "model.pt", weights_only=True)
    assert not torch.equal(trained["conv1.weight"], file["conv1.weight"])  # one epoch of SGD moved it

    again = evaluate_run(out)  # the saved config's data.root finds the tree again
    assert_reproduced(json.loads((out / "results.json").read_text()), again)


def test_imagenet_lt_list_files_train_with_size_warnings(tmp_path, caplog):
    base = tmp_path / "ImageNet_LT"
    for c in range(4):
        write_image(base / f"train/n{c:08d}/n{c:08d}_1.JPEG", c % 3, seed=c)
    for c in range(5):  # one file per test line: an evaluation split may not list an image twice
        write_image(base / f"val/ILSVRC2012_val_{c:08d}.JPEG", c % 3, seed=50 + c)
    # Every one of the 1000 classes needs a training image; the handful of files is shared between them.
    (base / "ImageNet_LT_train.txt").write_text(
        "".join(f"train/n{c % 4:08d}/n{c % 4:08d}_1.JPEG {c}\n" for c in range(1000)))
    (base / "ImageNet_LT_val.txt").write_text("".join(f"val/ILSVRC2012_val_{c:08d}.JPEG {c}\n" for c in range(2)))
    (base / "ImageNet_LT_test.txt").write_text(
        "".join(f"val/ILSVRC2012_val_{c:08d}.JPEG {7 * c}\n" for c in range(5)))
    overrides = ["data.name=imagenet_lt", f"data.root={tmp_path}", "model.name=mlp", "model.width=16", *TINY_RUN,
                 "data.batch_size=50", "eval.batch_size=50"]

    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="longtail"):
        results = fit(load_config(None, overrides), out)
    for split, published in (("train", 115_846), ("val", 20_000), ("test", 50_000)):
        assert f"published imagenet_lt {split} split has {published}" in caplog.text, split
    assert results["dataset"] == "imagenet_lt" and len(results["per_class"]) == 1000
    assert results["class_counts"] == [1] * 1000 and results["num_samples"] == 5
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["epoch"] == 1 and "val" in record and "test" in record

    assert_reproduced(results, evaluate_run(out))


@pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                    reason="this torch build has no gloo backend for CPU processes")
def test_torchrun_two_processes_class_balanced_more_on_the_folder(folder, pretrained, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done, _ = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                      "-m", "longtail", "train", config, "data.name=folder", f"data.root={folder}",
                      "data.sampler=class_balanced", "model.name=resnet10", f"model.pretrained={pretrained}",
                      "more.enabled=true", *TINY_RUN, "--out", out], env)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["effective_batch_size"] == 2 * BATCH
    assert results["method"] == "erm+more" and results["config"]["data"]["sampler"] == "class_balanced"
    assert results["num_samples"] == TEST_PER_CLASS * len(COUNTS)  # the padding duplicate is not counted
    # Equal only if both ranks evaluated rank 0's exported (MORE-merged) weights, BN statistics included.
    assert_reproduced(results, evaluate_run(out / "model.pt"))
