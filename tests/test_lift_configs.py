"""LIFT's CLIP ViT-B/16 recipes (configs/*/lift_*.yaml) and the CLIP multi-label variants (configs/*_mlt/clip_*.yaml):
valid, sourced, and holding the values LIFT publishes (github.com/shijxcs/LIFT, read at commit 661ead9)."""
from __future__ import annotations

from pathlib import Path

import pytest

from longtail.config import load_config
from longtail.task import get_task

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("cifar100_lt", "imagenet_lt", "places_lt", "inat2018")
VARIANTS = ("adaptformer", "zero_shot", "linear", "full", "lora", "lora_more")
LIFT = sorted(REPO.glob("configs/*/lift_*.yaml"))
CLIP_ML = sorted(p for d in ("voc_mlt", "coco_mlt") for p in (REPO / "configs" / d).glob("clip_*.yaml"))
# models/peft_vit.py: adapter_dim = 2 ** max(0, int(log2(num_classes / (n_layers * 2)))), 12 layers in ViT-B/16
WIDTH = {"cifar100_lt": 4, "imagenet_lt": 32, "places_lt": 8, "inat2018": 256}


def ids(paths):
    return [f"{p.parent.name}/{p.name}" for p in paths]


def test_every_dataset_has_every_variant():
    assert {(p.parent.name, p.stem) for p in LIFT} == {(d, f"lift_{v}") for d in DATASETS for v in VARIANTS}


@pytest.mark.parametrize("path", LIFT, ids=ids(LIFT))
def test_lift_config_holds_the_published_values(path):
    cfg = load_config(path)
    variant = path.stem.removeprefix("lift_")
    header = path.read_text().split("\ndata:")[0]
    assert "Source: Shi et al., ICML 2024" in header and "github.com/shijxcs/LIFT" in header and "Protocol" in header
    assert ("NOT in LIFT" in header) == (variant == "lora_more")  # the project's own combination says so
    m = cfg.model
    assert (m.name, m.pretrained, m.head, m.head_init, m.prompts) == (
        "hf_clip", "openai/clip-vit-base-patch16", "cosine", "text", ["a photo of a {}."])
    assert cfg.data.augment == "resized_crop_flip" and cfg.data.batch_size == 128
    assert cfg.data.resize_to == (224 if cfg.data.name == "cifar100_lt" else None)
    if cfg.data.name != "cifar100_lt":
        assert cfg.data.profile == "none" and cfg.data.image_size == 224 and cfg.data.class_names is not None
    assert "LIFT's sits" not in header and "LIFT's per epoch" not in header  # the closed differences are gone
    assert "Differs here" not in header and "another bound" not in header
    if variant == "zero_shot":  # models/models.py ZeroShotCLIP: CLIP's projected embeddings
        assert cfg.method.name == "zero_shot" and m.head_scale == 1.0 and m.clip_feature == "projected"
        return
    # LIFT's head on the feature before the projection (trainer.py init_head_text_feat), its cosine per epoch
    assert m.clip_feature == "pre_projection" and cfg.schedule.step_per == "epoch"
    assert m.head_scale == 25 and cfg.loss.name == "la" and cfg.loss.tau == 1.0
    o = cfg.optim
    lr = {"full": 0.001 if cfg.data.name == "places_lt" else 0.0005}.get(variant, 0.01)
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.lr_scaling) == ("sgd", lr, 0.9, 0.0005, "none")
    assert (cfg.schedule.name, cfg.schedule.warmup_epochs, cfg.schedule.min_lr) == ("cosine", 0, 0.0)
    assert cfg.train.epochs == (20 if cfg.data.name == "inat2018" else 10)
    assert cfg.train.amp and cfg.train.amp_dtype == "float16"
    mode = {"lora_more": "lora"}.get(variant, variant)
    assert cfg.finetune.mode == mode and cfg.more.enabled == (variant == "lora_more")
    assert cfg.finetune.full_scope == ("blocks" if mode == "full" else "all")  # models/peft_vit.py block_tuned
    if mode == "adaptformer":  # models/peft_modules.py AdaptFormer: its own LayerNorm, s learnt from 1, no dropout
        ft = cfg.finetune
        assert (ft.adapter_dim, ft.adapter_style, ft.adapter_scale, ft.adapter_dropout) == (
            WIDTH[cfg.data.name], "lift", 1.0, 0.0)
    if mode == "lora":  # LIFT's LoRA: rank adapter_dim, scale 1 / rank, on q and v
        ft = cfg.finetune
        assert (ft.lora_rank, ft.lora_alpha, ft.targets) == (WIDTH[cfg.data.name], 1.0, ["q_proj", "v_proj"])
    # models/peft_modules.py LoRA: lora_A is 768 x r, so kaiming_uniform_ bounds it by 1/sqrt(r)
    assert cfg.finetune.lora_init == ("lift" if mode == "lora" else "default")
    assert cfg.eval.tta == ("none" if mode == "lora" else "lift_crops")


@pytest.mark.parametrize("path", CLIP_ML, ids=ids(CLIP_ML))
def test_clip_multilabel_variants_pass_the_task_check_and_say_they_are_not_published(path):
    cfg = load_config(path)
    get_task("multi_label").check(cfg)
    assert cfg.model.name == "hf_clip" and "NOT a published recipe" in path.read_text()
    assert (cfg.model.head_init == "text") == (cfg.method.name == "zero_shot")
    assert f"configs/{path.parent.name}/{path.name}" in (REPO / "docs" / "multilabel.md").read_text()


@pytest.mark.parametrize("path", LIFT, ids=ids(LIFT))
def test_lift_configs_are_in_the_foundation_models_table(path):
    assert f"configs/{path.parent.name}/{path.name}" in (REPO / "docs" / "foundation_models.md").read_text()
