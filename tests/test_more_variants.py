"""MORE's variants (more.general_lr_scale, freeze_general_at, general_loss_weight, groups, orthogonal_weight,
rank_allocation): each term against a hand computation, the merge exact in float64, frozen parts without
gradient or optimiser state, a mid-phase resume bit for bit, and the defaults leaving a step as it was."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from test_more import COUNTS, UserNet, make_info, make_model, randomize_lowrank

from longtail.checkpoint import load_checkpoint
from longtail.config import from_dict, load_config
from longtail.errors import ConfigError
from longtail.lowrank import LowRank, general_only, lowrank_parameters, lowrank_parts, lowrank_ratios, merge
from longtail.methods import register_method
from longtail.methods.base import Method
from longtail.methods.more import More, decompose, more_loss
from longtail.methods.more_variants import (band_prior, feature_bands, frequency_bands, general_loss, importance_ranks,
                                            orthogonal_penalty)
from longtail.training.optim import build_optimizer
from tiny import TINY_MLP

CE = lambda z, y, p: F.cross_entropy(z, y)  # noqa: E731
Y = torch.tensor([0, 1, 2, 3, 4, 0])

VARIANTS = {
    "general_lr_scale": {"general_lr_scale": 0.1},
    "frozen_general": {"general_lr_scale": 0.0},
    "freeze_general_at": {"freeze_general_at": 0.5},
    "general_loss_weight": {"general_loss_weight": 1.0},
    "groups": {"groups": 3},
    "grouping": {"groups": 2, "grouping": "features"},
    "orthogonal_weight": {"orthogonal_weight": 1.0},
    "rank_allocation": {"rank_allocation": "importance"},
}


def more_method(more: dict, loss=CE, counts=COUNTS, **sections):
    cfg = from_dict({"more": {"enabled": True, "schedule": "constant", **more}, **sections})
    info = make_info(cfg, counts)
    return More(Method(cfg, info, loss), cfg, info)


def prepared(more: dict, name: str = "user", dtype=torch.float32, **sections):
    method = more_method(more, **sections)
    model, x = make_model(name)
    model, x = model.to(dtype), x.to(dtype)
    method.probe_loss = lambda m: CE(m(x.to(next(m.parameters()).dtype)), Y[:len(x)], 0)
    method.class_feature_means = lambda m: torch.randn(len(COUNTS), 4, generator=torch.Generator().manual_seed(0))
    return method, method.prepare(model), x


def test_frequency_bands_and_their_priors():
    assert frequency_bands([5, 40, 10, 40, 2], 2) == [[1, 3, 2], [0, 4]]  # ties by id, the first band the larger
    assert frequency_bands(COUNTS, 1) == [[0, 1, 2, 3, 4]]
    prior = torch.tensor([0.5, 0.3, 0.2])
    assert torch.equal(band_prior(prior, [0, 1, 2]), prior)  # one band: MORE's own weights
    assert torch.equal(band_prior(prior, [2]), torch.tensor([0.5, 0.5, 0.2]))


def test_groups_add_one_part_per_band_and_the_loss_sums_their_discrepancies():
    method, model, x = prepared({"groups": 2})
    assert len(model.conv1.parametrizations.weight) == 2 and len(lowrank_parts(model)) == 2 * 4
    randomize_lowrank(model)
    model.train()
    loss, logs = method.loss(model, x, Y, 0.5)
    # by hand: each band's part alone against W_g alone, weighted by its band prior
    parts, expected = lowrank_parts(model), 0
    with torch.no_grad():
        with general_only(model):
            z_gen = model(x)
        for g, band in enumerate(frequency_bands(COUNTS, 2)):
            for i, part in enumerate(parts):
                part.enabled = i % 2 == g
            z_g = model(x)
            expected = expected + more_loss(z_g, z_gen, Y, band_prior(method.class_prior, band))
        for part in parts:
            part.enabled = True
        ce = CE(model(x), Y, 0)
    torch.testing.assert_close(logs["more_loss"], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.detach(), ce + method.amplitude * expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lowrank_parameters(model))


@pytest.mark.parametrize("rows", [2, 64])
def test_the_factored_linear_path_adds_every_part(rows):
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 16)
    method = more_method({"groups": 3, "layers": ["Linear"]})
    decompose(layer, method.more)
    randomize_lowrank(layer)
    x = torch.randn(rows, 24)
    w = layer.parametrizations.weight.original + sum(p.B @ p.A for p in lowrank_parts(layer))
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5)
    lowrank_parts(layer)[1].enabled = False  # a part switched off drops its term in both paths
    w = w - lowrank_parts(layer)[1].B @ lowrank_parts(layer)[1].A
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5)


def test_layer_ratio_of_several_parts_is_that_of_their_sum():
    method, model, _ = prepared({"groups": 3})
    randomize_lowrank(model)
    chain = model.conv2.parametrizations.weight
    delta = sum(p.scale * (p.B.detach().double() @ p.A.detach().double()) for p in chain if isinstance(p, LowRank))
    expected = delta.norm() / chain.original.detach().double().norm()
    assert lowrank_ratios(model)["conv2"] == pytest.approx(float(expected), rel=1e-9)


def test_orthogonal_penalty_is_the_update_against_w_g_by_hand():
    method, model, x = prepared({"orthogonal_weight": 0.5})
    randomize_lowrank(model)
    expected = 0
    for module in (model.conv1, model.conv2, model.conv3, model.head):
        chain = module.parametrizations.weight
        w = chain.original.flatten(1)
        delta = chain[0].scale * chain[0].B @ chain[0].A
        expected = expected + (delta @ w.T).pow(2).sum() / w.pow(2).sum()
    torch.testing.assert_close(orthogonal_penalty(model), expected, rtol=1e-5, atol=1e-9)
    model.train()
    loss, logs = method.loss(model, x, Y, 0.5)
    base, _ = more_method({}).loss(model, x, Y, 0.5)
    torch.testing.assert_close(logs["more_orthogonal"], expected.detach(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(loss, base + 0.5 * expected, rtol=1e-5, atol=1e-6)


def test_general_loss_is_the_prior_weighted_cross_entropy_of_the_general_only_logits():
    method, model, x = prepared({"general_loss_weight": 2.0})
    randomize_lowrank(model)
    model.train()
    loss, logs = method.loss(model, x, Y, 0.5)
    with torch.no_grad(), general_only(model):
        z_gen = model(x)
    w = method.class_prior[Y]
    expected = (w * F.cross_entropy(z_gen, Y, reduction="none")).sum() / w.sum()
    torch.testing.assert_close(logs["more_general_loss"], expected, rtol=1e-5, atol=1e-7)
    multi = torch.tensor([[1, 0, 0, 0, 1], [0, 1, 0, 0, 0]])  # multi-hot: the mean prior of its labels, BCE
    w = (multi.float() @ method.class_prior) / multi.sum(1)
    bce = F.binary_cross_entropy_with_logits(z_gen[:2], multi.float(), reduction="none").mean(1)
    torch.testing.assert_close(general_loss(z_gen[:2], multi, method.class_prior, "multi_label"),
                               (w * bce).sum() / w.sum())
    # the general-only pass now carries a graph even where L_MORE's does not (detach_general)
    method.more.detach_general = True
    loss, _ = method.loss(model, x, Y, 0.5)
    loss.backward()
    assert model.conv1.parametrizations.weight.original.grad is not None


def test_importance_shares_the_uniform_budget_by_measured_importance():
    model, _ = make_model("mlp")
    uniform = {"body.0": 3, "body.3": 3, "body.6": 3, "head": 1}

    def loss(m):  # sum |W * dL/dW|: 2 sum W^2 for body.0, 0 for body.3 and body.6, a little for the head
        return m.body[0].weight.pow(2).sum() + 0.05 * m.head.weight.pow(2).sum() + 0 * m.body[3].weight.sum()

    ranks = importance_ranks(model, uniform, loss)
    w0, wh = model.body[0].weight.detach().double(), model.head.weight.detach().double()
    share = float(w0.pow(2).sum() / (w0.pow(2).sum() + 0.05 * wh.pow(2).sum()))
    assert ranks == {"body.0": round(10 * share), "body.3": 1, "body.6": 1, "head": max(1, round(10 * (1 - share)))}
    assert ranks["body.0"] > 3
    assert model.body[0].weight.grad is None  # measured on a copy
    capped = importance_ranks(model, {"body.0": 300, "body.3": 1, "body.6": 1, "head": 1}, loss)
    assert capped["body.0"] == 32  # never above min(out, fan_in)


def test_importance_ranks_shape_the_parts_and_are_recorded():
    method, model, _ = prepared({"rank_allocation": "importance"})
    ranks = method.info.extra["more_ranks"]
    assert set(ranks) == {"conv1", "conv2", "conv3", "head"}
    assert all(model.get_submodule(n).parametrizations.weight[0].A.shape[0] == r for n, r in ranks.items())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_merge_is_exact_in_float64_for_every_variant(variant):
    torch.manual_seed(0)
    method, model, x = prepared(VARIANTS[variant], dtype=torch.float64)
    fresh = UserNet().double()
    optimizer = torch.optim.SGD([p for g in method.param_groups(model) for p in g["params"]], lr=0.05)
    for progress in (0.1, 0.6, 0.7, 0.8):  # both phases of freeze_general_at
        optimizer.zero_grad()
        model.train()
        method.loss(model, x, Y, progress)[0].backward()
        optimizer.step()
    assert any(torch.count_nonzero(p.B) for p in lowrank_parts(model))  # the parts trained
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        merged = method.finalize(model)
        assert list(merged.state_dict()) == list(fresh.state_dict())
        fresh.load_state_dict(merged.state_dict())
        torch.testing.assert_close(fresh.eval()(x), unmerged, rtol=1e-12, atol=1e-12)


def test_freeze_general_at_trains_the_general_part_then_the_parts_alone():
    method, model, x = prepared({"freeze_general_at": 0.5})
    general = method.general
    optimizer = torch.optim.SGD([p for g in method.param_groups(model) for p in g["params"]], lr=0.1, momentum=0.9)
    model.train()
    loss, logs = method.loss(model, x, Y, 0.25)  # first phase: no L_MORE, the parts get no gradient
    loss.backward()
    assert logs["more_alpha"] == 0.0 and float(logs["more_loss"]) == 0.0
    assert all(p.grad is None for p in lowrank_parameters(model)) and all(p.grad is not None for p in general)
    optimizer.step()
    assert all(p not in optimizer.state for p in lowrank_parameters(model))
    assert all(torch.count_nonzero(p.B) == 0 for p in lowrank_parts(model))
    snapshot = [p.detach().clone() for p in general]
    optimizer.zero_grad()
    loss, logs = method.loss(model, x, Y, 0.75)  # second phase: alpha's sin is at its peak halfway through it
    assert logs["more_alpha"] == pytest.approx(method.amplitude)
    loss.backward()
    assert all(p.grad is None for p in general) and all(p.grad is not None for p in lowrank_parameters(model))
    optimizer.step()
    assert all(torch.equal(p, s) for p, s in zip(general, snapshot))
    assert any(torch.count_nonzero(p.B) for p in lowrank_parts(model))


def test_the_sin_schedule_spans_the_second_phase():
    method, model, x = prepared({"freeze_general_at": 0.6, "schedule": "sin"})
    model.train()
    assert method.loss(model, x, Y, 0.6)[1]["more_alpha"] == 0.0
    assert method.loss(model, x, Y, 0.8)[1]["more_alpha"] == pytest.approx(method.amplitude)
    # an epoch number, as the other schedule keys accept: the second phase starts with that epoch's first step
    assert more_method({"freeze_general_at": 150}).boundary == 0.75  # train.epochs 200


def test_general_lr_scale_scales_the_general_groups_and_zero_leaves_them_out():
    method, model, _ = prepared({"general_lr_scale": 0.1}, optim={"lr": 0.2})
    groups = method.param_groups(model)
    optimizer = build_optimizer(method.cfg, groups)
    lowrank = {id(p) for p in lowrank_parameters(model)}
    for group in optimizer.param_groups:
        is_lowrank = {id(p) in lowrank for p in group["params"]}
        assert len(is_lowrank) == 1
        assert group["lr"] == pytest.approx(0.2 if is_lowrank.pop() else 0.02)
        assert "lr_scale" not in group
    frozen, model, _ = prepared({"general_lr_scale": 0.0})
    listed = {id(p) for g in frozen.param_groups(model) for p in g["params"]}
    assert listed == {id(p) for p in lowrank_parameters(model)}
    assert not any(p.requires_grad for p in frozen.general)


@pytest.mark.parametrize("more,match", [
    ({"general_lr_scale": -1}, "more.general_lr_scale: must be >= 0"),
    ({"freeze_general_at": 0.0}, r"more.freeze_general_at: a fraction of training in \(0, 1\), an epoch in 1..199"),
    ({"freeze_general_at": 200}, r"more.freeze_general_at: a fraction of training in \(0, 1\), an epoch in 1..199"),
    ({"freeze_general_at": 0.5, "general_lr_scale": 0}, "nothing trains before the boundary"),
    ({"groups": 6}, r"more.groups: must be in 1..5"),
    ({"orthogonal_weight": -0.1}, "more.orthogonal_weight: must be >= 0"),
    ({"grouping": "features"}, "more.grouping: features cuts the classes into more.groups bands"),
])
def test_bad_variant_values_are_refused_in_one_line(more, match):
    with pytest.raises(ConfigError, match=match) as err:
        more_method(more)
    assert "\n" not in str(err.value)


def test_groups_and_importance_are_refused_on_lora_parts():
    with pytest.raises(ConfigError, match="more.groups: with finetune.mode=lora"):
        more_method({"groups": 2}, finetune={"mode": "lora"})


def test_every_variant_key_at_its_default_leaves_the_step_as_it_was():
    """The old step: the method's loss plus alpha L_MORE of the full and general-only passes, nothing else."""
    method, model, x = prepared({})
    randomize_lowrank(model)
    model.train()
    loss, logs = method.loss(model, x, Y, 0.3)
    assert set(logs) == {"more_alpha", "more_loss"}
    with torch.no_grad():
        z_full = model(x)
        with general_only(model):
            z_gen = model(x)
    assert torch.equal(loss.detach(), CE(z_full, Y, 0) + method.amplitude * more_loss(z_full, z_gen, Y, method.class_prior))
    assert method.param_groups(model) == Method.param_groups(method, model)
    assert len(lowrank_parts(model)) == 4 and all(p.requires_grad for p in model.parameters())


# A mid-phase resume, end to end.

class CrashInForward(Method):
    """Plain ERM that stops, as a killed process does, at its `crash_at`-th forward (MORE calls it per pass)."""

    calls = 0
    crash_at = 0

    def forward(self, model, x):
        CrashInForward.calls += 1
        if CrashInForward.calls == CrashInForward.crash_at:
            raise KeyboardInterrupt("simulated kill")
        return super().forward(model, x)


register_method("crash_forward_test", f"{__name__}:CrashInForward")

RUN = [*TINY_MLP, "train.epochs=3", "train.log_every=2", "schedule.warmup_epochs=0", "train.checkpoint_every=5",
       "more.enabled=true", "more.freeze_general_at=0.5", "more.groups=2", "more.general_loss_weight=0.5",
       "more.orthogonal_weight=0.1", "more.general_lr_scale=0.5"]


@pytest.mark.e2e
def test_a_run_killed_mid_phase_resumes_bit_for_bit_and_frozen_parts_keep_no_state(tmp_path, data_root):
    from longtail.engine import fit

    CrashInForward.calls, CrashInForward.crash_at = 0, 0
    ref = tmp_path / "ref"
    fit(load_config(None, [*RUN, "method.name=crash_forward_test"]), ref, data_root=data_root)
    total = load_checkpoint(ref / "checkpoint.pt")["scheduler"]["last_epoch"]  # optimiser steps in the run
    first_phase = sum(k / total < 0.5 for k in range(total))
    # The kill: the third pass of the first second-phase step that follows a mid-epoch checkpoint (every 5 steps;
    # each second-phase step runs the full, the general-only and two band passes, a first-phase step one pass).
    at = next(k for k in range(first_phase + 1, total) if k % 5 == 0 and k % (total // 3))
    CrashInForward.calls, CrashInForward.crash_at = 0, first_phase + 4 * (at - first_phase) + 3
    out = tmp_path / "run"
    cfg = load_config(None, [*RUN, "method.name=crash_forward_test"])
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, out, data_root=data_root)
    partial = load_checkpoint(out / "checkpoint.pt")["partial"]
    assert partial["steps_done"] == at > first_phase  # mid-epoch, in the second phase
    CrashInForward.crash_at = 0
    fit(copy.deepcopy(cfg), out, resume=True, data_root=data_root)
    a, b = load_checkpoint(out / "model.pt"), load_checkpoint(ref / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = ("images_per_sec", "epoch_seconds")
    records = [[{k: v for k, v in json.loads(line).items() if k not in strip}
                for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (out, ref)]
    assert records[0] == records[1]
    # The finished run's optimiser holds state for the low-rank parts alone: W_g, BN and the rest were frozen.
    state = load_checkpoint(ref / "checkpoint.pt")
    model_state = state["model"]
    lowrank_shapes = sorted(tuple(v.shape) for k, v in model_state.items() if k.endswith((".A", ".B")))
    buffers = sorted(tuple(s["momentum_buffer"].shape) for s in state["optimizer"]["state"].values())
    assert buffers == lowrank_shapes


@pytest.mark.e2e
def test_importance_ranks_are_measured_on_the_training_split_and_recorded(tmp_path, data_root):
    from longtail.engine import fit

    out = tmp_path / "run"
    results = fit(load_config(None, [*TINY_MLP, "train.epochs=1", "more.enabled=true",
                                     "more.rank_allocation=importance"]), out, data_root=data_root)
    ranks = results["method_record"]["more_ranks"]
    assert set(ranks) == {"body.0", "body.3", "body.6", "head"}
    uniform = {"body.0": 3, "body.3": 3, "body.6": 3, "head": 1}  # round(0.1 * min(out, fan_in)), width 32
    assert ranks != uniform and abs(sum(ranks.values()) - sum(uniform.values())) <= len(uniform)
    trained = load_checkpoint(out / "checkpoint.pt")["model"]
    assert {n: trained[f"{n}.parametrizations.weight.0.A"].shape[0] for n in ranks} == ranks


def test_feature_bands_cluster_the_class_means_most_frequent_band_first():
    # classes 0, 2, 4 point one way, 1 and 3 another (lengths differ: the means are normalised first)
    means = torch.tensor([[1.0, 0.1], [0.0, 3.0], [2.0, 0.3], [0.2, 1.0], [0.9, -0.1]])
    assert feature_bands(means, [10, 50, 10, 50, 10], 2) == [[1, 3], [0, 2, 4]]
    assert feature_bands(means, [50, 10, 50, 10, 50], 2) == [[0, 2, 4], [1, 3]]
    assert sorted(map(sorted, feature_bands(means, COUNTS, 5))) == [[0], [1], [2], [3], [4]]  # one class each
    # identical means leave nothing to cluster: still every band gets a class
    bands = feature_bands(torch.ones(5, 3), COUNTS, 3)
    assert sorted(c for band in bands for c in band) == [0, 1, 2, 3, 4] and all(bands)


def test_features_grouping_bands_the_class_means_of_the_starting_model():
    method = more_method({"groups": 2, "grouping": "features"})
    model, x = make_model("user")
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [1.0, -0.1]])
    method.class_feature_means = lambda m: means
    method.prepare(model)
    assert method.info.extra["more_bands"] == [[0, 2, 4], [1, 3]]
    prior = method.class_prior
    assert torch.equal(method.band_priors[1], torch.where(torch.tensor([0, 1, 0, 1, 0]).bool(), prior, prior.max()))


def test_class_feature_means_by_hand_leave_the_model_as_it_was(tmp_path, data_root):
    from longtail.engine import setup

    cfg = load_config(None, [*TINY_MLP, "train.device=cpu", "more.enabled=true", "more.groups=2",
                             "more.grouping=features"])
    run = setup(cfg, data_root=data_root)
    model = copy.deepcopy(run.model)
    model.train()
    before = copy.deepcopy(model.state_dict())
    means = run.method.class_feature_means(model)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    split = run.data.train
    x = split.to_input(split.images, "cpu", train=False)
    model.eval()
    with torch.no_grad():
        features = model.features(x).double() if hasattr(model, "features") else None
    assert features is not None
    for c in range(run.info.num_classes):
        torch.testing.assert_close(means[c], features[split.labels == c].mean(dim=0), rtol=1e-6, atol=1e-6)
    assert run.info.extra["more_bands"] and sorted(sum(run.info.extra["more_bands"], [])) == list(range(10))
