"""finetune.mode: which parameters train, LoRA's merge, LoRA + MORE sharing one low-rank part per layer."""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from torch import nn

from fake_data import write_cifar10
from hf_tiny import clip_config, vit_config
from longtail.config import load_config
from longtail.errors import ConfigError
from longtail.finetune import apply_finetune, parameter_counts
from longtail.lowrank import general_only, lowrank_parts, merge
from longtail.methods import check_config, register_method
from longtail.methods.base import Method
from longtail.models import build_model

transformers = pytest.importorskip("transformers")

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def build(name, *overrides):
    config = clip_config() if name == "hf_clip" else vit_config()
    cfg = load_config(None, [f"model.name={name}", *overrides])
    cfg.model.hf_config = config
    model = build_model(cfg.model, num_classes=10)
    return apply_finetune(model, cfg), cfg


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["hf_clip", "hf_vit"])
def test_each_mode_trains_exactly_its_parameters(name):
    full, _ = build(name)
    everything = sum(p.numel() for p in full.parameters())
    assert parameter_counts(full) == (everything, everything)

    linear, _ = build(name, "finetune.mode=linear")
    assert trainable(linear) == {"head.weight", "head.bias"}
    assert parameter_counts(linear)[0] == 10 * full.feature_dim + 10

    bias, _ = build(name, "finetune.mode=bias")
    expected = {n for n, _ in full.named_parameters() if n.endswith(".bias")} | {"head.weight"}
    assert trainable(bias) == expected

    lora, _ = build(name, "finetune.mode=lora", "finetune.lora_rank=2")
    parts = lowrank_parts(lora)
    assert len(parts) == 2 * 2  # q and v projections of 2 layers
    assert all(not m.parametrizations.weight.original.requires_grad
               for m in lora.modules() if hasattr(m, "parametrizations"))
    assert parameter_counts(lora)[0] == 10 * full.feature_dim + 10 + 4 * 2 * (32 + 32)


def test_lora_merge_gives_the_same_logits_and_the_base_keys():
    model, _ = build("hf_clip", "finetune.mode=lora", "finetune.lora_rank=4", "finetune.lora_alpha=8",
                     "finetune.targets=[q_proj, v_proj, fc1, fc2]")
    base_keys = list(build("hf_clip")[0].state_dict())
    g = torch.Generator().manual_seed(0)
    for part in lowrank_parts(model):  # B = 0 at start would make the check trivial
        part.B.data = torch.randn(part.B.shape, generator=g) * 0.1
    assert len(lowrank_parts(model)) == 8
    model.eval()
    with torch.no_grad():
        unmerged = model(X)
        with general_only(model):
            assert not torch.allclose(model(X), unmerged, atol=1e-4)  # the parts do act on attention and MLP
        merged = merge(model)(X)
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == base_keys and not lowrank_parts(model)
    assert not model.net.vision_model.encoder.layers[0].self_attn.q_proj.weight.requires_grad  # W_g stays frozen


def test_lift_lora_init_draws_a_of_bound_one_over_sqrt_rank_and_starts_from_the_plain_model():
    """LIFT's lora_A is in x r, so kaiming_uniform_ bounds it by 1/sqrt(r) (models/peft_modules.py LoRA)."""
    models = {}
    for init in ("default", "lift"):
        torch.manual_seed(0)  # the same random ViT each time
        models[init], _ = build("hf_vit", "finetune.mode=lora", "finetune.lora_rank=4", f"finetune.lora_init={init}")
    torch.manual_seed(0)
    plain, _ = build("hf_vit")
    for default, lift in zip(lowrank_parts(models["default"]), lowrank_parts(models["lift"])):
        rank, fan_in = lift.A.shape  # 4 x 32: the bounds 0.5 and 0.177 are far apart
        assert default.A.abs().max() <= 1 / math.sqrt(fan_in)
        assert 1 / math.sqrt(fan_in) < lift.A.abs().max() <= 1 / math.sqrt(rank)
        # The same uniform draws, only wider: the init changes the bound and nothing else
        assert torch.allclose(lift.A, default.A * math.sqrt(fan_in / rank))
        assert not lift.B.any()
    for model in (plain, *models.values()):
        model.eval()
    with torch.no_grad():
        assert torch.equal(models["lift"](X), plain(X))  # B = 0: training starts from the plain model
    with pytest.raises(ConfigError, match="finetune.lora_init: 'lift' applies to finetune.mode=lora only"):
        load_config(None, ["finetune.lora_init=lift"])
    with pytest.raises(ConfigError, match="finetune.lora_init: 'kaiming' is not allowed; choose one of: default, lift"):
        load_config(None, ["finetune.mode=lora", "finetune.lora_init=kaiming"])


def test_targets_that_match_nothing_are_an_error():
    with pytest.raises(ConfigError, match=r"finetune.targets: no Linear or Conv2d layer .* \['nope'\]"):
        build("hf_vit", "finetune.mode=lora", "finetune.targets=[nope]")


def test_a_model_without_default_targets_needs_them():
    cfg = load_config(None, ["model.name=resnet10", "finetune.mode=lora"])
    with pytest.raises(ConfigError, match="ships no default LoRA targets"):
        apply_finetune(build_model(cfg.model, num_classes=10, in_channels=1, image_size=28), cfg)


@pytest.mark.parametrize("name, kind", [("mlp", nn.Linear), ("resnet32", nn.Conv2d)])
def test_lora_targets_every_backbone_layer_of_the_mlp_and_resnet32_by_default(name, kind):
    cfg = load_config(None, [f"model.name={name}", "finetune.mode=lora", "finetune.lora_rank=2"])
    model = apply_finetune(build_model(cfg.model, num_classes=10, in_channels=3, image_size=32), cfg)
    backbone = [m for n, m in model.named_modules() if isinstance(m, kind) and not n.startswith("head")]
    assert backbone and all(hasattr(m, "parametrizations") for m in backbone)
    assert all(not m.parametrizations.weight.original.requires_grad for m in backbone)  # W_g frozen
    assert not hasattr(model.head, "parametrizations") and all(p.requires_grad for p in model.head.parameters())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n in trained if n.startswith("head.") or n.endswith((".A", ".B"))}


@pytest.mark.parametrize("mode", ["linear", "bias"])
def test_more_is_refused_where_no_weight_matrix_trains(mode):
    with pytest.raises(ConfigError, match=f"finetune.mode={mode} trains only"):
        check_config(load_config(None, ["more.enabled=true", f"finetune.mode={mode}"]))


@pytest.mark.parametrize("override", ["more.rank_ratio=0.2", "more.scale=2", "more.layers=[Linear]",
                                      "more.exclude=[head]"])
def test_lora_with_more_refuses_mores_own_shape(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}: with finetune.mode=lora MORE's low-rank part is the LoRA part"):
        check_config(load_config(None, ["more.enabled=true", "finetune.mode=lora", override]))


def test_lora_and_more_run_end_to_end_and_export_merged(tmp_path, clip_dir):
    from safetensors.torch import load_file

    from longtail.engine import fit, load_model, setup

    root, ckpt = tmp_path / "data", clip_dir[0]
    write_cifar10(root, train_per_class=6, test_per_class=2)
    args = ["model.name=hf_clip", f"model.pretrained={ckpt}", "finetune.mode=lora", "finetune.lora_rank=2",
            "more.enabled=true", "data.imbalance=2", "data.batch_size=16", "data.augment=none", "train.epochs=1",
            "optim.name=adamw", "optim.lr=1e-2", "eval.batch_size=64"]
    run = setup(load_config(None, args), data_root=str(root))
    assert len(lowrank_parts(run.model)) == 4  # MORE added no part of its own: it uses LoRA's
    fit(load_config(None, args), tmp_path / "run", data_root=str(root))
    model, spec, model_pt = load_model(tmp_path / "run")
    assert [f["kind"] for f in spec["folds"]] == ["more_merge", "lora_merge"]
    state = torch.load(model_pt, weights_only=True)
    plain = build_model(load_config(None, ["model.name=hf_clip", f"model.pretrained={ckpt}"]).model, num_classes=10)
    assert list(state) == list(plain.state_dict())
    original = load_file(ckpt / "model.safetensors")
    k = "vision_model.encoder.layers.0.self_attn.k_proj.weight"  # not a target: frozen, exported unchanged
    assert torch.equal(state[f"net.{k}"], original[k])
    q = "vision_model.encoder.layers.0.self_attn.q_proj.weight"  # a target: W_g + s B A, trained
    assert not torch.equal(state[f"net.{q}"], original[q])


def test_parameter_counts_are_printed(tmp_path, capsys):
    from longtail.engine import fit

    root = tmp_path / "data"
    write_cifar10(root, train_per_class=4, test_per_class=1)
    cfg = load_config(None, ["model.name=hf_vit", "finetune.mode=linear", "data.imbalance=2", "data.batch_size=16",
                             "data.augment=none", "train.epochs=1", "eval.batch_size=64"])
    cfg.model.hf_config = vit_config()
    fit(cfg, tmp_path / "run", data_root=str(root))
    assert "parameters: 330 trainable of" in capsys.readouterr().out  # 10 x 32 + 10: the head alone


def test_the_shared_lowrank_part_is_the_one_more_uses():
    from longtail.methods import more

    assert more.merge is merge and more.general_only is general_only
    layer = nn.Linear(4, 3)
    cfg = load_config(None, ["more.enabled=true"])
    model = nn.Sequential(layer)
    more.decompose(model, cfg.more)
    assert lowrank_parts(model) and lowrank_parts(model)[0] is layer.parametrizations.weight[0]


def test_grad_checkpoint_gives_the_same_gradients():
    grads = []
    for on in (False, True):
        torch.manual_seed(0)  # the same random model both times
        model, _ = build("hf_vit", "finetune.mode=lora")
        for part in lowrank_parts(model):
            part.B.data.fill_(0.01)  # B = 0 would leave A without gradient
        if on:
            model.enable_grad_checkpoint()
        assert model.net.is_activation_checkpointing == on
        model.train()
        model(X).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and any(".A" in n for n in grads[0])
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6), name


def more_gradients(name, mode, root, checkpointing):
    """Gradients of MORE's two-pass loss (its weight at the schedule's peak) with B != 0, as run by setup."""
    from longtail.engine import setup

    cfg = load_config(None, [f"model.name={name}", f"finetune.mode={mode}", "finetune.lora_rank=2",
                             "more.enabled=true", f"train.grad_checkpoint={checkpointing}", "data.imbalance=2"])
    cfg.model.hf_config = clip_config() if name == "hf_clip" else vit_config()
    run = setup(cfg, data_root=str(root))
    g = torch.Generator().manual_seed(0)
    for part in lowrank_parts(run.model):  # B = 0 would make the full and the general pass compute alike
        part.B.data = torch.randn(part.B.shape, generator=g) * 0.1
    assert run.model.net.is_activation_checkpointing == checkpointing
    run.model.train()
    loss, _ = run.method.loss(run.model, X, torch.tensor([0, 1, 9]), progress=0.5)
    loss.backward()
    return {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("name", ["hf_clip", "hf_vit"])
def test_grad_checkpoint_with_more_gives_the_same_gradients(name, mode, tmp_path):
    # Fails without `lowrank.recompute_as_forward`: backward would recompute the general pass with the parts on.
    write_cifar10(tmp_path, train_per_class=2, test_per_class=1)
    plain, checkpointed = (more_gradients(name, mode, tmp_path, on) for on in (False, True))
    assert set(plain) == set(checkpointed) and any(n.endswith(".B") for n in plain)
    for key, grad in plain.items():
        assert torch.allclose(checkpointed[key], grad, rtol=1e-4, atol=1e-6), key


def test_grad_checkpoint_is_refused_for_other_models(tmp_path):
    from longtail.engine import setup

    root = tmp_path / "data"
    write_cifar10(root, train_per_class=2, test_per_class=1)
    with pytest.raises(ConfigError, match="model resnet32 does not support it"):
        setup(load_config(None, ["train.grad_checkpoint=true", "data.imbalance=1"]), data_root=str(root))


class StopAfter(Method):
    """Sends this process SIGTERM after its `stop_at`-th optimiser step (as a scheduler would)."""

    steps = 0
    stop_at = 0

    def after_step(self, model):
        StopAfter.steps += 1
        if StopAfter.steps == StopAfter.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)


register_method("stop_after_test", f"{__name__}:StopAfter")


def test_lora_and_more_resume_bit_for_bit_after_a_stop_signal(tmp_path, clip_dir):
    from longtail.engine import Preempted, fit

    root, ckpt = tmp_path / "data", clip_dir[0]
    write_cifar10(root, train_per_class=8, test_per_class=1)
    args = ["model.name=hf_clip", f"model.pretrained={ckpt}", "finetune.mode=lora", "finetune.lora_rank=2",
            "more.enabled=true", "method.name=stop_after_test", "data.imbalance=2", "data.batch_size=8",
            "train.epochs=2", "optim.name=adamw", "optim.lr=1e-2", "eval.batch_size=64"]
    StopAfter.steps, StopAfter.stop_at = 0, 0
    fit(load_config(None, args), tmp_path / "reference", data_root=str(root))
    StopAfter.steps, StopAfter.stop_at = 0, 7  # mid-epoch 2 (6 steps an epoch)
    with pytest.raises(Preempted):
        fit(load_config(None, args), tmp_path / "run", data_root=str(root))
    StopAfter.stop_at = 0
    fit(load_config(None, args), tmp_path / "run", resume=True, data_root=str(root))
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("run", "reference"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_stages_refuse_a_finetune_mode():
    with pytest.raises(ConfigError, match="finetune.mode: method.name=crt loads a stage-1 model.pt"):
        load_config(None, ["method.name=crt", "finetune.mode=lora"])


@pytest.mark.parametrize("name", ["hf_clip", "hf_vit"])
def test_adaptformer_trains_the_adapters_and_the_head_and_starts_as_the_plain_model(name):
    torch.manual_seed(0)
    plain, _ = build(name)
    torch.manual_seed(0)
    adapted, _ = build(name, "finetune.mode=adaptformer", "finetune.adapter_dim=4")
    names = trainable(adapted)
    assert names - {"head.weight", "head.bias"} and all(".adapter." in n for n in names - {"head.weight", "head.bias"})
    assert parameter_counts(adapted)[0] == 10 * adapted.feature_dim + 10 + 2 * (32 * 4 + 4 + 4 * 32 + 32)
    with torch.no_grad():
        assert torch.allclose(adapted.eval()(X), plain.eval()(X), atol=1e-6)  # up = 0 at start


def test_adaptformer_exports_its_adapters_and_reloads(tmp_path):
    from longtail.engine import fit, load_model

    root = tmp_path / "data"
    write_cifar10(root, train_per_class=4, test_per_class=1)
    cfg = load_config(None, ["model.name=hf_vit", "finetune.mode=adaptformer", "finetune.adapter_dim=4",
                             "data.imbalance=2", "data.batch_size=16", "data.augment=none", "train.epochs=1",
                             "optim.name=adamw", "optim.lr=1e-2", "eval.batch_size=64"])
    cfg.model.hf_config = vit_config()
    fit(cfg, tmp_path / "run", data_root=str(root))
    model, spec, model_pt = load_model(tmp_path / "run")
    assert spec["adapters"] == {"blocks": ["net.layers.0.mlp", "net.layers.1.mlp"], "dim": 4, "scale": 0.1,
                                "style": "adaptformer"}
    state, key = torch.load(model_pt, weights_only=True), "net.layers.0.mlp.adapter.up.weight"
    assert state[key].abs().sum() > 0  # trained away from zero
    assert torch.equal(model.state_dict()[key], state[key])


def test_adaptformer_refuses_more_and_non_mlp_targets():
    with pytest.raises(ConfigError, match="finetune.mode=adaptformer trains only the adapters"):
        check_config(load_config(None, ["more.enabled=true", "finetune.mode=adaptformer"]))
    with pytest.raises(ConfigError, match="adaptformer needs MLP blocks"):
        build("hf_vit", "finetune.mode=adaptformer", "finetune.targets=[nope]")


def lr_of(optimizer):
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("mode, part", [("lora", "lowrank"), ("adaptformer", "adapter")])
def test_each_part_trains_with_its_own_lr(mode, part, tmp_path):
    from longtail.engine import build_optimizer, setup
    from longtail.finetune import Adapter, part_groups
    from longtail.lowrank import lowrank_parameters

    write_cifar10(tmp_path, train_per_class=2, test_per_class=1)
    more = ["more.enabled=true", "more.lowrank_weight_decay=0"] if mode == "lora" else []
    cfg = load_config(None, ["model.name=hf_vit", f"finetune.mode={mode}", "optim.lr=0.1", "optim.weight_decay=0.5",
                             "finetune.lr_head=0.01", f"finetune.lr_{part}=0.001", "data.imbalance=2", *more])
    cfg.model.hf_config = vit_config()
    run = setup(cfg, data_root=str(tmp_path))
    model = run.model
    groups = part_groups(model, run.method.param_groups(model), cfg)
    lrs = lr_of(build_optimizer(cfg, groups))
    head = {id(p) for p in model.head.parameters()}
    parts = {id(p) for p in (lowrank_parameters(model) if part == "lowrank" else
                             [p for m in model.modules() if isinstance(m, Adapter) for p in m.parameters()])}
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert sorted(lrs) == sorted(trained) and parts and parts < trained  # every trained parameter exactly once
    assert {lrs[i] for i in head} == {0.01} and {lrs[i] for i in parts} == {0.001}
    assert {lrs[i] for i in trained - head - parts} <= {0.1}
    if mode == "lora":  # MORE's own weight decay of the parts survives the move
        assert all(g["weight_decay"] == 0 for g in groups if {id(p) for p in g["params"]} & parts)
    unset = part_groups(model, run.method.param_groups(model), load_config(None, [f"finetune.mode={mode}", *more]))
    assert set(lr_of(build_optimizer(cfg, unset)).values()) == {0.1}  # null: optim.lr


@pytest.mark.parametrize("overrides, message", [
    (["finetune.lr_head=0"], r"finetune.lr_head: must be > 0 or null \(optim.lr\), got 0"),
    (["finetune.lr_lowrank=0.01"], r"finetune.lr_lowrank: 0.01 sets the lr of low-rank parts, and finetune.mode=full"),
    (["finetune.mode=lora", "more.enabled=true", "finetune.lr_lowrank=0.01", "more.lowrank_lr=0.1"],
     "both set the lr of the same low-rank parts"),
    (["finetune.mode=lora", "finetune.lr_adapter=0.01"], "finetune.lr_adapter: 0.01 sets the lr of AdaptFormer's"),
])
def test_a_part_lr_without_its_part_is_an_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("name, extra", [("hf_vit", []), ("hf_clip", ["more.enabled=true"])])
def test_bfloat16_autocast_trains_close_to_float32(name, extra, tmp_path):
    from longtail.engine import fit

    root = tmp_path / "data"
    write_cifar10(root, train_per_class=4, test_per_class=1)
    losses = []
    for amp in (False, True):
        cfg = load_config(None, [f"model.name={name}", "finetune.mode=lora", *extra, "train.amp_dtype=bfloat16",
                                 f"train.amp={amp}", "data.imbalance=2", "data.batch_size=8", "data.augment=none",
                                 "train.epochs=1", "optim.name=adamw", "optim.lr=1e-2", "eval.batch_size=64"])
        cfg.model.hf_config = clip_config() if name == "hf_clip" else vit_config()
        fit(cfg, tmp_path / f"run{amp}", data_root=str(root))
        record = json.loads((tmp_path / f"run{amp}" / "metrics.jsonl").read_text().splitlines()[0])
        losses.append(record["train_loss"])
    fp32, bf16 = losses
    assert math.isfinite(bf16) and bf16 != fp32  # autocast did run (on the CPU), in bfloat16
    assert bf16 == pytest.approx(fp32, rel=0.01)  # measured: 4e-4 (ViT, LoRA), 2e-4 (CLIP, LoRA + MORE)
