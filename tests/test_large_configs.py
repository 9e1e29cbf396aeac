"""The ImageNet-LT, Places-LT and iNaturalist 2018 configs: valid, buildable, and true to the benchmark protocol.

No data is read: the models are built at 32 px without their pretrained files, once per distinct model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from longtail.config import ModelConfig, MoreConfig, load_config
from longtail.data.listfile import BENCHMARKS
from longtail.models import build_model

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("imagenet_lt", "places_lt", "inat2018")
# LIFT's CLIP recipes (lift_*.yaml) follow LIFT's protocol instead: tests/test_lift_configs.py.
PATHS = sorted(p for d in DATASETS for p in (REPO / "configs" / d).glob("*.yaml") if not p.stem.startswith("lift_"))
IDS = [f"{p.parent.name}/{p.name}" for p in PATHS]
RECIPES = {"ce", "la", "ce_more", "la_more", "wb_stage1", "wb_stage2"}

_built: dict[str, tuple[int, int]] = {}


def built(model_cfg: ModelConfig, num_classes: int) -> tuple[int, int]:
    """(feature_dim, number of logits) of the model, without its pretrained file; built once per distinct model."""
    cfg = dataclasses.replace(model_cfg, pretrained=None)
    key = f"{cfg!r} {num_classes}"
    if key not in _built:
        model = build_model(cfg, num_classes, 3, 32).eval()
        with torch.no_grad():
            logits = model(torch.zeros(1, 3, 32, 32))
        _built[key] = (model.feature_dim, logits.shape[1])
    return _built[key]


def test_every_dataset_has_configs():
    assert {p.parent.name for p in PATHS} == set(DATASETS)


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_config_follows_the_benchmark_protocol(path):
    cfg = load_config(path)
    header = path.read_text().split("\ndata:")[0]
    assert header.startswith("#") and "Source" in header and "Protocol" in header, f"{path} must state its source"
    assert cfg.data.name == path.parent.name
    assert cfg.data.profile == "none", "the published split files are already long-tailed"
    assert cfg.data.val_per_class == 0 and cfg.data.image_size == 224 and cfg.data.augment == "crop_flip"
    assert cfg.data.num_workers == 8 and cfg.data.sampler == "instance"
    assert cfg.eval.thresholds is None  # the dataset default: 100 / 20
    assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9
    assert cfg.optim.lr_scaling == "linear" and cfg.optim.base_batch_size == cfg.data.batch_size == 256
    assert cfg.schedule.name == "cosine" and cfg.schedule.warmup_epochs == 0


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_model_builds_with_the_benchmark_class_count(path):
    cfg = load_config(path)
    num_classes = BENCHMARKS[cfg.data.name].num_classes
    d, logits = built(cfg.model, num_classes)
    assert logits == num_classes
    if cfg.model.head == "etf":
        assert d >= num_classes - 1, f"{path}: a simplex ETF for {num_classes} classes needs >= {num_classes - 1} dims"


@pytest.mark.parametrize("dataset", DATASETS)
def test_ewb_exists_exactly_where_the_feature_dimension_allows_it(dataset):
    stems = {p.stem for p in PATHS if p.parent.name == dataset}
    assert RECIPES <= stems
    num_classes = BENCHMARKS[dataset].num_classes
    d, _ = built(load_config(REPO / "configs" / dataset / "ce.yaml").model, num_classes)
    assert ("ewb" in stems) == (d >= num_classes - 1)


@pytest.mark.parametrize("path", [p for p in PATHS if p.stem.startswith("ewb")], ids=lambda p: p.parent.name)
def test_ewb_configs_select_and_adjust_on_the_published_val_list(path):
    cfg = load_config(path)
    assert "val" in BENCHMARKS[cfg.data.name].lists  # val_per_class is 0: the benchmark's own list
    assert cfg.method.name == "ewb" and cfg.method.feature_reg == 0.01 and cfg.loss.name == "ce"
    assert cfg.model.head == "etf" and cfg.eval.select == "best_val"
    assert cfg.posthoc.kind == "multiplicative" and cfg.posthoc.tau is None


@pytest.mark.parametrize("path", [p for p in PATHS if "wb_stage2" in p.stem], ids=lambda p: p.parent.name)
def test_stage2_configs_start_from_their_stage1_run(path):
    cfg = load_config(path)
    stage1 = path.with_name(path.name.replace("wb_stage2", "wb_stage1"))
    assert stage1.exists()
    assert cfg.method.name == "wb_stage2" and cfg.method.init_from == f"runs/{path.parent.name}/{stage1.stem}"
    s1 = load_config(stage1)
    assert s1.method.name == "erm" and s1.loss.name == "ce" and not s1.more.enabled
    assert dataclasses.replace(s1.model, pretrained=None) == cfg.model  # stage 2 loads the stage-1 weights only
    assert dataclasses.asdict(s1.data) == dataclasses.asdict(cfg.data)
    assert cfg.loss.name == "cb" and cfg.loss.beta == 0.9999 and cfg.optim.weight_decay == 0.1
    assert cfg.method.maxnorm_thresh == 0.1 and cfg.optim.lr == 0.01 and cfg.train.epochs == 10


@pytest.mark.parametrize("path", [p for p in PATHS if p.stem.endswith("_more")], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_more_configs_are_their_base_recipe_plus_spec_defaults(path):
    cfg = load_config(path)
    base = load_config(path.with_name(path.name.replace("_more", "")))
    assert cfg.more == dataclasses.replace(MoreConfig(), enabled=True)
    assert dataclasses.replace(cfg, more=MoreConfig()) == base


def test_pretrained_weights_only_where_the_protocol_fine_tunes():
    for path in PATHS:
        cfg = load_config(path)
        if cfg.data.name == "places_lt" and cfg.method.name != "wb_stage2":
            assert cfg.model.name == "resnet152" and cfg.model.pretrained.endswith("resnet152.pth"), path
        else:
            assert cfg.model.pretrained is None, f"{path}: trains from scratch or from its stage-1 run"


def test_docs_list_every_config():
    text = (REPO / "docs" / "large_datasets.md").read_text()
    section = text[text.index("## Configs"):]
    for path in PATHS:
        assert f"configs/{path.parent.name}/{path.name}" in section, path
