"""MORE: decomposition, switch, loss, schedules, merge, composition with every base loss, end to end."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from longtail.config import Config, ModelConfig, MoreConfig, from_dict
from longtail.errors import ConfigError
from longtail.losses import build_loss
from longtail.methods.base import Method, RunInfo
from longtail.methods.more import (
    More,
    alpha,
    decompose,
    general_only,
    lowrank_parameters,
    lowrank_rank,
    merge,
    more_loss,
    more_loss_multilabel,
    wrap_if_enabled,
)
from longtail.models import build_model

COUNTS = [40, 20, 10, 5, 2]


class UserNet(nn.Module):
    """A model a user brings: grouped, strided, padded and dilated convolutions, BN, a plain Linear head."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2, groups=4)
        self.conv3 = nn.Conv2d(16, 16, (1, 3), padding=(0, 1), groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.feature_dim = 16
        self.head = nn.Linear(16, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv3(self.conv2(x))))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_model(name: str, num_classes: int = 5, head: str = "linear") -> tuple[nn.Module, torch.Tensor]:
    """A model and a matching tiny input batch."""
    torch.manual_seed(0)
    if name == "user":
        return UserNet(num_classes), torch.randn(6, 3, 8, 8)
    if name == "mlp":
        cfg = ModelConfig(name="mlp", width=32, head=head)
        return build_model(cfg, num_classes, in_channels=1, image_size=8), torch.randn(6, 1, 8, 8)
    return build_model(ModelConfig(name=name, head=head), num_classes, 3, 32), torch.randn(4, 3, 32, 32)


def make_info(cfg: Config, counts: list[int] = COUNTS) -> RunInfo:
    return RunInfo(cfg=cfg, num_classes=len(counts), class_counts=counts, epochs=2, steps_per_epoch=5,
                   device=torch.device("cpu"))


def randomize_lowrank(model: nn.Module, std: float = 0.05) -> None:
    """Give B (zero at init) a value, as training would, so the low-rank part changes outputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lowrank_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def assert_gradients_reach_every_part(model: nn.Module) -> None:
    decomposed = [(n, m) for n, m in model.named_modules() if hasattr(m, "parametrizations")]
    assert decomposed
    for name, module in decomposed:
        params = module.parametrizations.weight
        for p in (params.original, params[0].A, params[0].B):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


class Recording(Method):
    """The plain method, remembering the logits of every forward pass."""

    def __init__(self, *args):
        super().__init__(*args)
        self.outputs: list[torch.Tensor] = []

    def forward(self, model, x):
        features, logits = super().forward(model, x)
        self.outputs.append(logits.detach())
        return features, logits


def test_rank_formula_and_shapes():
    assert lowrank_rank((10, 64), 0.1) == 1  # min(10, 64) * 0.1 = 1
    assert lowrank_rank((32, 16, 3, 3), 0.1) == 3  # min(32, 144) * 0.1 = 3.2
    assert lowrank_rank((256, 512), 0.1) == 26  # 25.6 rounds up
    assert lowrank_rank((64, 64), 0.001) == 1  # never below 1
    assert lowrank_rank((64, 64), 1.0) == 64
    model, _ = make_model("user")
    decompose(model, MoreConfig(rank_ratio=0.25))
    part = model.conv2.parametrizations.weight[0]  # 16 x (8/4 * 3 * 3) = 16 x 18
    assert part.B.shape == (16, 4) and part.A.shape == (4, 18)
    assert torch.count_nonzero(part.B) == 0 and torch.count_nonzero(part.A) > 0
    assert part.A.abs().max() <= 1 / math.sqrt(18) and part.A.std() > 0.5 / math.sqrt(3 * 18)  # U(+-1/sqrt(fan_in))
    head = model.head.parametrizations.weight[0]  # 5 x 16 -> round(0.25 * 5) = 1
    assert head.B.shape == (5, 1) and head.A.shape == (1, 16)


@pytest.mark.parametrize("name", ["user", "mlp", "resnet32"])
def test_zero_init_starts_from_the_plain_model(name):
    model, x = make_model(name)
    model.eval()
    before = model(x)
    decompose(model, MoreConfig())
    assert len(lowrank_parameters(model)) > 0
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("name", ["user", "mlp"])
def test_general_only_switches_the_lowrank_part_off_and_back_on(name):
    model, x = make_model(name)
    model.eval()
    plain = model(x)
    decompose(model, MoreConfig())
    randomize_lowrank(model)
    full = model(x)
    assert not torch.allclose(full, plain, atol=1e-4)
    with general_only(model):
        assert torch.equal(model(x), plain)
    assert torch.equal(model(x), full)


@pytest.mark.parametrize("rows,path", [(4, "AddBackward0"), (64, "AddmmBackward0")])
def test_linear_factored_and_built_weight_paths_agree(rows, path):
    """24 -> 16: rows * (24 + 16) < 24 * 16 takes x W_g^T + s (x A^T) B^T, more rows build W_g + s B A."""
    torch.manual_seed(0)
    layer = nn.Linear(24, 16)
    decompose(layer, MoreConfig(rank_ratio=0.25))
    randomize_lowrank(layer)
    params = [layer.parametrizations.weight.original, layer.bias, *lowrank_parameters(layer)]
    x = torch.randn(rows, 24, requires_grad=True)
    out = layer(x)
    assert out.grad_fn.name() == path
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    built = F.linear(x, layer.weight, layer.bias)  # `layer.weight` builds W_g + s B A
    torch.testing.assert_close(out, built)
    for got, want in zip(grads, torch.autograd.grad(built.square().sum(), [x, *params])):
        torch.testing.assert_close(got, want)


def test_factored_forward_only_on_plain_linear_layers_and_gone_after_merge():
    class Clipped(nn.Linear):
        def forward(self, x):
            return super().forward(x).clamp(max=0.1)

    model = nn.Sequential(nn.Linear(24, 16), Clipped(16, 4))
    decompose(model, MoreConfig())
    assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
    randomize_lowrank(model)
    x = torch.randn(2, 24)
    assert model(x).max() <= 0.1  # the subclass's own forward still runs
    merge(model)
    assert "forward" not in model[0].__dict__ and type(model[0]) is nn.Linear


def test_selection_excludes_patterns_frozen_weights_and_buffers():
    model, _ = make_model("user")
    model.conv1.weight.requires_grad_(False)
    names = decompose(model, MoreConfig(exclude=["head", "conv3"]))
    assert names == ["conv2"]
    etf, _ = make_model("resnet32", num_classes=10, head="etf")
    assert "head" not in decompose(etf, MoreConfig())  # the fixed ETF weight is a buffer


def test_unsupported_layer_kinds_and_empty_selection_are_refused():
    model, _ = make_model("user")
    with pytest.raises(ConfigError, match="more.layers.*Conv1d"):
        decompose(model, MoreConfig(layers=["Conv2d", "Conv1d"]))
    with pytest.raises(ConfigError, match="more.exclude"):
        decompose(model, MoreConfig(exclude=["*"]))
    cfg = from_dict({"more": {"enabled": True, "layers": ["BatchNorm2d"]}})
    with pytest.raises(ConfigError, match="BatchNorm2d"):
        wrap_if_enabled(Method(cfg, make_info(cfg), lambda z, y, p: z.sum()), cfg, make_info(cfg))
    cfg = from_dict({"more": {"enabled": True}, "method": {"name": "wb_stage2"}})
    with pytest.raises(ConfigError, match="stage-1 run"):
        wrap_if_enabled(Method(cfg, make_info(cfg), lambda z, y, p: z.sum()), cfg, make_info(cfg))


def test_general_pass_leaves_bn_running_stats_untouched_and_uses_batch_stats():
    cfg = from_dict({"more": {"enabled": True}})
    ce = lambda z, y, p: F.cross_entropy(z, y)  # noqa: E731
    model, x = make_model("user")
    general = copy.deepcopy(model)  # W_g alone
    inner = Recording(cfg, make_info(cfg), ce)
    method = More(inner, cfg, make_info(cfg))
    model = method.prepare(model)
    randomize_lowrank(model)
    full_only = copy.deepcopy(model)
    model.train()
    method.loss(model, x, torch.tensor([0, 1, 2, 3, 4, 0]), progress=0.5)
    z_full, z_gen = inner.outputs
    assert not torch.allclose(z_full, z_gen, atol=1e-4)
    with torch.no_grad():
        full_only.train()(x)  # the full pass alone: the only BN update there should be
        z_plain = general.train()(x)
    for name in ("bn1", "bn2"):
        bn, ref = getattr(model, name), getattr(full_only, name)
        assert torch.equal(bn.running_mean, ref.running_mean)
        assert torch.equal(bn.running_var, ref.running_var)
        assert int(bn.num_batches_tracked) == 1
    # The general pass is the plain W_g model in training mode: batch statistics, not running ones.
    torch.testing.assert_close(z_gen, z_plain, rtol=1e-5, atol=1e-5)


def test_schedules():
    a = 20.0
    assert alpha("sin", a, 0.0) == 0.0
    assert alpha("sin", a, 0.5) == pytest.approx(a)
    assert alpha("sin", a, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert alpha("constant", a, 0.0) == alpha("constant", a, 1.0) == a
    assert (alpha("cosine", a, 0.0), alpha("cosine", a, 0.5)) == (a, pytest.approx(a / 2))
    assert alpha("cosine", a, 1.0) == pytest.approx(0.0)
    assert (alpha("ramp", a, 0.0), alpha("ramp", a, 0.5)) == (0.0, pytest.approx(a / 2))
    assert alpha("ramp", a, 1.0) == pytest.approx(a)
    with pytest.raises(ConfigError, match="more.schedule"):
        alpha("linear", a, 0.5)


def test_l2_and_kl_losses_match_hand_computation():
    z_full = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    z_gen = torch.tensor([[0.0, 2.0, 2.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, 2])
    prior = torch.tensor([0.6, 0.3, 0.1])
    # sample 0: pi = 0.6, ||d||^2 = 1 + 0 + 4 = 5; sample 1: pi = 0.1, ||d||^2 = 1
    assert more_loss(z_full, z_gen, y, prior, "l2").item() == pytest.approx((0.6 * 5 + 0.1 * 1) / 2)
    kl = []
    for f, g in zip(z_full.tolist(), z_gen.tolist()):
        pf = [math.exp(v) / sum(math.exp(u) for u in f) for v in f]
        pg = [math.exp(v) / sum(math.exp(u) for u in g) for v in g]
        kl.append(sum(p * math.log(p / q) for p, q in zip(pf, pg)))
    assert more_loss(z_full, z_gen, y, prior, "kl").item() == pytest.approx((0.6 * kl[0] + 0.1 * kl[1]) / 2, rel=1e-5)


def test_prior_weighting_penalises_head_samples_most():
    torch.manual_seed(0)
    z_full, z_gen = torch.randn(8, 5), torch.randn(8, 5)
    prior = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
    head = more_loss(z_full, z_gen, torch.zeros(8, dtype=torch.long), prior)
    tail = more_loss(z_full, z_gen, torch.full((8,), 4), prior)
    assert head.item() == pytest.approx(tail.item() * COUNTS[0] / COUNTS[4], rel=1e-5)


def test_multilabel_weights_use_mean_prior_of_positive_labels():
    prior = torch.tensor([0.5, 0.3, 0.15, 0.05])
    targets = torch.tensor([[1, 0, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float32)
    z_gen = torch.zeros(4, 4)
    z_full = torch.zeros(4, 4)
    z_full[:, 0] = torch.tensor([1.0, 2.0, 1.0, 3.0])  # squared distances 1, 4, 1, 9
    weights = [0.5, (0.5 + 0.15) / 2, (0.3 + 0.15 + 0.05) / 3, 0.05]  # the empty row takes the smallest prior
    expected = sum(w * d for w, d in zip(weights, [1, 4, 1, 9])) / 4
    assert more_loss_multilabel(z_full, z_gen, targets, prior).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="multi-hot"):
        more_loss_multilabel(z_full, z_gen, torch.zeros(4, dtype=torch.long), prior)


def test_more_step_on_a_synthetic_multi_hot_batch():
    """A multi-label base loss plugs in unchanged: on a multi-label run (RunInfo.task) More.loss weights
    the 2-D targets the multi-label way."""
    cfg = from_dict({"more": {"enabled": True, "schedule": "constant", "amplitude": 0.5}})
    info = make_info(cfg)
    info.task = "multi_label"
    bce = lambda z, y, p: F.binary_cross_entropy_with_logits(z, y)  # noqa: E731
    method = More(Method(cfg, info, bce), cfg, info)
    model, x = make_model("user")
    model = method.prepare(model)
    randomize_lowrank(model)
    model.train()
    targets = (torch.rand(6, 5, generator=torch.Generator().manual_seed(3)) < 0.4).float()
    targets[0] = 0  # a sample with no positive label
    loss, logs = method.loss(model, x, targets, 0.5)
    with torch.no_grad():
        z_full = model(x)
        with general_only(model):
            z_gen = model(x)
        expected = bce(z_full, targets, 0.5) + 2.5 * more_loss_multilabel(z_full, z_gen, targets, info.prior)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert_gradients_reach_every_part(model)


@pytest.mark.parametrize("name", ["user", "mlp", "resnet32", "resnet34_cifar"])
def test_merge_gives_the_base_architecture_and_the_same_logits(name):
    model, x = make_model(name)
    fresh = copy.deepcopy(model)
    decompose(model, MoreConfig(rank_ratio=0.2))
    randomize_lowrank(model, std=0.02)
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        general = fresh.eval()(x)
    assert not torch.allclose(unmerged, general, atol=1e-4)
    merged = merge(model)
    assert list(merged.state_dict()) == list(fresh.state_dict())
    assert [type(m) for m in merged.modules()] == [type(m) for m in fresh.modules()]
    assert lowrank_parameters(merged) == []
    fresh.load_state_dict(merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fresh(x), unmerged, rtol=1e-5, atol=1e-5)


LOSSES = [
    ("ce", {}, "linear"),
    ("bce", {}, "linear"),
    ("la", {}, "linear"),
    ("bs", {}, "linear"),
    ("ldam", {"drw_start": 0.5}, "cosine"),
    ("focal", {}, "linear"),
    ("cb", {}, "linear"),
]


@pytest.mark.parametrize("loss_name,extra,head", LOSSES)
def test_composes_with_every_base_loss(loss_name, extra, head):
    cfg = from_dict({"loss": {"name": loss_name, **extra}, "model": {"head": head},
                     "more": {"enabled": True, "amplitude": 0.5}})
    info = make_info(cfg)
    base_loss = build_loss(cfg.loss, COUNTS, info.epochs)
    method = wrap_if_enabled(Method(cfg, info, base_loss), cfg, info)
    assert isinstance(method, More)
    model, x = make_model("mlp", head=head)
    model = method.prepare(model)
    randomize_lowrank(model)
    method.train_mode(model)
    y = torch.tensor([0, 0, 1, 2, 3, 4])
    progress = 0.75  # after the DRW start, mid-way down the sine
    loss, logs = method.loss(model, x, y, progress)
    assert torch.isfinite(loss)
    assert logs["more_alpha"] == pytest.approx(0.5 * 5 * math.sin(math.pi * progress))
    with torch.no_grad():
        z_full = model(x)
        with general_only(model):
            z_gen = model(x)
        expected = base_loss(z_full, y, progress) + logs["more_alpha"] * more_loss(z_full, z_gen, y, info.prior)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert_gradients_reach_every_part(model)


def test_composes_with_the_ewb_recipe():
    from longtail.methods.ewb import EWB

    cfg = from_dict({"method": {"name": "ewb"}, "model": {"head": "etf"}, "more": {"enabled": True}})
    info = make_info(cfg)
    method = wrap_if_enabled(EWB(cfg, info, build_loss(cfg.loss, COUNTS, info.epochs)), cfg, info)
    model, x = make_model("mlp", head="etf")
    model = method.prepare(model)
    assert not hasattr(model.head, "parametrizations")  # the fixed ETF weight stays as it is
    randomize_lowrank(model)
    method.train_mode(model)
    loss, logs = method.loss(model, x, torch.tensor([0, 0, 1, 2, 3, 4]), 0.5)
    assert {"feature_reg", "more_alpha", "more_loss"} <= set(logs) and logs["more_loss"] > 0
    loss.backward()
    assert_gradients_reach_every_part(model)


def test_gradients_reach_a_b_and_w_g_from_both_terms():
    cfg = from_dict({"more": {"enabled": True, "schedule": "constant"}})
    info = make_info(cfg)
    zero = lambda z, y, p: z.sum() * 0  # noqa: E731  (isolate L_MORE's gradient)
    method = More(Method(cfg, info, zero), cfg, info)
    model, x = make_model("user")
    model = method.prepare(model)
    randomize_lowrank(model)
    model.train()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    loss, logs = method.loss(model, x, y, 0.3)
    assert logs["more_loss"] > 0
    loss.backward()
    assert_gradients_reach_every_part(model)
    # detach_general: L_MORE's gradient flows through the full pass only, so W_g gets a different one.
    grad_wg = model.conv1.parametrizations.weight.original.grad.clone()
    model.zero_grad()
    method.more.detach_general = True
    loss_detached, _ = method.loss(model, x, y, 0.3)
    torch.testing.assert_close(loss_detached, loss)
    loss_detached.backward()
    assert not torch.allclose(model.conv1.parametrizations.weight.original.grad, grad_wg)


def test_amplitude_zero_is_the_base_loss_and_logs_the_discrepancy():
    cfg = from_dict({"more": {"enabled": True, "amplitude": 0.0}})
    info = make_info(cfg)
    ce = lambda z, y, p: F.cross_entropy(z, y)  # noqa: E731
    method = More(Method(cfg, info, ce), cfg, info)
    model = method.prepare(make_model("user")[0])
    randomize_lowrank(model)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    loss, logs = method.loss(model, x, y, 0.5)
    assert logs["more_alpha"] == 0.0 and logs["more_loss"] > 0
    with torch.no_grad():
        assert torch.equal(loss.detach(), ce(model(x), y, 0.5))


def test_param_groups_split_lowrank_params_only_when_asked():
    cfg = from_dict({"more": {"enabled": True}, "optim": {"weight_decay": 5e-4}})
    info = make_info(cfg)
    method = More(Method(cfg, info, lambda z, y, p: z.sum()), cfg, info)
    model = method.prepare(make_model("user")[0])
    assert len(method.param_groups(model)) == 1
    cfg.more.lowrank_weight_decay = 0.0
    groups = method.param_groups(model)
    lowrank = groups[-1]
    assert lowrank["weight_decay"] == 0.0 and "lr" not in lowrank  # the lr is finetune.lr_lowrank's
    assert {id(p) for p in lowrank["params"]} == {id(p) for p in lowrank_parameters(model)}
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())  # every parameter exactly once


def _groups(raw: dict) -> list[dict]:
    """The optimiser's parameter groups the training loop builds for `raw` (method, then the parts' lrs)."""
    from longtail.finetune import part_groups

    cfg = from_dict(raw)
    info = make_info(cfg)
    method = More(Method(cfg, info, lambda z, y, p: z.sum()), cfg, info)
    model = method.prepare(make_model("user")[0])
    names = {id(p): n for n, p in model.named_parameters()}
    groups = part_groups(model, method.param_groups(model), cfg)
    return [{**g, "params": [names[id(p)] for p in g["params"]]} for g in groups]


@pytest.mark.parametrize("extra", [{}, {"optim": {"wd_exclude_bn_bias": True}},
                                   {"finetune": {"lr_head": 0.3}, "more": {"lowrank_weight_decay": 0.0}}])
def test_more_lowrank_lr_is_a_deprecated_alias_of_finetune_lr_lowrank(extra, caplog):
    new = {**extra, "more": {"enabled": True, **extra.get("more", {})},
           "finetune": {"lr_lowrank": 0.01, **extra.get("finetune", {})}}
    old = {**new, "more": {**new["more"], "lowrank_lr": 0.01},
           "finetune": {k: v for k, v in new["finetune"].items() if k != "lr_lowrank"}}
    with caplog.at_level("WARNING", logger="longtail.config"):
        assert from_dict(old) == from_dict(new)
    assert [r.getMessage() for r in caplog.records] == [
        "more.lowrank_lr is deprecated: read as finetune.lr_lowrank=0.01; use finetune.lr_lowrank"]  # one line
    assert _groups(old) == _groups(new)  # the same parameters, in the same order, with the same lr and decay
    lowrank = [g for g in _groups(old) if any(n.endswith((".0.A", ".0.B")) for n in g["params"])]
    assert lowrank and {g["lr"] for g in lowrank} == {0.01}


def test_more_lowrank_lr_is_ignored_without_more_and_refused_beside_finetune_lr_lowrank(caplog):
    with caplog.at_level("WARNING", logger="longtail.config"):
        cfg = from_dict({"more": {"lowrank_lr": 0.01}})  # it never acted without MORE
    assert cfg.finetune.lr_lowrank is None and "ignored; use finetune.lr_lowrank" in caplog.text
    caplog.clear()
    assert from_dict({"more": {"enabled": True, "lowrank_lr": None}}) == from_dict({"more": {"enabled": True}})
    assert not caplog.records  # every config.yaml saved before holds the null: no warning for it
    with pytest.raises(ConfigError, match=r"finetune.lr_lowrank: 0.1 and more.lowrank_lr: 0.01 both set"):
        from_dict({"more": {"enabled": True, "lowrank_lr": 0.01}, "finetune": {"lr_lowrank": 0.1}})


def test_a_saved_config_with_more_lowrank_lr_matches_its_finetune_lr_lowrank_config():
    from longtail.config import load_config
    from longtail.training.checkpointing import config_differences

    saved = load_config(None, ["more.enabled=true"]).to_dict()
    saved["more"]["lowrank_lr"] = 0.01  # config.yaml as runs saved it before the key became an alias
    assert config_differences(saved, load_config(None, ["more.enabled=true", "finetune.lr_lowrank=0.01"])) == []
    assert config_differences(saved, load_config(None, ["more.enabled=true"])) == ["finetune.lr_lowrank"]


def test_finalize_merges_before_the_inner_method_folds():
    cfg = from_dict({"more": {"enabled": True}})
    info = make_info(cfg)
    seen = []

    class Folding(Method):
        def finalize(self, model):
            seen.append(sorted(model.state_dict()))
            return model

    method = More(Folding(cfg, info, lambda z, y, p: z.sum()), cfg, info)
    model = method.prepare(make_model("user")[0])
    method.finalize(model)
    assert seen == [sorted(UserNet().state_dict())]


def test_engine_run_exports_a_merged_plain_model(tmp_path):
    from fake_data import write_cifar10

    from longtail.checkpoint import load_checkpoint
    from longtail.engine import collect_logits, fit, setup
    from longtail.metrics import summarize

    root = str(tmp_path / "data")
    write_cifar10(root, train_per_class=12, test_per_class=3)
    raw = {
        "data": {"name": "cifar10_lt", "imbalance": 4, "batch_size": 16},
        "model": {"name": "mlp", "width": 16},
        "loss": {"name": "la"},
        "more": {"enabled": True, "schedule": "constant", "amplitude": 1.0},
        "optim": {"lr": 0.05},
        "schedule": {"warmup_epochs": 0},
        "train": {"epochs": 2, "device": "cpu"},
    }
    out = tmp_path / "run"
    results = fit(from_dict(copy.deepcopy(raw)), out, data_root=root)
    assert results["method"] == "erm+more"
    first_epoch = (out / "metrics.jsonl").read_text().splitlines()[0]
    assert '"more_alpha"' in first_epoch and '"more_loss"' in first_epoch
    events = EventAccumulator(str(out))
    events.Reload()
    assert {"train/more_alpha", "train/more_loss"} <= set(events.Tags()["scalars"])
    assert all(e.value == 10.0 for e in events.Scalars("train/more_alpha"))  # constant: A = A' * C = 1.0 * 10

    # The run's final (decomposed) model, rebuilt from its checkpoint: the low-rank parts did train.
    run = setup(from_dict(copy.deepcopy(raw)), data_root=root)
    trained = load_checkpoint(out / "checkpoint.pt")["model"]
    assert any(k.endswith(".B") and torch.count_nonzero(v) > 0 for k, v in trained.items())
    run.model.load_state_dict(trained)
    unmerged, _ = collect_logits(run.model, run.data.test, torch.device("cpu"))

    # model.pt loads into the plain architecture, with nothing of MORE, and gives the same logits.
    plain = setup(from_dict({**copy.deepcopy(raw), "more": {"enabled": False}}), data_root=root)
    state = load_checkpoint(out / "model.pt")
    assert list(state) == list(plain.model.state_dict())
    plain.model.load_state_dict(state)
    logits, targets = collect_logits(plain.model, plain.data.test, torch.device("cpu"))
    torch.testing.assert_close(logits, unmerged, rtol=1e-5, atol=1e-5)
    metrics = summarize(logits, targets, plain.data.class_counts, tuple(plain.data.default_thresholds), 15)
    assert metrics["top1"] == pytest.approx(results["top1"])


def test_merging_is_idempotent_so_more_finalize_after_a_lora_merge_changes_nothing():
    from longtail.lowrank import merge

    cfg = from_dict({"more": {"enabled": True}})
    info = make_info(cfg)
    method = More(Method(cfg, info, lambda z, y, p: z.sum()), cfg, info)
    model = method.prepare(make_model("user")[0])
    randomize_lowrank(model)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        before = model.eval()(x)
    once = copy.deepcopy(merge(model))
    twice = method.finalize(merge(model))  # finish merges LoRA's parts, then More.finalize merges again
    assert list(once.state_dict()) == list(twice.state_dict()) == list(UserNet().state_dict())
    assert all(torch.equal(once.state_dict()[k], twice.state_dict()[k]) for k in once.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twice(x), before, rtol=1e-5, atol=1e-5)

