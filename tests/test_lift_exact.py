"""LIFT's code exactly (github.com/shijxcs/LIFT, commit 661ead9): its AdaptFormer (finetune.adapter_style lift),
its head on CLIP's pre-projection feature (model.clip_feature), its per-epoch cosine (schedule.step_per) and its
full_tuning subset (finetune.full_scope), each checked against a hand computation of LIFT's definition."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fake_data import write_cifar10
from longtail.config import load_config
from longtail.engine import effective_lr, fit, load_model, lr_factor, setup
from longtail.errors import ConfigError
from longtail.finetune import Adapter
from longtail.methods import check_config
from test_finetune import X, build, trainable
from test_resume import TINY, CrashAt, _assert_same_run
from test_zero_shot import NAMES, args

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

pytest.importorskip("transformers")

LIFT_ADAPTER = ["finetune.mode=adaptformer", "finetune.adapter_style=lift", "finetune.adapter_dim=4",
                "finetune.adapter_scale=1.0"]


@pytest.mark.parametrize("name", ["hf_clip", "hf_vit"])
def test_lift_adapter_is_lifts_module_and_starts_as_the_plain_model(name):
    torch.manual_seed(0)
    plain, _ = build(name)
    torch.manual_seed(0)
    model, _ = build(name, *LIFT_ADAPTER)
    head = {"head.weight", "head.bias"}
    per_block = {"adapter.norm.weight", "adapter.norm.bias", "adapter.down.weight", "adapter.down.bias",
                 "adapter.up.weight", "adapter.up.bias", "adapter.scale"}
    assert trainable(model) == head | {f"net.{p}layers.{i}.mlp.{k}" for i in (0, 1) for k in per_block
                                       for p in (["vision_model.encoder."] if name == "hf_clip" else [""])}
    adapters = [m for m in model.modules() if isinstance(m, Adapter)]
    for a in adapters:  # models/peft_modules.py AdaptFormer: LayerNorm, Kaiming-normal down, zero biases and up, s = 1
        assert torch.equal(a.scale.data, torch.ones(1)) and torch.equal(a.norm.weight, torch.ones(32))
        assert not a.down.bias.any() and not a.up.weight.any() and not a.up.bias.any() and not a.norm.bias.any()
    down = torch.cat([a.down.weight.flatten() for a in adapters])  # kaiming_normal_(a=sqrt(5)): std sqrt(1/3 / 32)
    assert down.std().item() == pytest.approx(math.sqrt(1 / 3 / 32), rel=0.25)
    with torch.no_grad():
        assert torch.allclose(model.eval()(X), plain.eval()(X), atol=1e-6)


def test_lift_adapter_reads_the_residual_stream_beside_the_whole_mlp_branch():
    """One CLIP encoder layer by hand: h = x + attn(ln_1(x)); out = h + mlp(ln_2(h)) + s up(relu(down(ln(h))))."""
    model, _ = build("hf_clip", *LIFT_ADAPTER)
    layer = model.net.vision_model.encoder.layers[0]
    a = layer.mlp.adapter
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        h = x + layer.self_attn(hidden_states=layer.layer_norm1(x), attention_mask=None)[0]
        ln_2 = layer.mlp.norm  # the layer's own layer_norm2, moved beside the adapter
        mlp = layer.mlp.fc2(layer.mlp.activation_fn(layer.mlp.fc1(F.layer_norm(h, (32,), ln_2.weight, ln_2.bias,
                                                                                   ln_2.eps))))
        side = F.relu(F.layer_norm(h, (32,), a.norm.weight, a.norm.bias, 1e-5) @ a.down.weight.t() + a.down.bias)
        expected = h + mlp + a.scale * (side @ a.up.weight.t() + a.up.bias)
        assert torch.allclose(layer(x, attention_mask=None), expected, atol=1e-5)


def test_adapter_dropout_acts_after_the_relu_in_training_only():
    a = Adapter(8, 4, 0.5, dropout=0.5)
    torch.nn.init.normal_(a.up.weight)
    x = torch.randn(3, 8)
    torch.manual_seed(3)
    out = a.train()(x)
    torch.manual_seed(3)
    expected = 0.5 * a.up(F.dropout(F.relu(a.down(x)), 0.5, True))
    assert torch.equal(out, expected) and not torch.equal(out, a.eval()(x))
    assert torch.equal(a(x), 0.5 * a.up(F.relu(a.down(x))))


def test_pre_projection_head_gives_lifts_text_initialised_logits(clip_dir, tmp_path):
    path, clip = clip_dir
    root = tmp_path / "data"
    write_cifar10(root, train_per_class=4, test_per_class=1)
    run = setup(load_config(None, args(path, "model.clip_feature=pre_projection", "model.head_scale=25")),
                data_root=str(root))
    assert run.model.feature_dim == 32  # the tower's width, not projection_dim 16
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        text = F.normalize(clip.get_text_features(**tokenizer([f"a photo of a {n}." for n in NAMES], padding=True,
                                                              return_tensors="pt")).pooler_output, dim=1)
        # trainer.py init_head_text_feat: text_features @ proj.t(), normalised; OpenAI's proj is visual_projection^T
        rows = F.normalize(text @ clip.visual_projection.weight, dim=1)
        feature = clip.vision_model(pixel_values=X).pooler_output  # ln_post of the CLS token, models/peft_vit.py
        expected = 25 * F.normalize(feature, dim=1) @ rows.t()  # CosineClassifier, scale 25
        assert torch.allclose(run.model.eval()(X), expected, atol=1e-4)


def test_lift_run_exports_and_eval_rebuilds_it(clip_dir, tmp_path):
    from longtail.engine import evaluate_run

    path, _ = clip_dir
    root = tmp_path / "data"
    write_cifar10(root, train_per_class=4, test_per_class=1)
    extra = [*LIFT_ADAPTER, "model.clip_feature=pre_projection", "model.head_scale=25", "schedule.name=cosine",
             "schedule.step_per=epoch", "train.epochs=2", "data.batch_size=16", "optim.name=adamw", "optim.lr=1e-2"]
    results = fit(load_config(None, args(path, *extra)), tmp_path / "run", data_root=str(root))
    model, spec, model_pt = load_model(tmp_path / "run")
    assert spec["model"]["clip_feature"] == "pre_projection" and model.feature_dim == 32
    assert spec["adapters"]["style"] == "lift" and spec["adapters"]["dim"] == 4
    state = torch.load(model_pt, weights_only=True)
    block = "net.vision_model.encoder.layers.0"
    assert f"{block}.mlp.norm.weight" in state and f"{block}.layer_norm2.weight" not in state
    assert state[f"{block}.mlp.adapter.scale"].item() != 1.0  # s trained
    assert evaluate_run(tmp_path / "run", data_root=str(root))["top1"] == results["top1"]


def test_per_epoch_cosine_holds_each_epochs_value():
    step = load_config(None, ["train.epochs=10", "schedule.name=cosine", "schedule.warmup_epochs=0"])
    epoch = load_config(None, ["train.epochs=10", "schedule.name=cosine", "schedule.warmup_epochs=0",
                               "schedule.step_per=epoch"])
    for s in range(100):  # CosineAnnealingLR(T_max=10) stepped after each epoch
        assert lr_factor(s, epoch, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * (s // 10) / 10)))
    assert lr_factor(15, step, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.15)))  # the default: per step
    warm = load_config(None, ["train.epochs=10", "schedule.name=cosine", "schedule.warmup_epochs=2",
                              "schedule.step_per=epoch"])
    assert [lr_factor(s, warm, 10) for s in (0, 19)] == pytest.approx([0.05, 1.0])  # warm-up per step
    assert lr_factor(25, warm, 10) == lr_factor(20, warm, 10) == 1.0
    assert lr_factor(30, warm, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 8)))


def test_per_epoch_cosine_resumes_bit_for_bit_from_a_mid_epoch_checkpoint(tmp_path, data_root):
    tiny = [*TINY, "schedule.step_per=epoch", "schedule.warmup_epochs=0"]  # LIFT: no warm-up
    fit(load_config(None, tiny), tmp_path / "reference", data_root=data_root)
    records = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    cfg, steps = load_config(None, tiny), 13  # TINY's epoch: 13 optimiser steps (test_resume)
    # each record's lr is the one the next epoch starts with: CosineAnnealingLR's after its step
    assert [r["lr"] for r in records] == pytest.approx(
        [effective_lr(cfg) * 0.5 * (1 + math.cos(math.pi * (e + 1) / 3)) for e in range(3)], abs=1e-12)
    out = tmp_path / "run"
    cfg = load_config(None, [*tiny, "train.checkpoint_every=5"])
    cfg.method.name = "crash_test"
    CrashAt.calls, CrashAt.crash_at = 0, 13 + 9  # after the checkpoint in the middle of epoch 2
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, out, data_root=data_root)
    CrashAt.crash_at = 0
    fit(cfg, out, resume=True, data_root=data_root)
    _assert_same_run(out, tmp_path / "reference")


@pytest.mark.parametrize("name", ["hf_clip", "hf_vit"])
def test_full_scope_blocks_trains_the_transformer_blocks_and_the_head(name):
    model, _ = build(name, "finetune.full_scope=blocks")
    blocks = {n for n, _ in model.named_parameters() if ".layers." in n}
    # not the embeddings, the pre / post LayerNorms or the projection (models/peft_vit.py block_tuned)
    assert blocks and trainable(model) == blocks | {"head.weight", "head.bias"}


@pytest.mark.parametrize("overrides, message", [
    (["finetune.full_scope=blocks", "finetune.mode=lora"],
     "finetune.full_scope: 'blocks' applies to finetune.mode=full"),
    (["finetune.adapter_style=lift"], "finetune.adapter_style: 'lift' applies to finetune.mode=adaptformer"),
    (["finetune.mode=adaptformer", "finetune.adapter_dropout=1.0"], r"finetune.adapter_dropout: must be in \[0, 1\)"),
    (["model.name=hf_vit", "model.clip_feature=pre_projection"], "model.clip_feature: pre_projection chooses hf_clip"),
])
def test_lift_options_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_lift_adapter_needs_the_layernorm_before_its_block():
    with pytest.raises(ConfigError, match="finetune.adapter_style: lift reads the residual stream"):
        build("hf_clip", *LIFT_ADAPTER, "finetune.targets=[self_attn.out_proj]")
    with pytest.raises(ConfigError, match="finetune.full_scope: blocks trains the transformer blocks"):
        cfg = load_config(None, ["model.name=mlp", "finetune.full_scope=blocks"])
        from longtail.finetune import apply_finetune
        from longtail.models import build_model

        apply_finetune(build_model(cfg.model, num_classes=10, in_channels=1, image_size=28), cfg)


def test_zero_shot_refuses_the_pre_projection_feature(clip_dir):
    with pytest.raises(ConfigError, match="model.clip_feature: pre_projection gives logits other than CLIP's"):
        check_config(load_config(None, args(clip_dir[0], "method.name=zero_shot", "model.clip_feature=pre_projection")))
